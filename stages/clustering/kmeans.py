"""Spherical k-means with FAISS, fitted on a seeded sample; nearest-centroid assignment; cluster geometry.

Pure functions over float32 arrays of unit rows (the embeddings artifact's rows, re-normalised after float16):
the stage only reads parts and writes files around them.

* ``fit_spherical_kmeans``: ``faiss.Kmeans(spherical=True)`` as SemDeDup and DBP run it (niter 100, seed 1234 by
  default), on a GPU when faiss was built with GPU support and one is visible. The sample is drawn here
  (``fit_sample``), so faiss never subsamples again behind our back and the fit is reproducible from the seed.
* ``assign``: argmax of the inner product with the unit centroids (= nearest centroid in cosine), and the cosine
  distance ``1 - cos`` to it.
* ``cluster_table``: size, d_intra = mean member distance, d_inter = mean cosine distance to the ``l`` nearest
  other centroids (DBP's ``compute_centroid_distances``: an inner-product index over the centroids queried for
  ``l + 1`` neighbours, self dropped; here self is dropped by id, not by column, so a duplicated centroid cannot
  stand in for it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np


def worker_threads() -> int:
    """Threads this process may use: a Dask worker's thread count, else every core; faiss (OpenMP) and torch are
    told the same, so tasks on a shared machine do not oversubscribe it."""
    import os

    try:
        from distributed import get_worker

        n = get_worker().state.nthreads
    except (ImportError, ValueError, AttributeError):
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    import faiss
    import torch

    faiss.omp_set_num_threads(max(1, n))
    torch.set_num_threads(max(1, n))
    return max(1, n)


def faiss_gpus(device: str) -> int:
    """GPUs faiss can use for ``device`` (``auto`` / ``cpu`` / ``cuda``); ``cuda`` without a GPU faiss is an error."""
    import faiss

    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if device == "cuda" and n == 0:
        raise RuntimeError("device: cuda, but this faiss has no GPU support or sees no GPU "
                           "(pip install faiss-gpu-cu12, or device: auto)")
    return 0 if device == "cpu" else n


def unit_rows(x: np.ndarray) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (stored float16 rows are unit only to about 1e-3)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def fit_sample_size(n: int, k: int, fraction: float | None, max_points_per_centroid: int | None) -> int:
    """Rows the fit sees: ``fraction`` of ``n`` (all when None), at most ``k * max_points_per_centroid`` (faiss's
    own cap, 256 by default), never fewer than ``k``."""
    if n < k:
        raise ValueError(f"{n} embeddings cannot make {k} clusters: lower n_clusters")
    m = n if fraction is None else math.ceil(fraction * n)
    if max_points_per_centroid:
        m = min(m, k * max_points_per_centroid)
    return max(m, k)


def fit_sample(n: int, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a seeded uniform sample of ``size`` of ``n`` rows (all rows when ``size >= n``)."""
    if size >= n:
        return np.arange(n, dtype=np.int64)
    return np.sort(np.random.default_rng(seed).choice(n, size, replace=False)).astype(np.int64)


@dataclass
class KMeansFit:
    centroids: np.ndarray  # float32 [k, d], unit rows
    mean_distance: float  # of the fit sample to its nearest final centroid (1 - cos): what k-means minimises
    iterations: list[dict[str, Any]] = field(default_factory=list)  # faiss's per iteration (all redos): obj, time
    gpu: bool = False


def fit_spherical_kmeans(x: np.ndarray, k: int, *, niter: int = 100, seed: int = 1234, nredo: int = 1,
                         gpus: int = 0, verbose: bool = False) -> KMeansFit:
    """Spherical k-means of the rows of ``x`` (all of them: sample before calling)."""
    import faiss

    x = np.ascontiguousarray(unit_rows(x))
    if len(x) < k:
        raise ValueError(f"{len(x)} rows cannot make {k} clusters")
    km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=seed, nredo=nredo, spherical=True, verbose=verbose,
                      gpu=gpus if gpus else False, max_points_per_centroid=max(len(x) // k + 1, 256),
                      min_points_per_centroid=1)
    km.train(x)
    stats = km.iteration_stats if hasattr(km, "iteration_stats") else []
    iters = [{"obj": float(s["obj"]), "time": float(s["time"])} for s in stats]
    centroids = unit_rows(km.centroids)
    _, distance = assign(x, centroids, gpus)
    return KMeansFit(centroids, float(distance.astype(np.float64).mean()), iters, bool(gpus))


def assign(x: np.ndarray, centroids: np.ndarray, gpus: int = 0, batch: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid of each row by inner product (cosine for unit rows) and its cosine distance ``1 - cos``."""
    import faiss

    x = unit_rows(x)
    c = np.ascontiguousarray(unit_rows(centroids))
    index: Any = faiss.IndexFlatIP(c.shape[1])
    if gpus:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(c)
    cluster = np.empty(len(x), dtype=np.int64)
    sim = np.empty(len(x), dtype=np.float32)
    for i in range(0, len(x), batch):
        d, ids = index.search(np.ascontiguousarray(x[i:i + batch]), 1)
        cluster[i:i + batch], sim[i:i + batch] = ids[:, 0], d[:, 0]
    return cluster, (1.0 - sim).astype(np.float32)


def neighbour_distance(centroids: np.ndarray, neighbours: int) -> np.ndarray:
    """d_inter: for each centroid the mean cosine distance to its ``neighbours`` nearest other centroids (capped
    at k - 1; NaN when k == 1)."""
    import faiss

    c = np.ascontiguousarray(unit_rows(centroids))
    k = len(c)
    l = min(neighbours, k - 1)
    if l < 1:
        return np.full(k, np.nan)
    index = faiss.IndexFlatIP(c.shape[1])
    index.add(c)
    sim, ids = index.search(c, l + 1)
    is_self = ids == np.arange(k)[:, None]
    # drop self by id; where self was pushed out by ties with an identical centroid, drop the last column
    drop = np.where(is_self.any(1)[:, None], is_self, np.arange(l + 1)[None, :] == l)
    others = sim[~drop].reshape(k, l).astype(np.float64)
    return (1.0 - others).mean(1)


def cluster_table(sizes: np.ndarray, distance_sums: np.ndarray, centroids: np.ndarray,
                  neighbours: int) -> dict[str, np.ndarray]:
    """Columns of ``clusters.parquet``: cluster, size, d_intra (NaN for an empty cluster), d_inter."""
    sizes = np.asarray(sizes, dtype=np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        d_intra = np.where(sizes > 0, np.asarray(distance_sums, np.float64) / np.maximum(sizes, 1), np.nan)
    return {"cluster": np.arange(len(sizes), dtype=np.int32), "size": sizes, "d_intra": d_intra,
            "d_inter": neighbour_distance(centroids, neighbours)}
