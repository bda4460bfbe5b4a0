"""``dbp``: density-based pruning (Abbas, Rusak et al., ICLR 2024; curation.md §1).

Per non-empty cluster j of the candidate rows:

* ``d_intra(j)``: mean member distance to the centroid, over the *candidate* rows (a chain step recomputes it on
  what the prior steps kept); ``d_inter(j)``: mean distance to the l nearest other centroids (the clusters
  artifact's, or recomputed from the centroids with ``num_neighbors``);
* complexity ``C_j = d_inter · d_intra``; clusters with fewer than ``min_cluster_size`` rows get NaN, then every NaN
  the mean of the others (the released code's NaNs come from clusters of 1-2 items);
* ``P = softmax(C / temperature)``; the quotas are the **exact** solution of the QP
  ``min ½‖x − N·P‖²  s.t.  Σx = N, lb ≤ x ≤ ub`` (``quota.project_capped_simplex``), ``ub_j = |j|``,
  ``lb_j = min(m, |j| − 1)``, ``m = floor(N/k · cls_bal_ratio)`` or 1 when the ratio is 0, rounded to exactly N by
  largest remainder within the bounds (``allocation: redistribute`` is the reviewer's iterative variant, for
  comparison only);
* each cluster keeps its quota of rows: ``hard`` the farthest from the centroid, ``easy`` the nearest, ``random``
  a seeded draw (a quota of 0 keeps nothing, unlike the released code's ``[-0:]``).

Defaults are the paper's configuration: ``temperature: 0.1`` (the released code's default is 0.5) and
``cls_bal_ratio: 0`` (the code's default 0.5 floors every cluster at N/(2k)). Clusters with no candidate rows (a
chain step after dedup or a CLIP-score filter) take no part: they would not exist had the clustering run on the
kept rows.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from stages.pruning.base import (PRUNERS, Candidates, Decision, Pruner, PrunerParams, Target, mask_of, ranked,
                                 take_per_group)
from stages.pruning.clusters import cluster_sizes, inter_distance, mean_distance, num_clusters, per_cluster_table
from stages.pruning.quota import dbp_bounds, largest_remainder, project_capped_simplex, redistribute, softmax


class DBPParams(PrunerParams):
    method: Literal["dbp"] = "dbp"
    temperature: float = Field(0.1, gt=0)  # the paper's τ; the released code's default is 0.5
    cls_bal_ratio: float = Field(0.0, ge=0, le=1)  # 0: as published (floor of 1); the code's default is 0.5
    which_to_keep: Literal["hard", "easy", "random"] = "hard"
    allocation: Literal["qp", "redistribute"] = "qp"
    min_cluster_size: int = Field(3, ge=1)  # smaller clusters get the mean complexity
    num_neighbors: int | None = Field(None, ge=1)  # recompute d_inter with this l; None: the clusters artifact's


def complexity(d_intra: np.ndarray, d_inter: np.ndarray, sizes: np.ndarray, min_size: int) -> np.ndarray:
    """``C = d_inter · d_intra`` with NaN for clusters below ``min_size`` rows, then NaN -> the mean of the rest."""
    c = np.asarray(d_inter, np.float64) * np.asarray(d_intra, np.float64)
    c = np.where(np.asarray(sizes) < min_size, np.nan, c)
    finite = np.isfinite(c)
    return np.where(finite, c, c[finite].mean() if finite.any() else 0.0)


def dbp_quotas(sizes: np.ndarray, comp: np.ndarray, n: int, temperature: float, cls_bal_ratio: float = 0.0,
               allocation: str = "qp") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P, the real allocation, the integer quotas summing to ``n``) for clusters of ``sizes`` and complexity."""
    sizes = np.asarray(sizes, dtype=np.int64)
    prob = softmax(comp, temperature)
    lb, ub = dbp_bounds(sizes, n, cls_bal_ratio)
    solve = project_capped_simplex if allocation == "qp" else redistribute
    x = solve(n * prob, n, lb, ub)
    return prob, x, largest_remainder(x, n, lb, ub)


@PRUNERS.register()
class DBPPruner(Pruner):
    name = "dbp"
    Params = DBPParams
    needs = ("clusters",)
    required = ("cluster", "distance")

    def d_inter(self, cand: Candidates, k: int) -> np.ndarray:
        from stages.clustering.store import load_centroids, load_cluster_table

        p: DBPParams = self.params  # type: ignore[assignment]
        if p.num_neighbors is not None:
            return inter_distance(load_centroids(cand.inputs["clusters"]), p.num_neighbors)
        table = load_cluster_table(cand.inputs["clusters"])
        out = np.full(k, np.nan)
        out[table.column("cluster").to_numpy()] = table.column("d_inter").to_numpy(zero_copy_only=False)
        return out

    def select(self, cand: Candidates, target: Target) -> Decision:
        p: DBPParams = self.params  # type: ignore[assignment]
        n_rows = len(cand)
        n = target.size(n_rows)
        cluster = cand.column("cluster", np.int64)
        distance = cand.column("distance", np.float64)
        k = num_clusters(cand)
        sizes = cluster_sizes(cluster, k)
        active = sizes > 0
        d_intra = mean_distance(cluster, distance, k)
        d_inter = self.d_inter(cand, k)
        comp = np.full(k, np.nan)
        prob = np.zeros(k)
        x = np.zeros(k)
        quota = np.zeros(k, dtype=np.int64)
        floor = int(dbp_bounds(sizes[active], n, p.cls_bal_ratio)[0].sum())
        if n < floor:
            raise ValueError(f"dbp: keeping {n} rows is below the per-cluster floor of {floor} (at least "
                             f"{'one row' if p.cls_bal_ratio == 0 else 'floor(N/k · cls_bal_ratio) rows'} of every "
                             "cluster of 2+ rows): keep more, or cluster into fewer clusters")
        if active.any():
            comp[active] = complexity(d_intra[active], d_inter[active], sizes[active], p.min_cluster_size)
            prob[active], x[active], quota[active] = dbp_quotas(sizes[active], comp[active], n, p.temperature,
                                                                p.cls_bal_ratio, p.allocation)
        if p.which_to_keep == "random":
            score = np.random.default_rng(cand.seed).random(n_rows)
            order = np.argsort(score, kind="stable")
        else:
            order = ranked(distance, cand.tiebreak(), descending=p.which_to_keep == "hard")
        keep = mask_of(take_per_group(order, cluster, quota), n_rows)
        table = per_cluster_table(cluster, keep, distance, k, d_inter=d_inter, complexity=comp, probability=prob,
                                  quota_real=x, quota=quota)
        finite = comp[active]
        return Decision(keep, f"dbp: beyond its cluster's quota ({p.which_to_keep} kept)", score=distance,
                        clusters=table, metrics={
                            "clusters": int(k), "clusters_with_rows": int(active.sum()),
                            "clusters_capped": int(((quota == sizes) & active).sum()),
                            "complexity": {"min": float(finite.min()), "mean": float(finite.mean()),
                                           "max": float(finite.max())} if len(finite) else None,
                            "temperature": p.temperature, "cls_bal_ratio": p.cls_bal_ratio,
                            "allocation": p.allocation})
