"""Planning over columns: canonical order + seeded shuffle, which duplicate is kept, shard bounds, stats sample."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from stages.sharding.plan import build_classes, duplicate_of, label_ids, ordered, shard_bounds, stats_sample
from stages.sources import SourceError


def refs(n: int, splits=("train", "test")) -> pa.Table:
    return pa.table({"uid": [f"u{i:04d}" for i in range(n)], "split": [splits[i % len(splits)] for i in range(n)],
                     "label": [str(i % 3) for i in range(n)]})


def test_order_is_by_split_then_seeded_shuffle_independent_of_listing_order():
    t = refs(200, ("test", "train", "val"))
    a = ordered(t, shuffle=True, seed=0)
    b = ordered(t.take(pa.array(np.random.default_rng(1).permutation(200))), shuffle=True, seed=0)
    assert a.to_pylist() == b.to_pylist()
    splits = a["split"].to_pylist()
    assert splits == sorted(splits, key=["train", "val", "test"].index)
    train = [u for u, s in zip(a["uid"].to_pylist(), splits) if s == "train"]
    assert train != sorted(train) and sorted(train) == sorted(u for u, s in zip(t["uid"].to_pylist(), t["split"].to_pylist()) if s == "train")
    assert ordered(t, shuffle=True, seed=1)["uid"].to_pylist() != a["uid"].to_pylist()
    plain = ordered(t, shuffle=False, seed=0)
    assert [u for u, s in zip(plain["uid"].to_pylist(), plain["split"].to_pylist()) if s == "train"] == sorted(train)


def test_global_dedup_keeps_the_evaluation_copy_and_does_not_depend_on_order():
    hashes = pa.array(["h1", "h1", "h1", "h2", "h2", None, "h3"])
    splits = pa.array(["train", "test", "val", "train", "train", "train", "test"])
    sources = pa.array(["a", "b", "c", "z", "y", "n", "m"])
    got = duplicate_of(hashes, splits, sources, "global")
    assert got.tolist() == [1, -1, 1, 4, -1, -1, -1]  # test copy kept; within a split the smallest source path
    assert duplicate_of(hashes, splits, sources, "split").tolist() == [-1, -1, -1, 4, -1, -1, -1]
    perm = [6, 2, 0, 5, 4, 1, 3]
    again = duplicate_of(hashes.take(pa.array(perm)), splits.take(pa.array(perm)), sources.take(pa.array(perm)), "global")
    kept_sources = {sources[perm[i]].as_py(): (sources[perm[j]].as_py() if j >= 0 else None) for i, j in enumerate(again)}
    assert kept_sources == {"a": "b", "b": None, "c": "b", "z": "y", "y": None, "n": None, "m": None}


def test_shard_bounds_count_kept_samples_and_bytes():
    kept = np.array([1, 1, 0, 1, 1, 1, 0], dtype=bool)
    assert shard_bounds(kept, np.full(7, 10), 2, None) == [(0, 2), (2, 5), (5, 7)]
    assert shard_bounds(np.ones(6, bool), np.full(6, 10), 100, 25) == [(0, 3), (3, 6)]
    assert shard_bounds(np.ones(3, bool), np.array([-1, -1, -1]), 2, 5) == [(0, 2), (2, 3)]


def test_stats_sample_is_seeded_random_not_the_first_rows():
    m = stats_sample(1000, 10, seed=0)
    assert m.sum() == 10 and (m == stats_sample(1000, 10, seed=0)).all()
    assert not m[:10].all() and (m != stats_sample(1000, 10, seed=1)).any()
    assert stats_sample(5, 10, seed=0).all()


def test_classes_numeric_declared_or_sorted():
    assert build_classes(pa.array(["2", "0", None, "10"]), None) == [str(i) for i in range(11)]
    assert build_classes(pa.array(["dog", "cat", None]), None) == ["cat", "dog"]
    assert build_classes(pa.array(["b"]), ["b", "a"]) == ["b", "a"]
    with pytest.raises(SourceError, match="not among the source's classes"):
        build_classes(pa.array(["c"]), ["b", "a"])
    assert label_ids(pa.array(["dog", None, "cat"]), ["cat", "dog"]).to_pylist() == [1, None, 0]
    assert label_ids(pa.array(["10", "2"]), [str(i) for i in range(11)]).to_pylist() == [10, 2]
