"""The curation artifact formats: embeddings (clip-retrieval / NeMo layout), clusters, selections (DataComp)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.embedders.store import load_embeddings, part_files, write_part
from stages.selections.store import datacomp_contains, load_selection, pair_to_uid, uid_pairs, write_selection


class Ctx:
    def __init__(self, root):
        self.root = root

    def output(self, rel):
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def meta(n, split="train", start=0):
    return pa.table({"key": [f"{i:09d}" for i in range(start, start + n)],
                     "uid": [f"{i:032x}" for i in range(start, start + n)], "split": [split] * n,
                     "shard": [0] * n, "label": [i % 3 for i in range(n)]})


def test_embeddings_parts_are_unit_float16_row_aligned_with_a_nemo_view(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, 8)) * 3
    info = write_part(Ctx(tmp_path), 0, x, meta(5))
    write_part(Ctx(tmp_path), 1, rng.normal(size=(3, 8)), meta(3, "test", 5))
    assert info == {"part": 0, "rows": 5, "dim": 8, "text": False, "splits": {"train": 5}}
    stored = np.load(tmp_path / part_files(0)["img"])
    assert stored.dtype == np.float16 and np.allclose(np.linalg.norm(stored.astype(np.float32), axis=1), 1, atol=1e-3)
    assert np.allclose(stored, x / np.linalg.norm(x, axis=1, keepdims=True), atol=1e-3)
    nemo = pq.read_table(tmp_path / "parquet" / "part_0.parquet")
    assert nemo.column_names == ["key", "uid", "embedding"]
    assert np.allclose(np.array(nemo.column("embedding").to_pylist()), stored.astype(np.float32))
    train = load_embeddings(tmp_path, "train")
    assert len(train) == 5 and train.uids == meta(5).column("uid").to_pylist()
    assert len(load_embeddings(tmp_path, None)) == 8 and len(load_embeddings(tmp_path, "test")) == 3
    with pytest.raises(ValueError, match="5 image rows, 4 metadata rows"):
        write_part(Ctx(tmp_path), 2, x, meta(4))


def test_datacomp_subset_is_sorted_unique_and_binary_searchable(tmp_path):
    uids = ["ffffffffffffffff0000000000000001", "0000000000000001ffffffffffffffff",
            "0000000000000001fffffffffffffffe", "0000000000000001ffffffffffffffff"]
    arr = uid_pairs(uids)
    assert arr.dtype == np.dtype("u8,u8") and len(arr) == 3  # DataComp's resharder asserts exactly this dtype
    assert [pair_to_uid(p) for p in arr] == sorted(set(uids))
    assert all(datacomp_contains(arr, u) for u in uids)
    assert not datacomp_contains(arr, "0000000000000002ffffffffffffffff")
    kept, dropped = meta(4), meta(2, start=4).append_column("reason", pa.array(["pruned", "duplicate"]))
    files = write_selection(tmp_path, kept, dropped)
    sel = load_selection(tmp_path)
    assert files == ["selection.npy", "kept.parquet", "dropped.parquet"] and sel.uids == kept.column("uid").to_pylist()
    on_disk = np.load(tmp_path / "selection.npy")
    assert [pair_to_uid(p) for p in on_disk] == sorted(sel.uids)
    with pytest.raises(ValueError, match="both kept and dropped"):
        write_selection(tmp_path, kept, meta(1).append_column("reason", pa.array(["x"])))
