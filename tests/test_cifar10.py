"""The shared CIFAR-10 JPEG archive shards into 60,000 samples with the right labels."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from conftest import CIFAR_TAR, run_pipeline

pytestmark = pytest.mark.data
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


@pytest.mark.skipif(not CIFAR_TAR.is_file(), reason=f"CIFAR-10 archive not found at {CIFAR_TAR} (../shared/data)")
def test_cifar10_archive_shards_into_60000_labelled_samples(tmp_path, client):
    res = run_pipeline({"name": "cifar", "output_dir": str(tmp_path / "run"),
                        "source": {"kind": "tar", "path": str(CIFAR_TAR)},
                        "stages": [{"name": "shard", "params": {"samples_per_shard": 10000}}]}, client)[0]
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
