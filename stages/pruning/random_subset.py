"""``random``: a uniform random subset of the candidates; ``class_balanced`` keeps every class's share exactly
(largest-remainder counts per class), the control every other method is compared against."""
from __future__ import annotations

from typing import Literal

import numpy as np

from stages.pruning.base import (PRUNERS, Candidates, Decision, Pruner, PrunerParams, Target, group_ids, mask_of,
                                 proportional_quota)


class RandomParams(PrunerParams):
    method: Literal["random"] = "random"
    class_balanced: bool = False  # the same fraction of every class (counts by largest remainder)


@PRUNERS.register()
class RandomPruner(Pruner):
    name = "random"
    Params = RandomParams

    def select(self, cand: Candidates, target: Target) -> Decision:
        p: RandomParams = self.params  # type: ignore[assignment]
        n_rows = len(cand)
        n = target.size(n_rows)
        rng = np.random.default_rng(cand.seed)
        if not p.class_balanced:
            return Decision(mask_of(rng.choice(n_rows, size=n, replace=False), n_rows), "random: not drawn")
        _, group = group_ids(cand.rows["label"])
        sizes = np.bincount(group)
        quota = proportional_quota(sizes, n)
        picked = [rng.choice(np.flatnonzero(group == g), size=int(q), replace=False) for g, q in enumerate(quota)]
        keep = mask_of(np.concatenate(picked) if picked else np.empty(0, np.int64), n_rows)
        return Decision(keep, "random: not drawn", metrics={"per_class": {"sizes": sizes.tolist(),
                                                                          "kept": quota.tolist()}})
