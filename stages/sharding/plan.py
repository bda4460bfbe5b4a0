"""Planning a shard artifact over columns (arrow/numpy): never a Python object per sample.

Order: splits in ``SPLIT_NAMES`` order (then others by name); within a split, samples sorted by uid and then
shuffled with a recorded seed, so the layout depends on the data and the seed, never on listing order, and no
shard is class-sorted.
"""
from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.sources import SPLIT_NAMES, SourceError

EVAL_SPLITS = ("test", "val", "validation")  # across splits, dedup keeps these copies (no contamination)


def split_rank(split: str) -> tuple[int, str]:
    return (SPLIT_NAMES.index(split) if split in SPLIT_NAMES else len(SPLIT_NAMES), split)


def keep_rank(split: str) -> int:
    """Which copy of an exact duplicate is kept: test, then val/validation, then other splits, train last."""
    if split in EVAL_SPLITS:
        return 0 if split == "test" else 1
    return 3 if split == "train" else 2


def split_order(splits: pa.Array | pa.ChunkedArray) -> list[str]:
    return sorted(pc.unique(splits).to_pylist(), key=split_rank)


def check_unique_uids(refs: pa.Table, where: str) -> None:
    if len(pc.unique(refs["uid"])) != refs.num_rows:
        counts = pa.table({"u": refs["uid"]}).group_by("u").aggregate([("u", "count")])
        dup = counts.filter(pc.field("u_count") > 1)["u"].to_pylist()[:3]
        rows = refs.filter(pc.is_in(refs["uid"], value_set=pa.array(dup, pa.string())))
        raise SourceError(f"{where}: samples share a uid (e.g. {dup[0]} for {rows['source'].to_pylist()[:3]}): "
                          "uids identify samples and must be unique")


def build_classes(labels: pa.Array | pa.ChunkedArray, declared: list[str] | None) -> list[str]:
    """Class names in label-id order: the source's own, else 0..max when every label is an integer, else sorted."""
    names = [x for x in pc.unique(labels).to_pylist() if x is not None]
    if declared is not None:
        unknown = set(names) - set(declared)
        if unknown:
            raise SourceError(f"labels {sorted(unknown)[:5]} are not among the source's classes")
        return list(declared)
    if names and all(x.isdigit() for x in names):
        return [str(i) for i in range(max(int(x) for x in names) + 1)]
    return sorted(names)


def label_ids(labels: pa.Array | pa.ChunkedArray, classes: list[str]) -> pa.Array:
    """int32 label ids (null for unlabelled samples)."""
    if classes and classes == [str(i) for i in range(len(classes))]:
        return pc.cast(pc.cast(labels, pa.int64()), pa.int32())
    return pc.cast(pc.index_in(labels, value_set=pa.array(classes, pa.string())), pa.int32())


def ordered(refs: pa.Table, shuffle: bool, seed: int) -> pa.Table:
    """Splits in order; within each, by uid, then (``shuffle``) a seeded permutation of the split."""
    rank = {s: i for i, s in enumerate(split_order(refs["split"]))}
    split_idx = pc.index_in(refs["split"], value_set=pa.array(list(rank), pa.string())).to_numpy()
    by_uid = pc.sort_indices(refs, sort_keys=[("uid", "ascending")]).to_numpy()
    order = by_uid[np.argsort(split_idx[by_uid], kind="stable")]
    if shuffle:
        counts = np.bincount(split_idx, minlength=len(rank))
        start = 0
        for name, n in zip(rank, counts):
            rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
            order[start:start + n] = order[start:start + n][rng.permutation(n)]
            start += n
    return refs.take(pa.array(order))


def duplicate_of(hashes: pa.Array, splits: pa.Array, sources: pa.Array, scope: str) -> np.ndarray:
    """For each row, the index of the copy kept in its group of exact duplicates (-1: the row is kept itself).

    Within a group (same hash, and same split for ``scope == "split"``), the evaluation copy is kept (test, then
    val), then the smallest source path: the choice depends on the data, not on listing order.
    """
    n = len(hashes)
    valid = pc.is_valid(hashes).to_numpy(zero_copy_only=False)
    keys = pa.table({
        "h": hashes, "s": splits if scope == "split" else pa.repeat(pa.scalar(""), n),
        "r": pa.array(_keep_ranks(splits), pa.int8()),
        "src": sources, "i": pa.array(np.arange(n)),
    }).filter(pa.array(valid))
    keys = keys.sort_by([("h", "ascending"), ("s", "ascending"), ("r", "ascending"), ("src", "ascending")])
    h, s, idx = keys["h"].to_numpy(zero_copy_only=False), keys["s"].to_numpy(zero_copy_only=False), keys["i"].to_numpy()
    out = np.full(n, -1, dtype=np.int64)
    if len(idx) == 0:
        return out
    new_group = np.ones(len(idx), dtype=bool)
    new_group[1:] = (h[1:] != h[:-1]) | (s[1:] != s[:-1])
    first = idx[new_group][np.cumsum(new_group) - 1]
    dup = ~new_group
    out[idx[dup]] = first[dup]
    return out


def _keep_ranks(splits: pa.Array) -> np.ndarray:
    names = pc.unique(splits).to_pylist()
    if not names:
        return np.zeros(0, dtype=np.int8)
    ranks = np.array([keep_rank(s) for s in names], dtype=np.int8)
    return ranks[pc.index_in(splits, value_set=pa.array(names, pa.string())).to_numpy()]


def shard_bounds(kept: np.ndarray, sizes: np.ndarray, per_shard: int, shard_bytes: int | None) -> list[tuple[int, int]]:
    """[start, end) of each shard of one split: close after ``per_shard`` kept samples, or at the first kept
    sample that brings the shard to ``shard_bytes`` (duplicates ride along without counting)."""
    n = len(kept)
    ckept = np.cumsum(kept)
    cbytes = np.cumsum(np.where(kept, np.maximum(sizes, 0), 0))
    bounds, start = [], 0
    while start < n:
        base_k = ckept[start - 1] if start else 0
        end = int(np.searchsorted(ckept, base_k + per_shard, side="left")) + 1
        if shard_bytes:
            base_b = cbytes[start - 1] if start else 0
            end = min(end, int(np.searchsorted(cbytes, base_b + shard_bytes, side="left")) + 1)
        end = min(max(end, start + 1), n)
        bounds.append((start, end))
        start = end
    return bounds


def stats_sample(n: int, k: int, seed: int) -> np.ndarray:
    """A seeded random choice of ``min(k, n)`` of ``n`` rows, as a mask."""
    mask = np.zeros(n, dtype=bool)
    rng = np.random.default_rng([seed, zlib.crc32(b"image_stats")])
    mask[rng.choice(n, size=min(k, n), replace=False)] = True
    return mask
