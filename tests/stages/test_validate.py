"""The trainer as DAG stages: validate (seeds, subsets, baselines, KD, model spaces, resume), teachers
(out-of-fold, weights-only), experts, synthetic sets, artifact identity."""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import run_pipeline
from pipeline.stage import InputArtifact, Task, TaskContext
from stages.teacher import Teacher, load_teacher
from stages.train.image_data import ImageSet, load_images
from stages.train.losses import SoftLabels
from stages.train.model_space import fixed
from stages.train.networks import create_network
from stages.train.recipes import load_recipe
from stages.train.stage_support import pool_stats, resolve_model_space
from stages.train.synthetic_set import SyntheticSet, write_synthetic_artifact
from stages.train.trainer import train
from stages.train.training_sets import SubsetSpec, TrainSet, balanced_subset, class_counts, load_trainset
from stages.validate import ValidateParams, ValidateStage, select

SMALL = {"epochs": 25, "network_kwargs": {"width": 16, "norm": "instancenorm"}}
TINY = {"epochs": 2, "network_kwargs": {"width": 8, "norm": "instancenorm"}}


def metrics(res) -> dict:
    return json.loads((res.path / "metrics.json").read_text())


def test_validate_subset_reports_mean_std_over_seeds(digits_shards, tmp_path, client):
    res = run_pipeline({"name": "v", "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "val", "stage": "validate", "inputs": {"train": str(digits_shards.path)},
         "params": {"recipe": "standard-dd", "overrides": SMALL, "subset": {"ipc": 5}, "seeds": [0, 1]}}]}, client)[0]
    m = metrics(res)
    assert m["n_train"] == 50 and m["subset"] == "ipc5"
    assert set(m["per_seed"]) == {"0", "1"} and m["seeds"] == [0, 1]
    accs = list(m["per_seed"].values())
    assert abs(m["top1_mean"] - np.mean(accs)) < 1e-9 and abs(m["top1_std"] - np.std(accs)) < 1e-9
    assert m["top1_mean"] > 40, m  # 10 classes: chance is 10%
    assert (m["epochs"], m["epochs_run"], m["mtt_exact"]) == (25, 26, True)
    assert m["model_space"] == fixed((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)).describe()
    assert m["baseline"] == {"trained": False, "reason": "subset: the run itself is a random subset"}
    assert (res.path / "curves.png").stat().st_size > 0
    manifest = json.loads((res.path / "manifest.json").read_text())
    assert manifest["metrics"]["top1_mean"] == m["top1_mean"]
    assert not (res.path / ".ckpt").exists()
    assert not (digits_shards.path / "cache").exists(), "nothing is written into an upstream artifact"
    assert list((Path(os.environ["DISTILLERY_CACHE_DIR"]) / "images").glob(f"{digits_shards.artifact_id}-train-*.npy"))


def test_random_baseline_matches_size_composition_and_labelling():
    rng = np.random.default_rng(0)
    pool = ImageSet(rng.integers(0, 255, (300, 8, 8, 3), dtype=np.uint8), np.repeat(np.arange(3), 100),
                    [str(i) for i in range(300)], [str(i) for i in range(300)], ["a", "b", "c"])
    hard = torch.tensor([0, 0, 0, 0, 1, 1, 2])  # a 'distilled' set: 4 / 2 / 1 per class
    ts = TrainSet(torch.zeros(7, 3, 8, 8), hard, 3, ["a", "b", "c"], pool=pool)
    x, y = select(ts, "baseline", ValidateParams(), seed=3)
    assert len(x) == 7 and class_counts(y, 3) == {0: 4, 1: 2, 2: 1} == class_counts(ts.targets, 3)
    x2, _ = select(ts, "baseline", ValidateParams(), seed=4)
    assert not torch.equal(x, x2), "the baseline subset is redrawn per seed"
    idx = balanced_subset(pool.labels, SubsetSpec(fraction=0.1), seed=0)
    assert len(idx) == 30 and np.bincount(pool.labels[idx]).tolist() == [10, 10, 10]
    # a soft-label set's baseline is labelled by the same teacher, in the set's stored form
    soft = torch.nn.functional.one_hot(hard, 3).float() * 0.8 + 0.2 / 3
    torch.manual_seed(0)
    labeller = Teacher(create_network("convnet", 3, image_size=8, width=4, depth=1), fixed((0.5,) * 3, (0.25,) * 3), {})
    form = SoftLabels(kind="probs", temperature=4.0)
    ts = TrainSet(torch.zeros(7, 3, 8, 8), soft, 3, ["a", "b", "c"], pool=pool, soft_labels=form)
    xs, ys = select(ts, "baseline", ValidateParams(), seed=3, labeller=labeller)
    assert torch.equal(xs, x) and ys.shape == (7, 3)
    torch.testing.assert_close(ys, torch.softmax(labeller.logits(xs) / 4.0, 1))
    with pytest.raises(ValueError, match="teacher that labelled"):
        select(ts, "baseline", ValidateParams(), seed=3)


