"""The selection artifact.

    selection.npy     DataComp's subset file: kept uids as a sorted, unique structured array of dtype
                      ``np.dtype("u8,u8")`` (fields f0, f1: high and low 64 bits of the 128-bit hex uid);
                      exactly that dtype, since DataComp's resharder asserts it and numpy cannot compare
                      structured arrays whose field names differ
    kept.parquet      key, uid, split, shard, label (+ method columns such as score, cluster) of kept rows
    dropped.parquet   the same columns + reason, duplicate_of (a uid or null) for every dropped row

The manifest's ``metrics["pool"]`` names the shards artifact the rows come from; ``counts`` are samples:
``in == out + rejected`` (kept + dropped). A prune step that prunes within a prior selection also carries that
selection's dropped rows (``dropped_by`` names the step that dropped each row), so the last selection of a chain
says why every row is gone.

``pool_rows`` turns any shards or selection artifact into the pool's index rows it stands for: what export, the
loaders and the trainer read.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path
from pipeline.errors import InputError

class Outputs(Protocol):  # pipeline.stage.TaskContext
    def output(self, relpath: str) -> Path: ...


DATACOMP_DTYPE = np.dtype("u8,u8")  # DataComp's ``u16``: fields f0 (high), f1 (low)
BASE_COLUMNS = ("key", "uid", "split", "shard", "label")


def uid_pairs(uids: Iterable[str]) -> np.ndarray:
    """128-bit hex uids -> DataComp's sorted unique (high, low) array (vectorised: millions of uids a second)."""
    uids = pa.array(uids if isinstance(uids, (pa.Array, pa.ChunkedArray)) else list(uids), pa.string())
    if isinstance(uids, pa.ChunkedArray):
        uids = uids.combine_chunks()
    import pyarrow.compute as pc

    if len(uids) and (uids.null_count or pc.min_max(pc.utf8_length(uids)).as_py() != {"min": 32, "max": 32}):
        bad = next(u for u in uids.to_pylist() if u is None or len(u) != 32)
        raise ValueError(f"uid {bad!r} is not 32 hex characters (128 bits)")
    digits = np.zeros((0, 32), np.uint8)
    if len(uids):
        start = int(np.frombuffer(uids.buffers()[1], np.int32)[uids.offset])  # a slice starts past the buffer's head
        digits = np.frombuffer(uids.buffers()[2], np.uint8, count=32 * len(uids), offset=start).reshape(-1, 32)
    value = np.where(digits >= 97, digits - 87, np.where(digits >= 65, digits - 55, digits - 48)).astype(np.int64)
    if np.any((value < 0) | (value > 15)) or np.any((digits > 57) & (digits < 65)) or np.any((digits > 70) & (digits < 97)):
        raise ValueError("uids must be hexadecimal")
    arr = np.empty(len(uids), dtype=DATACOMP_DTYPE)
    for name, half in zip(DATACOMP_DTYPE.names, (value[:, :16], value[:, 16:])):
        acc = np.zeros(len(uids), dtype=np.uint64)
        for i in range(16):
            acc = acc * np.uint64(16) + half[:, i].astype(np.uint64)
        arr[name] = acc
    return np.unique(arr)  # sorts lexicographically by (high, low)


def pair_to_uid(pair: np.void | tuple[int, int]) -> str:
    return f"{int(pair[0]):016x}{int(pair[1]):016x}"


def datacomp_contains(subset: np.ndarray, uid: str) -> bool:
    """Membership the way DataComp's resharder tests it: binary search of the sorted subset array."""
    key = np.array([(int(uid[:16], 16), int(uid[16:], 16))], dtype=DATACOMP_DTYPE)
    i = int(np.searchsorted(subset, key[0]))
    return i < len(subset) and subset[i] == key[0]


def _check(kept: pa.Table, dropped: pa.Table) -> None:
    missing = [c for c in (*BASE_COLUMNS, "reason") if c not in dropped.column_names] + \
        [c for c in BASE_COLUMNS if c not in kept.column_names]
    if missing:
        raise ValueError(f"selection tables lack columns {missing}")
    import pyarrow.compute as pc

    both = pc.is_in(kept["uid"], value_set=dropped["uid"].combine_chunks())
    if pc.any(both).as_py():
        first = kept.filter(both).column("uid")[0].as_py()
        raise ValueError(f"{pc.sum(both).as_py()} uids are both kept and dropped, e.g. {first}")


def _write(paths: dict[str, Path], kept: pa.Table, dropped: pa.Table) -> None:
    with open(paths["selection.npy"], "wb") as f:
        np.save(f, uid_pairs(kept.column("uid")), allow_pickle=False)
    pq.write_table(kept, paths["kept.parquet"])
    pq.write_table(dropped, paths["dropped.parquet"])


FILES = ("selection.npy", "kept.parquet", "dropped.parquet")


def write_selection(out_dir: Path, kept: pa.Table, dropped: pa.Table) -> list[str]:
    """Write the three files atomically; returns their paths relative to ``out_dir`` (for ``Summary.files``)."""
    _check(kept, dropped)
    from contextlib import ExitStack

    with ExitStack() as stack:
        _write({name: stack.enter_context(atomic_path(out_dir / name)) for name in FILES}, kept, dropped)
    return list(FILES)


def write_selection_outputs(ctx: Outputs, kept: pa.Table, dropped: pa.Table) -> list[str]:
    """The same three files through a task's ``ctx.output`` (they commit with the task)."""
    _check(kept, dropped)
    _write({name: ctx.output(name) for name in FILES}, kept, dropped)
    return list(FILES)


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


def covered_splits(sel: Selection) -> list[str]:
    """The splits a selection decided anything about (its kept and dropped rows)."""
    import pyarrow.compute as pc

    found = pc.unique(pa.chunked_array([*sel.kept["split"].chunks, *sel.dropped["split"].chunks], pa.string()))
    return sorted(s for s in found.to_pylist() if s is not None)


INDEX_COLUMNS = ("key", "uid", "split", "shard", "label", "offset", "bytes", "width", "height")


def pool_rows(artifact: Path, split: str | None = None, columns: Sequence[str] | None = INDEX_COLUMNS,
              other_splits: bool = False) -> pa.Table:
    """The pool index rows ``artifact`` stands for, in the pool's order: every row of a shards artifact, the kept rows
    of a selection (``other_splits``: plus every row of the pool splits the selection did not cover). ``split``
    restricts to one split; ``columns=None`` reads every index column."""
    import json

    import pyarrow.compute as pc

    from stages.sharding.pool import find_pool

    pool = find_pool(artifact)
    index = pq.read_table(pool / "index.parquet", columns=list(columns) if columns is not None else None)
    if split is not None:
        index = index.filter(pc.equal(index["split"], split))
    kind = json.loads((artifact / "manifest.json").read_text()).get("kind")
    if kind == "shards":
        return index
    if kind != "selection":
        raise InputError(f"{artifact}: a '{kind}' artifact, not a selection or shards artifact")
    sel = load_selection(artifact)
    keep = pc.is_in(index["uid"], value_set=sel.kept["uid"].combine_chunks())
    want = sel.kept if split is None else sel.kept.filter(pc.equal(sel.kept["split"], split))
    found = pc.sum(keep).as_py() or 0
    if found != want.num_rows:
        raise InputError(f"{artifact}: {want.num_rows - found} kept uids are not in its pool {pool}")
    if other_splits:
        covered = pa.array(covered_splits(sel), pa.string())
        keep = pc.or_(keep, pc.invert(pc.is_in(index["split"], value_set=covered)))
    return index.filter(keep)
