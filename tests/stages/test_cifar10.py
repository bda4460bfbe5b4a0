"""The shared CIFAR-10 JPEG archive shards into 60,000 samples with the right labels."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest


pytestmark = pytest.mark.data
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def test_cifar10_archive_shards_into_60000_labelled_samples(cifar_shards):
    res = cifar_shards
    c = res.counts
    assert (c["in"], c["out"], c["rejected"]) == (60000, 60000, 0)
    assert c["splits"]["train"]["out"] == 50000 and c["splits"]["test"]["out"] == 10000
    assert json.loads((res.path / "classes.json").read_text()) == CIFAR_CLASSES
    index = pq.read_table(res.path / "index.parquet", columns=["source", "label", "label_name", "split", "width"]).to_pylist()
    for r in index:
        split, cls, _ = r["source"].split("/")
        assert r["split"] == split and r["label_name"] == cls and CIFAR_CLASSES[r["label"]] == cls
        assert r["width"] == 32
    per_class = {}
    for r in index:
        per_class[(r["split"], r["label"])] = per_class.get((r["split"], r["label"]), 0) + 1
    assert set(per_class.values()) == {5000, 1000}


def test_convnet_on_two_cifar_classes_beats_chance(cifar_shards):
    """A short ConvNet run on airplane vs automobile (1000 train images) is far above 50% on their test images."""
    import numpy as np
    import torch

    from stages.train.image_data import load_images
    from stages.train.recipes import load_recipe
    from stages.train.trainer import train
    from stages.train.training_sets import balanced_subset

    tr, te = load_images(cifar_shards.path, "train"), load_images(cifar_shards.path, "test")
    two = lambda s: np.flatnonzero(s.labels < 2)  # noqa: E731
    idx = two(tr)[balanced_subset(tr.labels[two(tr)], per_class={0: 500, 1: 500}, seed=0)]
    tidx = two(te)
    recipe = load_recipe("standard-dd", epochs=6, network_kwargs={"width": 32, "norm": "instancenorm"},
                         augmentation={"name": "crop_flip", "params": {"pad": 2, "flip": True}}, batch_size=64)
    res = train(torch.from_numpy(tr.images[idx]), torch.from_numpy(tr.labels[idx]), recipe, num_classes=2, seed=0,
                test=(torch.from_numpy(te.images[tidx]), torch.from_numpy(te.labels[tidx])))
    assert res.test["top1"] > 75, res.test