def test_pool_statistics_come_from_image_stats_or_a_stated_sample(digits_shards, tmp_path):
    fake = tmp_path / "pool"
    fake.mkdir()
    manifest = json.loads((digits_shards.path / "manifest.json").read_text())
    manifest["metrics"]["image_stats"] = {"split": "train", "mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6],
                                          "images": 1438, "seed": 0}
    (fake / "manifest.json").write_text(json.dumps(manifest))
    space, info = pool_stats(fake, "train", None)
    assert space.describe()["mean"] == [0.1, 0.2, 0.3] and info["source"] == "image_stats"
    manifest["metrics"].pop("image_stats")
    (fake / "manifest.json").write_text(json.dumps(manifest))
    for name in ("index.parquet", "classes.json", "shards"):
        os.symlink(digits_shards.path / name, fake / name)
    space, info = pool_stats(fake, "train", None)
    assert info["source"] == "sampled" and "no image_stats" in info["reason"] and info["seed"] == 0
    whole = torch.from_numpy(load_images(fake, "train").images).permute(0, 3, 1, 2).double() / 255
    np.testing.assert_allclose(space.mean, whole.mean((0, 2, 3)).numpy(), atol=1e-9)  # 1438 < sample size: all


def _teacher(digits_shards, tmp_path, client, **params):
    return run_pipeline({"name": "t", "output_dir": str(tmp_path / "teach"), "stages": [
        {"name": "teacher", "inputs": {"data": str(digits_shards.path)},
         "params": {"recipe": "standard-dd", "overrides": {**SMALL, "epochs": 8}, **params}}]}, client)[0]


def test_out_of_fold_teachers_and_kd_validation(digits_shards, tmp_path, client):
    teacher = _teacher(digits_shards, tmp_path, client, folds=3)
    kd = run_pipeline({"name": "k", "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "kd", "stage": "validate", "inputs": {"train": str(digits_shards.path), "teacher": str(teacher.path)},
         "params": {"recipe": "standard-dd", "subset": {"ipc": 5}, "seeds": [0],
                    "overrides": {**SMALL, "normalization": {"kind": "pool"},
                                  "loss": {"name": "mixed", "alpha": 0.7, "temperature": 4.0}}}},
    ]}, client)[0]
    oof = pq.read_table(teacher.path / "oof_predictions.parquet").to_pylist()
    index = pq.read_table(digits_shards.path / "index.parquet").to_pylist()
    train_uids = [r["uid"] for r in index if r["split"] == "train"]
    assert [r["uid"] for r in oof] == train_uids  # every training sample, in order, exactly once
    held = [set(torch.load(teacher.path / "teachers" / f"fold_{k}.pt", weights_only=True)["held_out"])
            for k in range(3)]
    assert set.union(*held) == set(train_uids) and sum(map(len, held)) == len(train_uids)
    assert all(abs(len(h) - len(train_uids) / 3) <= 1 for h in held)
    for r in oof:
        assert abs(sum(r["probs"]) - 1) < 1e-4 and r["pred"] == int(np.argmax(r["probs"]))
    assert metrics(teacher)["oof_top1"] > 50
    m = metrics(kd)
    assert m["top1_mean"] > 40
    # the student trained in the pool's space; the teacher (MTT constants) saw its views through a bridge
    assert m["model_space"]["mean"] != [0.4914, 0.4822, 0.4465] and m["model_space_source"]["artifact"]


