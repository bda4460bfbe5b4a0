"""Cluster geometry over the candidate rows (pure functions): sizes, d_intra from the rows' own distances (so a
chain step recomputes them on what the prior steps kept), d_inter from the centroids, and the per-cluster table
every cluster-aware method writes."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

if TYPE_CHECKING:
    from stages.pruning.base import Candidates


def num_clusters(cand: "Candidates") -> int:
    """k: the clusters artifact's number of centroids (some may have no candidate rows)."""
    from stages.clustering.store import load_centroids

    cluster = cand.column("cluster", np.int64)
    k = len(load_centroids(cand.inputs["clusters"])) if "clusters" in cand.inputs else 0
    return max(k, int(cluster.max()) + 1 if len(cluster) else 0)


def cluster_sizes(cluster: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(np.asarray(cluster, dtype=np.int64), minlength=k)


def mean_distance(cluster: np.ndarray, distance: np.ndarray, k: int) -> np.ndarray:
    """d_intra per cluster: the mean member distance to the centroid (NaN for an empty cluster)."""
    sizes = cluster_sizes(cluster, k)
    sums = np.bincount(np.asarray(cluster, dtype=np.int64), weights=np.asarray(distance, np.float64), minlength=k)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(sizes > 0, sums / np.maximum(sizes, 1), np.nan)


def inter_distance(centroids: np.ndarray, neighbours: int, chunk: int = 4096) -> np.ndarray:
    """d_inter per cluster: the mean ``1 − cos`` to its ``neighbours`` nearest other centroids (DBP's l; the released
    code queries l + 1 neighbours of a flat inner-product index and drops the first, itself)."""
    c = np.asarray(centroids, dtype=np.float64)
    c = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
    k = len(c)
    l_ = min(neighbours, k - 1)
    out = np.full(k, np.nan)
    if l_ < 1:
        return out
    for a in range(0, k, chunk):
        sim = c[a:a + chunk] @ c.T
        sim[np.arange(len(sim)), np.arange(a, a + len(sim))] = -np.inf  # never its own neighbour
        top = np.partition(sim, k - l_, axis=1)[:, k - l_:]
        out[a:a + len(sim)] = 1.0 - top.mean(axis=1)
    return out


def per_cluster_table(cluster: np.ndarray, keep: np.ndarray, distance: np.ndarray | None = None,
                      k: int | None = None, **columns: np.ndarray | None) -> pa.Table:
    """cluster, size, kept (+ d_intra from ``distance``, + any extra per-cluster ``columns``) for clusters 0..k-1."""
    cluster = np.asarray(cluster, dtype=np.int64)
    k = k if k is not None else (int(cluster.max()) + 1 if len(cluster) else 0)
    data: dict[str, np.ndarray] = {"cluster": np.arange(k, dtype=np.int32),
                                   "size": cluster_sizes(cluster, k),
                                   "kept": cluster_sizes(cluster[np.asarray(keep, bool)], k)}
    if distance is not None:
        data["d_intra"] = mean_distance(cluster, distance, k)
    for name, values in columns.items():
        if values is not None:
            data[name] = np.asarray(values)
    return pa.table(data)
