"""Shards read back with tools we did not write: plain webdataset.WebDataset and DataLoader workers."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from conftest import make_tree, run_pipeline


@pytest.fixture(scope="module")
def shards(tmp_path_factory, client):
    tmp = tmp_path_factory.mktemp("consumers")
    make_tree(tmp / "src", per_class=7, splits=("train",), corrupt=True)
    res = run_pipeline({"name": "c", "output_dir": str(tmp / "run"), "source": {"kind": "folder", "path": str(tmp / "src")},
                        "stages": [{"name": "shard", "params": {"samples_per_shard": 6}}]}, client)[0]
    index = pq.read_table(res.path / "index.parquet").to_pylist()
    tars = sorted(str(p) for p in (res.path / "shards" / "train").glob("*.tar"))
    return tars, index


def test_plain_webdataset_reads_every_sample(shards):
    import webdataset as wds

    tars, index = shards
    ds = wds.WebDataset(tars, shardshuffle=False).decode("pil").to_tuple("__key__", "jpg;png", "cls", "json")
    seen = {}
    for key, img, cls, meta in ds:
        assert img.size == (32, 32)
        assert meta["key"] == key and meta["label"] == cls
        seen[key] = cls
    assert seen == {r["key"]: r["label"] for r in index}


def test_dataloader_workers_split_shards(shards):
    import torch
    import webdataset as wds

    tars, index = shards

    def to_tensor(sample):
        img, cls = sample
        return torch.from_numpy(__import__("numpy").asarray(img.convert("RGB"))).permute(2, 0, 1), cls

    ds = (wds.WebDataset(tars, shardshuffle=False, nodesplitter=None, workersplitter=wds.split_by_worker)
          .decode("pil").to_tuple("jpg;png", "cls").map(to_tensor).batched(4, partial=True))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2)
    labels = []
    for x, y in loader:
        assert x.dtype == torch.uint8 and x.shape[1:] == (3, 32, 32)
        labels.extend(y if isinstance(y, list) else y.tolist())
    assert sorted(labels) == sorted(r["label"] for r in index)


def test_stats_json_is_the_done_marker(shards):
    tars, index = shards
    from pathlib import Path

    total = 0
    for t in tars:
        stats = json.loads(Path(t).with_name(Path(t).stem + "_stats.json").read_text())
        total += stats["successes"]
        assert stats["count"] == stats["successes"] + stats["failed"]
    assert total == len(index)