class _Boom:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_teachers_and_synthetic_sets_never_unpickle(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "t" / "teachers").mkdir(parents=True)
    with open(tmp_path / "t" / "teachers" / "fold_0.pt", "wb") as f:
        torch.save({"format": "distillery.teacher.v2", "evil": _Boom()}, f)
    with pytest.raises(ValueError, match="weights only"):
        load_teacher(tmp_path / "t")
    from stages.train.synthetic_set import SYNTHETIC_FILE, SyntheticSetError, load_synthetic_set

    (tmp_path / "s").mkdir()
    (tmp_path / "s" / SYNTHETIC_FILE).write_bytes(pickle.dumps(_Boom()))
    with pytest.raises(SyntheticSetError, match="unreadable"):
        load_synthetic_set(tmp_path / "s" / SYNTHETIC_FILE)
    assert not (tmp_path / "pwned").exists()


def _subset(digits_shards, ipc: int = 5, seed: int = 0):
    pool = load_images(digits_shards.path, "train")
    idx = balanced_subset(pool.labels, SubsetSpec(ipc=ipc), seed=seed)
    return pool, torch.from_numpy(pool.images[idx]).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(pool.labels[idx])


def test_float_synthetic_set_validates_exactly_like_its_uint8_source(digits_shards, tmp_path, client):
    """A real subset normalised with the pool's statistics, stored as a synthetic set, gives the same accuracy as
    the uint8 subset trained directly; the test split is mapped into the set's space; its baseline runs."""
    pool, x, y = _subset(digits_shards)
    ts = load_trainset(digits_shards.path)
    overrides = {**SMALL, "epochs": 10, "normalization": {"kind": "pool"}}
    recipe = load_recipe("standard-dd", **overrides)
    space, _ = resolve_model_space(ts, recipe, Path(os.environ["DISTILLERY_CACHE_DIR"]))
    art = write_synthetic_artifact(tmp_path / "syn", SyntheticSet(
        space.encode(x), y, pool.classes, space,
        pool={"artifact": str(digits_shards.path), "artifact_id": digits_shards.artifact_id, "split": "train"}))
    res = run_pipeline({"name": "s", "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "val", "stage": "validate", "inputs": {"train": str(art), "test": str(digits_shards.path)},
         "params": {"recipe": "standard-dd", "overrides": overrides, "seeds": [0]}}]}, client)[0]
    m = metrics(res)
    test = load_images(digits_shards.path, "test")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as on the 1-thread Dask worker: the same reduction order, so the same floats
    try:
        direct = train(x, y, recipe, num_classes=10, seed=0, space=space,
                       test=(torch.from_numpy(test.images), torch.from_numpy(test.labels)))
    finally:
        torch.set_num_threads(threads)
    assert m["per_seed"]["0"] == direct.test["top1"] and m["top1_mean"] > 40
    assert m["model_space"] == space.describe() and m["model_space_source"]["source"] == "the set's recorded model space"
    assert m["baseline"]["trained"] and m["random_baseline"]["n_train"] == 50


