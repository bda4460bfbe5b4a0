"""Regroup rows by a key across tasks: one phase writes partitions, the next runs one task per partition.

Per-shard tasks of phase A each write their rows split by ``key`` (or by ``hash(key) % buckets`` when keys are
many, e.g. 50,000 clusters) to ``<prefix>/<partition>/<task>.parquet``, committed like any task output; phase B
plans one task per partition that phase A reported (``planned_partitions``) and reads all of its rows with
``read_partition``. This is how SemDeDup gets every cluster's rows together without a global shuffle in memory.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.artifacts import PartRecord
from pipeline.stage import TaskContext

INFO_KEY = "partitions"


def partition_of(value: object, buckets: int | None) -> str:
    """The partition name of a key value: the value itself, or a stable bucket (same on every worker and run)."""
    if buckets is None:
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value) % buckets)
    digest = hashlib.blake2b(str(value).encode(), digest_size=8).digest()
    return str(int.from_bytes(digest, "little") % buckets)


def write_partitions(ctx: TaskContext, table: pa.Table, key: str, prefix: str = "partitions",
                     buckets: int | None = None) -> dict[str, int]:
    """Write ``table``'s rows grouped by partition of ``key``; returns rows per partition (put it in the task's
    info under ``partitions`` so the next phase can plan from it)."""
    if table.num_rows == 0:
        return {}
    uniques = pc.unique(table[key])
    names = np.array([partition_of(v, buckets) for v in uniques.to_pylist()], dtype=object)
    row_part = names[pc.index_in(table[key], value_set=uniques).to_numpy(zero_copy_only=False)]
    counts: dict[str, int] = {}
    for name in sorted(set(names.tolist())):
        idx = np.flatnonzero(row_part == name)
        pq.write_table(table.take(pa.array(idx)), ctx.output(f"{prefix}/{name}/{ctx.task_id}.parquet"))
        counts[name] = int(len(idx))
    return counts


def planned_partitions(parts: Sequence[PartRecord]) -> dict[str, int]:
    """Rows per partition over the parts of the writing phase (keys sorted numerically when they are numbers)."""
    total: dict[str, int] = {}
    for p in parts:
        for name, n in (p.info.get(INFO_KEY) or {}).items():
            total[name] = total.get(name, 0) + int(n)
    return dict(sorted(total.items(), key=lambda kv: (not kv[0].lstrip("-").isdigit(),
                                                      int(kv[0]) if kv[0].lstrip("-").isdigit() else 0, kv[0])))


def read_partition(out_dir: Path, name: str, prefix: str = "partitions") -> pa.Table:
    """Every row written to partition ``name``, in the order of the writing tasks' ids."""
    files = sorted((out_dir / prefix / name).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{out_dir / prefix / name}: no rows were written to partition '{name}'")
    return pa.concat_tables([pq.read_table(f) for f in files])
