"""SemDeDup within one cluster (Abbas et al. 2023; curation.md §2), as pure functions over its unit embeddings.

1. ``keep_order``: the members in the order that decides who survives: by distance to the centroid, descending
   (``hard``: the least prototypical survives, the paper's default), ascending (``easy``) or a seeded shuffle
   (``random``). Ties break by key, so the result never depends on how rows arrived.
2. ``pairwise_pass``: in that order, ``M_j = max_{i<j} cos(e_i, e_j)`` and the ``i`` attaining it, by batched
   matrix products (torch, on a GPU when given one) over ``batch x batch`` blocks of the strict upper triangle:
   never the ``n x n`` matrix of a large cluster at once (the released code's ``O(n^2)`` memory, and NeMo
   Curator's single ``batch x n`` slab).
3. Rules, for a threshold ``1 - eps``:

   * ``published`` (the paper's pseudo-code and released code): drop ``j`` iff ``M_j > 1 - eps``, whether or not
     that earlier member survives. In a chain A~B~C with A not similar to C (keep order A, B, C) both B and C go,
     although C's only duplicate B goes too (a greedy "drop if a *kept* member is similar" rule would keep C).
     Yet it can keep several members of one connected group: in keep order A, C, B it keeps A and C (C has no
     earlier duplicate) and drops B. ``duplicate_of`` is the most similar earlier member.
   * ``exact``: connected components of the graph with an edge wherever ``cos > 1 - eps`` (union-find over the
     same blocks); exactly one member per component survives, the first in ``keep_order``, whatever the order;
     ``duplicate_of`` is that survivor. In both orders above only A survives.

   A member the published rule drops has an earlier neighbour, so it is not first in its component: the exact rule
   drops a superset of what the published rule drops (never keeps more), and both keep sets hold no pair above
   the threshold.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Sequence

import numpy as np

Which = Literal["hard", "easy", "random"]
Rule = Literal["published", "exact"]


def keep_order(distance: np.ndarray, keys: Sequence[str], which: Which, seed: int = 0,
               cluster: int = 0) -> np.ndarray:
    """Permutation of a cluster's members: position 0 is the first considered (it always survives)."""
    keys_arr = np.asarray(keys, dtype=object).astype(str)
    by_key = np.argsort(keys_arr, kind="stable")
    if which == "random":  # seeded per cluster: independent of how clusters are bucketed into tasks
        return by_key[np.random.default_rng([seed, cluster]).permutation(len(by_key))]
    d = np.asarray(distance, dtype=np.float64)[by_key]
    return by_key[np.argsort(-d if which == "hard" else d, kind="stable")]


class _Components:
    """Union-find whose roots are the smallest member index (= the first in keep order), with vectorised finds."""

    def __init__(self, n: int) -> None:
        self.parent = np.arange(n, dtype=np.int64)

    def roots(self, x: np.ndarray) -> np.ndarray:
        r = self.parent[x]
        while True:
            up = self.parent[r]
            if np.array_equal(up, r):
                break
            r = up
        self.parent[x] = r  # path compression
        return r

    def union_block(self, ii: np.ndarray, jj: np.ndarray, i0: int, i1: int, j0: int, j1: int) -> None:
        """Join members ``i0 + ii`` and ``j0 + jj`` (the edges of one block): roots are found once per block row
        and column, so a block full of edges inside one group costs two small finds and a comparison."""
        ra = self.roots(np.arange(i0, i1))[ii]
        rb = self.roots(np.arange(j0, j1))[jj]
        differ = ra != rb
        if not differ.any():
            return
        pairs = np.unique(np.stack([np.minimum(ra, rb)[differ], np.maximum(ra, rb)[differ]], 1), axis=0)
        for lo, hi in pairs.tolist():  # few: edges inside one group collapse to one pair of roots
            rl, rh = int(self.roots(np.array([lo]))[0]), int(self.roots(np.array([hi]))[0])
            if rl != rh:
                self.parent[max(rl, rh)] = min(rl, rh)

    def labels(self) -> np.ndarray:
        return self.roots(np.arange(len(self.parent)))


@dataclass
class PairwiseResult:
    max_sim: np.ndarray  # float32 [n]: M_j = max_{i<j} S_ij in keep order (-inf for the first)
    argmax: np.ndarray  # int64 [n]: the i attaining it (-1 for the first)
    roots: list[np.ndarray]  # per threshold given: the component root (= survivor) of each member, in keep order


def pairwise_pass(emb: np.ndarray, thresholds: Sequence[float] = (), batch: int = 1024,
                  device: str = "cpu") -> PairwiseResult:
    """One pass over the strict upper triangle of ``emb @ emb.T`` (rows already in keep order) in blocks.

    ``thresholds``: similarity thresholds (``1 - eps``) for which to also build connected components.
    """
    import torch

    n = len(emb)
    e = torch.as_tensor(np.ascontiguousarray(emb, dtype=np.float32)).to(device)
    best = torch.full((n,), float("-inf"), dtype=torch.float32, device=device)
    best_i = torch.full((n,), -1, dtype=torch.int64, device=device)
    comps = [_Components(n) for _ in thresholds]
    for j0 in range(0, n, batch):
        j1 = min(n, j0 + batch)
        cols = e[j0:j1]
        for i0 in range(0, j1, batch):
            i1 = min(j1, i0 + batch)
            s = e[i0:i1] @ cols.T  # [i1 - i0, j1 - j0]
            if i1 > j0:  # a diagonal block: keep i < j only
                ii = torch.arange(i0, i1, device=device)[:, None]
                jj = torch.arange(j0, j1, device=device)[None, :]
                s = s.masked_fill(ii >= jj, float("-inf"))
            m, a = s.max(0)
            better = m > best[j0:j1]  # strict: on a tie the earlier block's (smaller) i stays
            best[j0:j1] = torch.where(better, m, best[j0:j1])
            best_i[j0:j1] = torch.where(better, a + i0, best_i[j0:j1])
            for t, c in zip(thresholds, comps):
                hit = (s > t).nonzero().cpu().numpy()
                if len(hit):
                    c.union_block(hit[:, 0], hit[:, 1], i0, i1, j0, j1)
    return PairwiseResult(best.cpu().numpy(), best_i.cpu().numpy(), [c.labels() for c in comps])


def dropped_by(result: PairwiseResult, rule: Rule, threshold: float, which: int = 0) -> np.ndarray:
    """Boolean mask (keep order) of the members a rule drops at similarity threshold ``1 - eps``; for the exact rule
    ``which`` names the entry of ``result.roots`` built for that threshold."""
    if rule == "published":
        return result.max_sim > threshold
    roots = result.roots[which]
    return roots != np.arange(len(roots))


def reference_max_similarity(emb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The released code's computation, whole-matrix: ``M_j`` and its argmax from the strict upper triangle of
    ``E E^T`` (for tests and benchmarks on small clusters)."""
    e = np.asarray(emb, dtype=np.float64)
    s = e @ e.T
    s[np.tril_indices(len(e))] = -np.inf
    return s.max(0).astype(np.float32), np.where(np.isfinite(s.max(0)), s.argmax(0), -1)
