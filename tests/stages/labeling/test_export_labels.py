"""Export carries labels: ``{key}.cls`` is the label to train with, ``{key}.soft.npy`` the dense soft row,
``{key}.labels.json`` the rest; drop rows are rejects (label-noise); the export trains on the same targets."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from conftest import run_pipeline
from curation_fakes import index
from labeling_fakes import noisy_digit_labels
from stages.labeling.export_members import soft_row
from stages.labeling.store import load_labels, soft_targets
from stages.train.training_sets import load_trainset


@pytest.fixture(scope="module")
def exported(digits_shards, tmp_path_factory, client):
    tmp = tmp_path_factory.mktemp("export")
    labels = noisy_digit_labels(tmp / "labels", digits_shards.path)
    res = run_pipeline({"name": "x", "output_dir": str(tmp / "run"), "stages": [
        {"name": "export", "inputs": {"data": str(digits_shards.path), "labels": str(labels)},
         "params": {"samples_per_shard": 400, "sample_grid": False}}]}, client)
    return labels, res[0].path


def test_exported_labels_read_back_with_plain_webdataset(digits_shards, exported):
    import webdataset as wds

    labels, out = exported
    m = json.loads((out / "manifest.json").read_text())
    table = load_labels(labels)
    drops = table.filter(pc.equal(table["action"], "drop"))
    kept = table.filter(pc.not_equal(table["action"], "drop"))
    n_train, n_test = index(digits_shards.path).num_rows, index(digits_shards.path, "test").num_rows
    c = m["counts"]
    assert c["in"] == c["out"] + c["rejected"] == n_train + n_test
    assert c["rejected_by_reason"] == {"label-noise": drops.num_rows} and c["out"] == kept.num_rows + n_test
    dense = dict(zip(kept.column("uid").to_pylist(), soft_targets(kept, 10)))
    row = {r["uid"]: r for r in kept.to_pylist()}
    samples = list(wds.WebDataset(str(out / m["metrics"]["read_with"]["train"]["pattern"]), shardshuffle=False)
                   .decode())
    assert len(samples) == kept.num_rows
    for s in samples:
        uid = s["json"]["uid"]
        assert np.array_equal(s["soft.npy"], dense[uid]) and s["soft.npy"].dtype == np.float32
        assert s["cls"] == row[uid]["label"] == s["labels.json"]["label"]
        assert s["labels.json"]["given"] == row[uid]["given"] and s["labels.json"]["multi"] == row[uid]["multi"]
        assert s["labels.json"]["action"] in ("keep", "relabel")
    assert any(s["cls"] != s["labels.json"]["given"] for s in samples), "relabelled rows carry the suggestion"
    test = list(wds.WebDataset(str(out / m["metrics"]["read_with"]["test"]["pattern"]), shardshuffle=False))
    assert len(test) == n_test and not any("soft.npy" in s for s in test)  # rows the labels do not describe


def test_training_on_the_export_gives_the_labels_artifacts_targets(exported):
    labels, out = exported
    direct, from_export = load_trainset(labels), load_trainset(out)
    assert from_export.info["targets"] == "soft" and from_export.uids == direct.uids
    assert torch.equal(from_export.targets, direct.targets) and torch.equal(from_export.images, direct.images)
    hard_direct, hard_export = load_trainset(labels, targets="hard"), load_trainset(out, targets="hard")
    assert torch.equal(hard_export.targets, hard_direct.targets)


def test_soft_row_equals_soft_targets():
    g = np.random.default_rng(0)
    for k in (1, 3, 10):
        idx = g.permutation(10)[:k]
        prob = np.sort(g.dirichlet(np.ones(k + 1))[:k])[::-1].astype(np.float32)
        import pyarrow as pa

        t = pa.table({"topk_index": pa.array([idx.tolist()], pa.list_(pa.int16())),
                      "topk_prob": pa.array([prob.tolist()], pa.list_(pa.float32()))})
        assert np.array_equal(soft_row(idx, prob, 10), soft_targets(t, 10)[0])
