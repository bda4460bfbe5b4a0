"""The selection artifact.

    selection.npy     DataComp's subset file: kept uids as a sorted, unique structured array
                      ``[('u0', '<u8'), ('u1', '<u8')]`` (high and low 64 bits of the 128-bit hex uid)
    kept.parquet      key, uid, split, shard, label (+ method columns such as score, cluster) of kept rows
    dropped.parquet   the same columns + reason, duplicate_of (a uid or null) for every dropped row

The manifest's ``metrics["pool"]`` names the shards artifact the rows come from; ``counts`` are samples:
``in == out + rejected`` (kept + dropped).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path
from pipeline.errors import InputError

DATACOMP_DTYPE = np.dtype([("u0", "<u8"), ("u1", "<u8")])
BASE_COLUMNS = ("key", "uid", "split", "shard", "label")


def uid_pairs(uids: Iterable[str]) -> np.ndarray:
    """128-bit hex uids -> DataComp's sorted unique (u0, u1) array."""
    uids = list(uids)
    arr = np.empty(len(uids), dtype=DATACOMP_DTYPE)
    for i, u in enumerate(uids):
        if len(u) != 32:
            raise ValueError(f"uid {u!r} is not 32 hex characters (128 bits)")
        arr[i] = (int(u[:16], 16), int(u[16:], 16))
    return np.unique(arr)  # sorts lexicographically by (u0, u1)


def pair_to_uid(pair: np.void | tuple[int, int]) -> str:
    return f"{int(pair[0]):016x}{int(pair[1]):016x}"


def datacomp_contains(subset: np.ndarray, uid: str) -> bool:
    """Membership the way DataComp's resharder tests it: binary search of the sorted subset array."""
    key = np.array([(int(uid[:16], 16), int(uid[16:], 16))], dtype=DATACOMP_DTYPE)
    i = int(np.searchsorted(subset, key[0]))
    return i < len(subset) and subset[i] == key[0]


def write_selection(out_dir: Path, kept: pa.Table, dropped: pa.Table) -> list[str]:
    """Write the three files atomically; returns their paths relative to ``out_dir`` (for ``Summary.files``)."""
    missing = [c for c in (*BASE_COLUMNS, "reason") if c not in dropped.column_names] + \
        [c for c in BASE_COLUMNS if c not in kept.column_names]
    if missing:
        raise ValueError(f"selection tables lack columns {missing}")
    overlap = set(kept.column("uid").to_pylist()) & set(dropped.column("uid").to_pylist())
    if overlap:
        raise ValueError(f"{len(overlap)} uids are both kept and dropped, e.g. {sorted(overlap)[0]}")
    with atomic_path(out_dir / "selection.npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, uid_pairs(kept.column("uid").to_pylist()), allow_pickle=False)
    for name, table in (("kept.parquet", kept), ("dropped.parquet", dropped)):
        with atomic_path(out_dir / name) as tmp:
            pq.write_table(table, tmp)
    return ["selection.npy", "kept.parquet", "dropped.parquet"]


@dataclass
class Selection:
    kept: pa.Table
    dropped: pa.Table
    path: Path

    @property
    def uids(self) -> list[str]:
        return self.kept.column("uid").to_pylist()

    def __len__(self) -> int:
        return self.kept.num_rows


def load_selection(artifact: Path) -> Selection:
    for name in ("kept.parquet", "dropped.parquet"):
        if not (artifact / name).is_file():
            raise InputError(f"{artifact / name}: missing (not a selection artifact)")
    return Selection(pq.read_table(artifact / "kept.parquet"), pq.read_table(artifact / "dropped.parquet"), artifact)


def restrict(table: pa.Table, uids: Sequence[str]) -> pa.Table:
    """Rows of ``table`` whose uid is in ``uids`` (order of ``table`` kept)."""
    import pyarrow.compute as pc

    return table.filter(pc.is_in(table["uid"], value_set=pa.array(list(uids), pa.string())))
