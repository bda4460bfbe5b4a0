"""The labels artifact (kind ``labels``): better supervision for every row of a pool, and the label-noise verdict.

    labels.parquet   one row per labelled sample of the pool (schema ``SCHEMA``):
                     key, uid, split, shard            the pool's index row it describes
                     given                             the label the data came with
                     label                             the label to train with: ``suggested`` when the action is
                                                       ``relabel``, else ``given``
                     topk_index, topk_prob             the soft label's k most probable classes (descending) and
                                                       their probabilities (the rest of the mass is spread evenly
                                                       over the other classes, ``soft_targets``)
                     multi                             the multi-label set (classes whose probability >= threshold;
                                                       always contains ``label``)
                     noise_score                       how likely ``given`` is wrong (higher = worse; in [0, 1])
                     flagged                           confident learning says ``given`` is wrong
                     suggested                         the most probable class
                     action                            keep | relabel | drop (drop: trainers skip the row)
    maps/<split>/<shard:05d>.npz
                     optional localized label maps (ReLabel): ``uid`` (n,), ``index`` int16 (n, k, S, S) and
                     ``score`` float16 (n, k, S, S): the teacher's top-k dense class scores per location, before
                     pooling, for the rows of that shard

The manifest's ``metrics`` name ``num_classes``, ``classes``, ``actions`` (counts of keep/relabel/drop),
``pool`` (``stages.sharding.pool.pool_record``) and the sources that made the labels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path
from pipeline.errors import InputError

LABELS_FILE = "labels.parquet"
MAPS_DIR = "maps"
ACTIONS = ("keep", "relabel", "drop")
SCHEMA = pa.schema([
    ("key", pa.string()), ("uid", pa.string()), ("split", pa.string()), ("shard", pa.int32()),
    ("given", pa.int32()), ("label", pa.int32()),
    ("topk_index", pa.list_(pa.int16())), ("topk_prob", pa.list_(pa.float32())), ("multi", pa.list_(pa.int16())),
    ("noise_score", pa.float32()), ("flagged", pa.bool_()), ("suggested", pa.int32()), ("action", pa.string()),
])


def write_labels(path: Path, table: pa.Table) -> None:
    """Write ``labels.parquet`` atomically, cast to ``SCHEMA`` (extra columns are an error, not silently dropped)."""
    extra = set(table.column_names) - set(SCHEMA.names)
    if extra:
        raise ValueError(f"labels table has columns outside the schema: {sorted(extra)}")
    bad = set(table.column("action").to_pylist()) - set(ACTIONS)
    if bad:
        raise ValueError(f"unknown actions {sorted(bad)} (allowed: {', '.join(ACTIONS)})")
    with atomic_path(path) as tmp:
        pq.write_table(table.select(SCHEMA.names).cast(SCHEMA), tmp)


def load_labels(artifact: Path, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    path = Path(artifact) / LABELS_FILE
    if not path.exists():
        raise InputError(f"{artifact}: not a labels artifact ({LABELS_FILE} missing)")
    filters = [("split", "=", split)] if split is not None else None
    return pq.read_table(path, columns=columns, filters=filters)


def soft_targets(table: pa.Table, num_classes: int) -> np.ndarray:
    """Dense (n, C) float32 probability rows from the stored top-k: the top-k probabilities where they are, the
    remaining mass ``1 - sum(top-k)`` spread evenly over the other classes (a row sums to 1; exact when k = C)."""
    n = table.num_rows
    idx = table.column("topk_index").combine_chunks()
    prob = table.column("topk_prob").combine_chunks()
    lengths = np.diff(idx.offsets.to_numpy())
    rows = np.repeat(np.arange(n), lengths)
    cols = idx.values.to_numpy().astype(np.int64)
    vals = prob.values.to_numpy().astype(np.float32)
    out = np.zeros((n, num_classes), np.float32)
    rest = np.clip(1.0 - np.bincount(rows, weights=vals, minlength=n), 0.0, None).astype(np.float32)
    others = np.maximum(num_classes - lengths, 1)
    out += (rest / others)[:, None] * (lengths < num_classes)[:, None]
    out[rows, cols] = vals
    return out


def multi_hot(table: pa.Table, num_classes: int) -> np.ndarray:
    """(n, C) bool: the multi-label set of each row."""
    col = table.column("multi").combine_chunks()
    lengths = np.diff(col.offsets.to_numpy())
    out = np.zeros((table.num_rows, num_classes), bool)
    out[np.repeat(np.arange(table.num_rows), lengths), col.values.to_numpy().astype(np.int64)] = True
    return out


def maps_path(artifact: Path, split: str, shard: int) -> Path:
    return Path(artifact) / MAPS_DIR / split / f"{shard:05d}.npz"
