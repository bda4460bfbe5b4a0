"""The corrupt and relabel stages on digits: injected label noise is recorded exactly, out-of-fold teachers never
label a sample they trained on, and the samples whose labels were swapped are flagged (teacher, neighbours and
their combination); counts, actions, the picture and caching."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import run_pipeline
from curation_fakes import fake_embeddings
from pipeline.errors import InputError
from stages.corrupt import symmetric_noise
from stages.labeling.store import ACTIONS, load_labels
from stages.labeling.teacher import verify_out_of_fold
from stages.teacher import fold_of

RATE = 0.04
# a small, quick teacher that is good on digits (about 97% held-out accuracy at 16 px)
TEACHER = {"recipe": "standard-dd", "folds": 2, "seed": 0, "image_size": 16,
           "overrides": {"epochs": 5, "batch_size": 32, "lr": 0.05, "mtt_exact": False, "augmentation": {"name": "none"},
                         "network_kwargs": {"width": 16, "norm": "batchnorm", "depth": 2}}}


@pytest.fixture(scope="module")
def noisy_run(digits_shards, tmp_path_factory, client):
    out = tmp_path_factory.mktemp("noisy") / "run"
    manifest = {"name": "noisy", "output_dir": str(out), "stages": [
        {"name": "corrupt", "inputs": {"data": str(digits_shards.path)},
         "params": {"rate": RATE, "seed": 3, "samples_per_shard": 800}},
        {"name": "teacher", "inputs": {"data": "corrupt"}, "params": TEACHER},
        {"name": "relabel", "inputs": {"data": "corrupt", "teacher": "teacher"},
         "params": {"sources": [{"source": "teacher"}], "action": "relabel", "flags_shown": 16}},
    ]}
    results = {r.name: r for r in run_pipeline(manifest, client)}
    return manifest, results


def test_symmetric_noise_is_exact_seeded_and_never_keeps_the_class():
    labels = np.repeat(np.arange(5), 40)
    labels[:3] = -1  # unlabelled rows are never touched
    noisy = symmetric_noise(labels, 5, 0.2, seed=1)
    changed = noisy != labels
    assert changed.sum() == round(0.2 * 197) and not changed[:3].any()
    assert np.all((noisy[changed] >= 0) & (noisy[changed] < 5))
    assert np.array_equal(noisy, symmetric_noise(labels, 5, 0.2, seed=1))
    assert not np.array_equal(noisy, symmetric_noise(labels, 5, 0.2, seed=2))
    # the new class is uniform over the other classes
    big = symmetric_noise(np.zeros(20000, int), 5, 1.0, seed=0)
    counts = np.bincount(big, minlength=5)
    assert counts[0] == 0 and np.all(np.abs(counts[1:] - 5000) < 300)


def test_corrupt_records_the_truth_and_keeps_images_keys_and_uids(noisy_run, digits_shards):
    _, res = noisy_run
    art = res["corrupt"].path
    noise = pq.read_table(art / "noise.parquet").to_pandas()
    clean = pq.read_table(digits_shards.path / "index.parquet").to_pandas().set_index("uid")
    out = pq.read_table(art / "index.parquet").to_pandas().set_index("uid")
    train = clean[clean.split == "train"]
    assert len(noise) == len(train) and noise.corrupted.sum() == round(RATE * len(train))
    assert (noise.clean_label.values == train.loc[noise.uid, "label"].values).all()
    assert (noise.noisy_label.values == out.loc[noise.uid, "label"].values).all()
    assert (noise.corrupted == (noise.clean_label != noise.noisy_label)).all()
    assert (out.loc[clean.index, "sha256"] == clean["sha256"]).all() and (out.loc[clean.index, "key"] ==
                                                                          clean["key"]).all()
    test = clean[clean.split == "test"]
    assert (out.loc[test.index, "label"] == test["label"]).all(), "other splits pass through clean"
    # the tar members carry the noisy label too (what webdataset readers see)
    import tarfile

    flipped = noise[noise.corrupted].iloc[0]
    row = out.loc[flipped.uid]
    with tarfile.open(art / "shards" / "train" / f"{row['shard']:05d}.tar") as tar:
        cls = tar.extractfile(f"{row['key']}.cls").read().decode()
    assert int(cls) == flipped.noisy_label != flipped.clean_label
    m = json.loads((art / "manifest.json").read_text())
    assert m["metrics"]["noise"]["corrupted"] == noise.corrupted.sum() == m["counts"]["corrupted"]
    assert sum(m["metrics"]["noise"]["per_class"].values()) == noise.corrupted.sum()


def test_out_of_fold_predictions_never_come_from_a_model_that_trained_on_the_sample(noisy_run, tmp_path):
    _, res = noisy_run
    teacher = res["teacher"].path
    assert verify_out_of_fold(teacher) == {"folds": 2, "rows": 1438}
    uids = pq.read_table(teacher / "oof_predictions.parquet").column("uid").to_pylist()
    fold = fold_of(len(uids), 2, TEACHER["seed"])  # the teacher's own fold assignment, recomputed
    for k in range(2):
        ck = torch.load(teacher / "teachers" / f"fold_{k}.pt", weights_only=True)
        trained_on = {u for u, f in zip(uids, fold) if f != k}
        with np.load(teacher / "oof" / f"fold_{k}.npz") as z:
            predicted = {uids[i] for i in z["index"]}
        assert predicted and not predicted & trained_on
        assert set(ck["held_out"]) == predicted
    # a teacher whose records show fold 0 predicting a sample it trained on is refused
    bad = tmp_path / "bad"
    shutil.copytree(teacher, bad)
    with np.load(bad / "oof" / "fold_0.npz") as z:
        index, probs = z["index"].copy(), z["probs"]
    index[0] = int(np.flatnonzero(fold != 0)[0])
    np.savez(bad / "oof" / "fold_0.npz", index=index, probs=probs)
    with pytest.raises(InputError, match="trained on"):
        verify_out_of_fold(bad)


def _flag_quality(labels_art, corrupt_art):
    lab = load_labels(labels_art).to_pandas().set_index("uid")
    noise = pq.read_table(corrupt_art / "noise.parquet").to_pandas().set_index("uid")
    truth = noise.loc[lab.index, "corrupted"].values
    flagged = lab.flagged.values
    recall = (flagged & truth).sum() / truth.sum()
    precision = (flagged & truth).sum() / max(flagged.sum(), 1)
    return lab, noise, recall, precision


def test_swapped_labels_are_flagged_and_relabelled_to_the_truth(noisy_run):
    _, res = noisy_run
    lab, noise, recall, precision = _flag_quality(res["relabel"].path, res["corrupt"].path)
    assert recall >= 0.8 and precision >= 0.6, (recall, precision)
    relabelled = lab[lab.action == "relabel"]
    assert (relabelled.label == relabelled.suggested).all() and (relabelled.suggested != relabelled.given).all()
    assert (lab[lab.action == "keep"].label == lab[lab.action == "keep"].given).all()
    fixed = (relabelled.suggested.values == noise.loc[relabelled.index, "clean_label"].values).mean()
    assert fixed >= 0.8, fixed
    # the flagged ones score worse than the rest
    assert lab[lab.flagged].noise_score.min() > lab[~lab.flagged].noise_score.median()
    # soft labels: top-k descending, multi-label sets contain the training label
    first = lab.iloc[0]
    assert list(first.topk_prob) == sorted(first.topk_prob, reverse=True) and len(first.topk_index) == 5
    assert all(int(r.label) in list(r.multi) for r in lab.itertuples())


def test_counts_actions_picture_and_cache(noisy_run, client):
    manifest, res = noisy_run
    m = json.loads((res["relabel"].path / "manifest.json").read_text())
    c = m["counts"]
    assert c["in"] == 1438 == c["out"] + c["rejected"] and c["rejected"] == 0
    assert set(c["breakdown"]) == set(ACTIONS) and sum(c["breakdown"].values()) == c["out"]
    assert c["breakdown"]["relabel"] == c["flagged"] > 0 and c["breakdown"]["drop"] == 0
    assert m["metrics"]["num_classes"] == 10 and len(m["metrics"]["confident_joint"]) == 10
    assert 0 < m["metrics"]["noise_rate"] < 0.2
    assert (res["relabel"].path / "flags.png").stat().st_size > 0
    assert {"flags.png", "rejects.parquet"} <= {f["path"] for f in m["files"]}
    from typer.testing import CliRunner

    from pipeline.cli import app

    shown = CliRunner().invoke(app, ["status", manifest["output_dir"]], env={"COLUMNS": "250"})
    b = c["breakdown"]
    assert all(f"{a}: {b[a]}" in shown.stdout for a in ACTIONS), shown.stdout
    again = {r.name: r for r in run_pipeline(manifest, client)}
    assert all(r.status == "cached" for r in again.values()), {n: r.status for n, r in again.items()}
    # another action re-runs relabel only, from the same teacher
    manifest["stages"][2]["params"].update(action="drop")
    dropped = {r.name: r for r in run_pipeline(manifest, client)}
    assert dropped["teacher"].status == "cached" and dropped["relabel"].status == "ran"
    d = json.loads((dropped["relabel"].path / "manifest.json").read_text())["counts"]
    assert d["breakdown"] == {"keep": c["breakdown"]["keep"], "relabel": 0, "drop": c["flagged"]}


def test_neighbours_and_combined_sources_flag_the_swaps(noisy_run, tmp_path, client):
    """kNN on (normalised) pixels is a good digits classifier, so it is a cheap stand-in for CLIP embeddings."""
    from stages.train.image_data import load_images

    _, res = noisy_run
    corrupt = res["corrupt"].path
    imgs = load_images(corrupt, "train")
    x = imgs.images.reshape(len(imgs.labels), -1).astype(np.float32)
    x -= x.mean(0)
    emb = fake_embeddings(tmp_path / "emb", corrupt, x)
    runs = {}
    for name, sources in {"nb": [{"source": "neighbours", "k": 10}],
                          "both": [{"source": "teacher", "weight": 0.5}, {"source": "neighbours", "k": 10,
                                                                         "weight": 0.5}]}.items():
        runs[name] = run_pipeline({"name": name, "output_dir": str(tmp_path / name), "stages": [
            {"name": "relabel", "inputs": {"data": str(corrupt), "embeddings": str(emb),
                                           "teacher": str(res["teacher"].path)},
             "params": {"sources": sources, "flags_shown": 0}}]}, client)[0]
        _, _, recall, precision = _flag_quality(runs[name].path, corrupt)
        assert recall >= 0.8 and precision >= 0.6, (name, recall, precision)
    m = json.loads((runs["both"].path / "manifest.json").read_text())["metrics"]
    assert [s["weight"] for s in m["sources"]["sources"]] == [0.5, 0.5]


def test_a_selection_is_labelled_on_its_kept_rows_and_rows_without_values_are_rejects(tmp_path, client):
    from curation_fakes import Ctx, fake_pool, fake_selection, index, uid, write_manifest
    from stages.embedders.store import write_part
    from stages.sharding.pool import pool_record

    labels = np.repeat([0, 1, 2], 30)
    pool = fake_pool(tmp_path / "pool", labels, test=5)
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 12))
    vec = centres[labels] + 0.1 * rng.normal(size=(90, 12))
    emb = tmp_path / "emb"  # the last 10 rows have no embedding
    write_part(Ctx(emb), 0, vec[:80], index(pool).slice(0, 80).select(["key", "uid", "split", "shard", "label"]))
    write_manifest(emb, "embeddings", "embed", {"pool": pool_record(pool), "parts": [0]})
    keep = {uid(i) for i in range(90) if i % 3 != 0}  # 60 kept
    sel = fake_selection(tmp_path / "sel", pool, keep)
    res = run_pipeline({"name": "s", "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "relabel", "inputs": {"data": str(sel), "embeddings": str(emb)},
         "params": {"sources": [{"source": "neighbours", "k": 5}], "action": "drop", "flags_shown": 0}}]},
        client)[0]
    m = json.loads((res.path / "manifest.json").read_text())
    no_emb = sum(1 for i in range(80, 90) if uid(i) in keep)
    assert m["counts"]["in"] == 60 and m["counts"]["rejected"] == no_emb and m["counts"]["out"] == 60 - no_emb
    assert m["counts"]["rejected_by_reason"] == {"neighbours: no embedding for this row": no_emb}
    lab = load_labels(res.path)
    assert set(lab.column("uid").to_pylist()) <= keep and lab.num_rows == 60 - no_emb
    rej = pq.read_table(res.path / "rejects.parquet")
    assert rej.num_rows == no_emb and set(rej.column("uid").to_pylist()) <= keep
    assert m["metrics"]["pool"]["path"] == str(pool.resolve()) and index(pool).num_rows == 90
    assert m["counts"]["flagged"] == 0  # well separated clusters, correct labels


@pytest.mark.parametrize("name", ["cifar10-noisy", "cifar10-noisy-gpu", "digits-noisy", "cifar10-curate"])
def test_noise_manifests_load_and_bind_kinds(name):
    from pathlib import Path

    from pipeline.config import load_manifest

    m = load_manifest(Path(__file__).resolve().parents[3] / "manifests" / f"{name}.yaml", [])
    steps = {s.name: s for s in m.stages}
    relabels = [s for s in steps.values() if s.stage == "relabel" or s.name == "relabel"]
    assert relabels and all("data" in s.inputs for s in relabels)


def test_decide_topk_and_multi_labels():
    from stages.relabel import decide, multi_labels, top_k

    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.45, 0.45], [0.5, 0.4, 0.1]])
    given = np.array([1, 0, 0])
    flagged = np.array([True, True, False])
    suggested, act, label = decide(given, probs, flagged, "relabel", None)
    assert suggested.tolist() == [0, 1, 0] and act.tolist() == ["relabel", "relabel", "keep"]
    assert label.tolist() == [0, 1, 0]
    _, act, label = decide(given, probs, flagged, "relabel", min_confidence=0.5)
    assert act.tolist() == ["relabel", "drop", "keep"] and label.tolist() == [0, 0, 0]
    _, act, label = decide(given, probs, flagged, "keep", min_confidence=0.5)
    assert act.tolist() == ["keep", "keep", "keep"] and label.tolist() == given.tolist()
    idx, p = top_k(probs, 2)
    assert idx.tolist() == [[0, 1], [1, 2], [0, 1]] and np.allclose(p, [[0.7, 0.2], [0.45, 0.45], [0.5, 0.4]])
    assert multi_labels(probs, np.array([2, 1, 0]), 0.3) == [[2, 0], [1, 2], [0, 1]]


def test_corrupt_is_deterministic(digits_shards, tmp_path, client):
    from conftest import tree_bytes

    trees = []
    for run in ("a", "b"):
        res = run_pipeline({"name": run, "output_dir": str(tmp_path / run), "stages": [
            {"name": "corrupt", "inputs": {"data": str(digits_shards.path)},
             "params": {"rate": 0.2, "seed": 1, "samples_per_shard": 700, "sample_grid": False}}]}, client)[0]
        trees.append(tree_bytes(res.path))
    assert trees[0] == trees[1] and any(k.endswith("noise.parquet") for k in trees[0])


def test_relabel_writes_label_maps_from_its_teacher_folds(noisy_run, tmp_path, client):
    """``label_maps:`` makes the relabel stage write ReLabel maps beside its labels (every labelled row, each by the
    fold that held it out); a ConvNet teacher (no spatial map before its classifier) is refused by name."""
    from stages.labeling.label_maps import load_maps
    from stages.labeling.store import MAPS_DIR

    _, res = noisy_run
    corrupt = res["corrupt"].path
    air = {"recipe": "fast", "folds": 2, "seed": 0,
           "overrides": {"epochs": 1, "batch_size": 128, "network_kwargs": {"width": 8}}}
    out = run_pipeline({"name": "maps", "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "teacher", "inputs": {"data": str(corrupt)}, "params": air},
        {"name": "relabel", "inputs": {"data": str(corrupt), "teacher": "teacher"},
         "params": {"sources": [{"source": "teacher"}], "label_maps": {"size": 4, "k": 3}, "flags_shown": 0}}]},
        client)[-1]
    m = json.loads((out.path / "manifest.json").read_text())
    labels = load_labels(out.path, "train")
    assert sorted((out.path / MAPS_DIR / "train").glob("*.npz")) and m["metrics"]["label_maps"]
    maps = load_maps(out.path, "train", labels.column("uid").to_pylist())  # every labelled row has its map
    assert tuple(maps.index.shape) == (labels.num_rows, 3, 4, 4) and maps.score.dtype == torch.float16
    with pytest.raises(Exception, match="(?i)convnet"):
        run_pipeline({"name": "maps2", "output_dir": str(tmp_path / "run2"), "stages": [
            {"name": "relabel", "inputs": {"data": str(corrupt), "teacher": str(res["teacher"].path)},
             "params": {"sources": [{"source": "teacher"}], "label_maps": {"size": 4, "k": 3}}}]}, client)