def test_soft_label_set_baseline_is_labelled_by_its_teacher_or_skipped_with_a_reason(digits_shards, tmp_path, client):
    pool, x, y = _subset(digits_shards, ipc=3)
    teacher_art = _teacher(digits_shards, tmp_path, client)
    teacher = load_teacher(teacher_art.path)
    form = SoftLabels(kind="probs", temperature=2.0)
    soft = form.from_logits(teacher.logits(x))
    space = teacher.space
    where = {"artifact": str(digits_shards.path), "artifact_id": digits_shards.artifact_id, "split": "train"}
    unlabelled = write_synthetic_artifact(tmp_path / "a", SyntheticSet(space.encode(x), soft, pool.classes, space,
                                                                       form, pool=where))
    labelled = write_synthetic_artifact(tmp_path / "b", SyntheticSet(
        space.encode(x), soft, pool.classes, space, form, pool=where, labeller={"artifact": str(teacher_art.path)}))
    params = {"recipe": "standard-dd", "seeds": [0], "overrides": {**TINY, "loss": {"name": "kd", "temperature": 2.0}}}
    a, b = run_pipeline({"name": "s", "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "a", "stage": "validate", "inputs": {"train": str(unlabelled), "test": str(digits_shards.path)},
         "params": params},
        {"name": "b", "stage": "validate", "inputs": {"train": str(labelled), "test": str(digits_shards.path)},
         "params": params}]}, client)
    ma, mb = metrics(a), metrics(b)
    assert not ma["baseline"]["trained"] and "labeller" in ma["baseline"]["reason"] and "random_baseline" not in ma
    assert mb["baseline"]["trained"] and "same teacher" in mb["baseline"]["reason"]
    assert mb["random_baseline"]["n_train"] == 30


def test_zca_space_is_fitted_once_into_the_cache_and_shared(digits_shards, tmp_path, client):
    params = {"recipe": "standard-dd-zca", "overrides": TINY, "subset": {"ipc": 2}, "seeds": [0, 1]}
    res = run_pipeline({"name": "z", "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "val", "stage": "validate", "inputs": {"train": str(digits_shards.path)}, "params": params}]},
        client)[0]
    m = metrics(res)
    assert m["model_space"]["kind"] == "zca" and m["model_space"]["eps"] == 0.1
    assert m["model_space"]["fitted_on"] == {"artifact_id": digits_shards.artifact_id, "split": "train",
                                             "size": None, "images": 1438}
    cached = Path(m["model_space_source"]["cache"])
    assert cached.is_file() and cached.parent == Path(os.environ["DISTILLERY_CACHE_DIR"]) / "zca"
    assert digits_shards.artifact_id in cached.name and not (digits_shards.path / "zca").exists()


def test_experts_stage_learns_and_records_its_model_space(digits_shards, tmp_path, client):
    from distill.buffer import ExpertBuffer
    from stages.train.model_space import load_space

    res = run_pipeline({"name": "e", "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "experts", "inputs": {"data": str(digits_shards.path)},
         "params": {"num_experts": 2, "overrides": {"epochs": 4, "lr": 0.05, "batch_size": 128,
                                                     "network_kwargs": {"width": 16}}}}]}, client)[0]
    buf = ExpertBuffer(res.path / "experts")
    assert len(buf) == 2
    for e in buf:
        assert e.params.shape[0] == 5 and e.meta["test"]["top1"] > 70, e.meta["test"]  # chance: 10%
    assert not torch.equal(buf[0].params[0], buf[1].params[0]), "experts start from different inits"
    space = load_space(res.path / "model_space.safetensors")
    assert space.describe() == buf[0].meta["model_space"] == metrics_of(res)["model_space"]


def metrics_of(res) -> dict:
    return json.loads((res.path / "manifest.json").read_text())["metrics"]


def test_a_killed_validate_task_resumes_mid_run_and_reports_progress(digits_shards, tmp_path):
    params = ValidateParams(recipe="standard-dd", overrides={**TINY, "epochs": 4}, subset={"ipc": 2}, seeds=[0])
    inputs = {"train": InputArtifact(digits_shards.path)}
    task = Task(id="set-seed0", payload={"kind": "set", "seed": 0})

    class Killed(RuntimeError):
        pass

    def ctx(out: Path, events: list, kill_at: int | None = None) -> TaskContext:
        def progress(task_id, done, total, m):
            events.append((done, total))
            if done == kill_at:
                raise Killed
        return TaskContext(out, inputs, task_id=task.id, progress=progress,
                           cache_dir=Path(os.environ["DISTILLERY_CACHE_DIR"]))

    whole: list = []
    full = ValidateStage().run(task, params, ctx(tmp_path / "a", whole))
    assert whole == [(e, 5) for e in range(1, 6)]  # per epoch, of epochs + 1 (MTT-exact)
    first: list = []
    with pytest.raises(Killed):
        ValidateStage().run(task, params, ctx(tmp_path / "b", first, kill_at=3))
    assert (tmp_path / "b" / ".ckpt" / task.id / "last.pt").is_file()
    rest: list = []
    resumed = ValidateStage().run(task, params, ctx(tmp_path / "b", rest))
    assert rest == [(4, 5), (5, 5)] and resumed["test"] == full["test"]


