"""The clusters artifact.

    centroids.npy                 float32 [k, d], unit rows (spherical k-means)
    assign/assign_{N}.parquet     key, uid, split, shard, label, cluster, distance: one file per embeddings part N,
                                  rows in the same order as that part's rows of the clustered split(s);
                                  distance = 1 - cos(x, own centroid)
    clusters.parquet              cluster, size, d_intra (mean member distance), d_inter (mean distance to the l
                                  nearest other centroids)

The manifest's metrics name ``parts`` (the embeddings parts, in order), ``splits`` (the clustered splits; null =
every split), ``n_clusters`` and the ``pool``. The cluster stage (``stages/cluster.py``) writes it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import InputError

ASSIGN_SCHEMA = pa.schema([("key", pa.string()), ("uid", pa.string()), ("split", pa.string()),
                           ("shard", pa.int32()), ("label", pa.int32()), ("cluster", pa.int32()),
                           ("distance", pa.float32())])
CLUSTER_SCHEMA = pa.schema([("cluster", pa.int32()), ("size", pa.int64()), ("d_intra", pa.float64()),
                            ("d_inter", pa.float64())])


class Outputs(Protocol):
    def output(self, relpath: str) -> Path: ...


def assign_file(n: int) -> str:
    return f"assign/assign_{n}.parquet"


def write_assignments(ctx: Outputs, n: int, meta: pa.Table, cluster: np.ndarray, distance: np.ndarray) -> dict[str, Any]:
    t = meta.select(["key", "uid", "split", "shard", "label"]).append_column(
        "cluster", pa.array(np.asarray(cluster, np.int32))).append_column(
        "distance", pa.array(np.asarray(distance, np.float32)))
    pq.write_table(t.cast(ASSIGN_SCHEMA), ctx.output(assign_file(n)))
    return {"part": n, "rows": t.num_rows}


def load_assignments(artifact: Path) -> pa.Table:
    """Every assigned row, in embeddings-part order."""
    listed = json.loads((artifact / "manifest.json").read_text()).get("metrics", {}).get("parts") \
        if (artifact / "manifest.json").is_file() else None
    files = [artifact / assign_file(n) for n in listed] if listed is not None else \
        sorted((artifact / "assign").glob("assign_*.parquet"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    if not files:
        raise InputError(f"{artifact}: no assign/assign_*.parquet (not a clusters artifact)")
    return pa.concat_tables([pq.read_table(f).cast(ASSIGN_SCHEMA) for f in files])


def load_centroids(artifact: Path) -> np.ndarray:
    path = artifact / "centroids.npy"
    if not path.is_file():
        raise InputError(f"{path}: missing (not a clusters artifact)")
    return np.load(path, allow_pickle=False).astype(np.float32)


def load_cluster_table(artifact: Path) -> pa.Table:
    return pq.read_table(artifact / "clusters.parquet").cast(CLUSTER_SCHEMA)
