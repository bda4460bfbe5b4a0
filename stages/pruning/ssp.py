"""``ssp``: self-supervised prototype pruning (Sorscher et al. 2022; curation.md §3).

A sample's difficulty is its cosine distance to the nearest prototype, which is exactly the clusters artifact's
``distance`` (1 − cos to its own centroid). ``which_to_keep: hard`` keeps the farthest (for abundant data), ``easy``
the most prototypical (scarce data). ``cluster_balance: r`` (0 < r <= 1) first gives every cluster
``min(floor(r·N/k), size)`` of its own top rows (DBP's "cluster balancing" of SSP, k = non-empty clusters), then
fills the rest by the global ranking; 0 is plain global ranking.
"""
from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from stages.pruning.base import (PRUNERS, Candidates, Decision, Pruner, PrunerParams, Target, WhichToKeep, mask_of,
                                 ranked, take_per_group)
from stages.pruning.clusters import cluster_sizes, num_clusters, per_cluster_table


class SSPParams(PrunerParams):
    method: Literal["ssp"] = "ssp"
    which_to_keep: WhichToKeep = "hard"
    cluster_balance: float = Field(0.0, ge=0.0, le=1.0)


@PRUNERS.register()
class SSPPruner(Pruner):
    name = "ssp"
    Params = SSPParams
    needs = ("clusters",)
    required = ("cluster", "distance")

    def select(self, cand: Candidates, target: Target) -> Decision:
        p: SSPParams = self.params  # type: ignore[assignment]
        n_rows = len(cand)
        n = target.size(n_rows)
        distance = cand.column("distance", np.float64)
        cluster = cand.column("cluster", np.int64)
        order = ranked(distance, cand.tiebreak(), descending=p.which_to_keep == "hard")
        k = num_clusters(cand)
        sizes = cluster_sizes(cluster, k)
        floor = np.zeros_like(sizes)
        if p.cluster_balance > 0 and n_rows:
            floor = np.minimum(int(np.floor(n / int((sizes > 0).sum()) * p.cluster_balance)), sizes)
        first = take_per_group(order, cluster, floor)
        keep = mask_of(first, n_rows)
        rest = order[~keep[order]][: n - len(first)]
        keep[rest] = True
        why = "ssp: most prototypical" if p.which_to_keep == "hard" else "ssp: farthest from its prototype"
        table = per_cluster_table(cluster, keep, distance, k, floor=floor if p.cluster_balance else None)
        return Decision(keep, why, score=distance, clusters=table,
                        metrics={"which_to_keep": p.which_to_keep, "cluster_floor": int(floor.max()) if k else 0})