def _identity(tmp_path, digits_shards, params: dict) -> str:
    from pipeline.config import PipelineManifest
    from pipeline.runner import Runner

    m = PipelineManifest.model_validate({"name": "i", "output_dir": str(tmp_path / "ids"), "stages": [
        {"name": "val", "stage": "validate", "inputs": {"train": str(digits_shards.path)}, "params": params}]})
    runner = Runner(m, client=object(), show_progress=False)
    return runner.identify(runner.steps[0], runner.external_inputs())[0]


def test_artifact_id_hashes_the_resolved_recipe_not_its_name(digits_shards, tmp_path, client):
    yaml_path = tmp_path / "mine.yaml"
    base = (Path(__file__).resolve().parents[2] / "stages/train/recipes/standard-dd.yaml").read_text()
    yaml_path.write_text(base)
    params = {"recipe": str(yaml_path), "overrides": {**TINY, "epochs": 1}, "subset": {"ipc": 2}, "seeds": [0]}
    first = _identity(tmp_path, digits_shards, params)
    yaml_path.write_text(base.replace("weight_decay: 0.0005", "weight_decay: 0.001"))
    assert _identity(tmp_path, digits_shards, params) != first, "editing the recipe file changes the id"
    yaml_path.write_text(base)
    assert _identity(tmp_path, digits_shards, params) == first
    for execution in ({"device": "cpu"}, {"data_mode": "memory"}, {"eval_every": 1}, {"save_models": True}):
        assert _identity(tmp_path, digits_shards, {**params, **execution}) == first, execution
    # seeds left to the recipe resolve to its eval_seeds: the id follows the recipe file
    auto = _identity(tmp_path, digits_shards, {**params, "seeds": None})
    yaml_path.write_text(base.replace("eval_seeds: 5", "eval_seeds: 3"))
    assert _identity(tmp_path, digits_shards, {**params, "seeds": None}) != auto
    yaml_path.write_text(base)
    # and the edited recipe really re-runs what depends on it (the unchanged one is a cache hit)
    manifest = {"name": "r", "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "val", "stage": "validate", "inputs": {"train": str(digits_shards.path)}, "params": params}]}
    assert run_pipeline(manifest, client)[0].status == "ran"
    assert run_pipeline(manifest, client)[0].status == "cached"
    yaml_path.write_text(base.replace("weight_decay: 0.0005", "weight_decay: 0.001"))
    assert run_pipeline(manifest, client)[0].status == "ran"


def test_validate_without_seeds_uses_the_recipes_evaluation_networks():
    assert ValidateParams(recipe="standard-dd").resolved_seeds() == [0, 1, 2, 3, 4]
    assert ValidateParams(recipe="datadam").resolved_seeds() == list(range(10))
    assert ValidateParams(recipe="fast").resolved_seeds() == [0, 1, 2]
    assert ValidateParams(recipe="standard-dd", seeds=[7]).resolved_seeds() == [7]


def test_streamed_training_learns(digits_shards, tmp_path, client):
    res = run_pipeline({"name": "s", "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "val", "stage": "validate", "inputs": {"train": str(digits_shards.path)},
         "params": {"recipe": "standard-dd", "overrides": {**SMALL, "epochs": 3, "normalization": {"kind": "pool"}},
                    "seeds": [0], "data_mode": "stream"}}]}, client)[0]
    m = metrics(res)
    assert m["n_train"] == 1438 and m["data_mode"] == "stream" and m["top1_mean"] > 50, m
