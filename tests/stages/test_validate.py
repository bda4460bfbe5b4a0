"""The trainer as DAG stages: validate (seeds, subsets, baselines, KD), teachers (out-of-fold), experts."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import torch

from conftest import run_pipeline
from stages.train.image_data import ImageSet
from stages.train.training_sets import SubsetSpec, TrainSet, balanced_subset, class_counts
from stages.validate import ValidateParams, select

SMALL = {"epochs": 25, "network_kwargs": {"width": 16, "norm": "instancenorm"}}


def test_validate_subset_reports_mean_std_over_seeds(digits_shards, tmp_path, client):
    res = run_pipeline({"name": "v", "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "val", "stage": "validate", "inputs": {"train": str(digits_shards.path)},
         "params": {"recipe": "standard-dd", "overrides": SMALL, "subset": {"ipc": 5}, "seeds": [0, 1]}}]}, client)[0]
    m = json.loads((res.path / "metrics.json").read_text())
    assert m["n_train"] == 50 and m["subset"] == "ipc5"
    assert set(m["per_seed"]) == {"0", "1"}
    accs = list(m["per_seed"].values())
    assert abs(m["top1_mean"] - np.mean(accs)) < 1e-9 and abs(m["top1_std"] - np.std(accs)) < 1e-9
    assert m["top1_mean"] > 40, m  # 10 classes: chance is 10%
    assert (res.path / "curves.png").stat().st_size > 0
    manifest = json.loads((res.path / "manifest.json").read_text())
    assert manifest["metrics"]["top1_mean"] == m["top1_mean"]
    assert not (res.path / ".ckpt").exists()


def test_random_baseline_matches_size_and_class_composition():
    rng = np.random.default_rng(0)
    pool = ImageSet(rng.integers(0, 255, (300, 8, 8, 3), dtype=np.uint8), np.repeat(np.arange(3), 100),
                    [str(i) for i in range(300)], [str(i) for i in range(300)], ["a", "b", "c"])
    soft = torch.zeros(7, 3)
    soft[:4, 0], soft[4:6, 1], soft[6:, 2] = 0.9, 0.8, 0.7  # a 'distilled' set: 4 / 2 / 1 per class
    ts = TrainSet(torch.zeros(7, 3, 8, 8), soft, 3, ["a", "b", "c"], pool=pool)
    x, y = select(ts, "baseline", ValidateParams(), seed=3)
    assert len(x) == 7 and class_counts(y, 3) == {0: 4, 1: 2, 2: 1} == class_counts(ts.targets, 3)
    x2, _ = select(ts, "baseline", ValidateParams(), seed=4)
    assert not torch.equal(x, x2), "the baseline subset is redrawn per seed"
    idx = balanced_subset(pool.labels, SubsetSpec(fraction=0.1), seed=0)
    assert len(idx) == 30 and np.bincount(pool.labels[idx]).tolist() == [10, 10, 10]


def test_out_of_fold_teachers_and_kd_validation(digits_shards, tmp_path, client):
    res = run_pipeline({"name": "t", "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "teacher", "inputs": {"data": str(digits_shards.path)},
         "params": {"recipe": "standard-dd", "overrides": {**SMALL, "epochs": 8}, "folds": 3}},
        {"name": "kd", "stage": "validate", "inputs": {"train": str(digits_shards.path), "teacher": "teacher"},
         "params": {"recipe": "standard-dd", "subset": {"ipc": 5}, "seeds": [0],
                    "overrides": {**SMALL, "loss": {"name": "mixed", "alpha": 0.7, "temperature": 4.0}}}},
    ]}, client)
    teacher, kd = res
    oof = pq.read_table(teacher.path / "oof_predictions.parquet").to_pylist()
    index = pq.read_table(digits_shards.path / "index.parquet").to_pylist()
    train_uids = [r["uid"] for r in index if r["split"] == "train"]
    assert [r["uid"] for r in oof] == train_uids  # every training sample, in order, exactly once
    held = [set(torch.load(teacher.path / "teachers" / f"fold_{k}.pt", weights_only=False)["held_out"]) for k in range(3)]
    assert set.union(*held) == set(train_uids) and sum(map(len, held)) == len(train_uids)
    assert all(abs(len(h) - len(train_uids) / 3) <= 1 for h in held)
    for r in oof:
        assert abs(sum(r["probs"]) - 1) < 1e-4 and r["pred"] == int(np.argmax(r["probs"]))
    assert json.loads((teacher.path / "metrics.json").read_text())["oof_top1"] > 50
    assert json.loads((kd.path / "metrics.json").read_text())["top1_mean"] > 40


def test_experts_stage_writes_a_readable_buffer(digits_shards, tmp_path, client):
    from distill.buffer import ExpertBuffer

    res = run_pipeline({"name": "e", "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "experts", "inputs": {"data": str(digits_shards.path)},
         "params": {"num_experts": 2, "epochs": 2, "network_kwargs": {"width": 8, "norm": "instancenorm"}}}]},
        client)[0]
    buf = ExpertBuffer(res.path / "experts")
    assert len(buf) == 2
    for e in buf:
        assert e.params.shape[0] == 3 and e.meta["test"]["top1"] > 10
    assert not torch.equal(buf[0].params[0], buf[1].params[0]), "experts start from different inits"


def test_streamed_training_covers_every_sample_and_learns(digits_shards, tmp_path, client):
    from stages.train.image_data import ShardStream, choose_mode

    assert choose_mode(digits_shards.path, "train", None, "auto") == "memory"
    assert choose_mode(digits_shards.path, "train", None, "auto", limit=1000) == "stream"
    stream = ShardStream(digits_shards.path, "train", num_workers=2)
    labels = torch.cat([y for _, y in stream.batches(64, seed=0)])
    index = pq.read_table(digits_shards.path / "index.parquet").to_pylist()
    assert sorted(labels.tolist()) == sorted(r["label"] for r in index if r["split"] == "train")  # once each
    res = run_pipeline({"name": "s", "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "val", "stage": "validate", "inputs": {"train": str(digits_shards.path)},
         "params": {"recipe": "standard-dd", "overrides": {**SMALL, "epochs": 3}, "seeds": [0], "data_mode": "stream"}}]},
        client)[0]
    m = json.loads((res.path / "metrics.json").read_text())
    assert m["n_train"] == len(stream) and m["top1_mean"] > 50, m
