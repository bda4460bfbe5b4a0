"""Reading the rows of chosen splits from an embeddings artifact, part by part, without loading all of it."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import InputError
from stages.embedders.store import part_files


def split_mask(splits_column: pa.ChunkedArray | pa.Array, splits: Sequence[str] | None) -> np.ndarray:
    """Rows whose split is one of ``splits`` (every row when None)."""
    if splits is None:
        return np.ones(len(splits_column), dtype=bool)
    return pc.is_in(splits_column, value_set=pa.array(list(splits), pa.string())).to_numpy(zero_copy_only=False)


def part_split_rows(artifact: Path, part: int, splits: Sequence[str] | None) -> np.ndarray:
    """Row numbers of one part that belong to ``splits`` (reads only the metadata's split column)."""
    path = artifact / part_files(part)["meta"]
    if not path.is_file():
        raise InputError(f"{path}: missing (incomplete embeddings artifact)")
    return np.flatnonzero(split_mask(pq.read_table(path, columns=["split"])["split"], splits))


def part_vectors(artifact: Path, part: int, rows: np.ndarray | None = None) -> np.ndarray:
    """float16 rows of one part as stored (memory-mapped, so only ``rows`` are read)."""
    path = artifact / part_files(part)["img"]
    if not path.is_file():
        raise InputError(f"{path}: missing (incomplete embeddings artifact)")
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    return np.asarray(arr if rows is None else arr[rows])


def sample_vectors(artifact: Path, parts: Sequence[int], split_rows: Sequence[np.ndarray],
                   picks: np.ndarray) -> np.ndarray:
    """The rows at global positions ``picks`` (sorted) of the concatenation of each part's ``split_rows``."""
    out, start = [], 0
    for part, rows in zip(parts, split_rows):
        lo, hi = np.searchsorted(picks, [start, start + len(rows)])
        if hi > lo:
            out.append(part_vectors(artifact, part, rows[picks[lo:hi] - start]))
        start += len(rows)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float16)
