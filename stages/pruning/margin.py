"""``margin``: the margin of an out-of-fold teacher, ``p_y − max_{c≠y} p_c`` (an EL2N-like difficulty that needs no
training-dynamics bookkeeping such as forgetting counts).

The teacher artifact must have been trained with ``folds: K`` (K >= 2): every sample's probabilities then come
from a model that never saw it (``oof_predictions.parquet``: uid, label, pred, probs), so memorised samples do not
look easy. ``which_to_keep: hard`` keeps the smallest margins (ambiguous, and also mislabelled, samples), ``easy``
the largest; ``class_balanced`` keeps the same fraction of every class. On CIFAR-10, hard-keeping score methods
beat random at mild pruning and lose badly at aggressive pruning (curation.md §9).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from stages.pruning.base import (PRUNERS, Candidates, Decision, PrunerParams, ScorePruner, Target, WhichToKeep,
                                 group_ids, mask_of, need_file, proportional_quota, ranked, take_per_group)

OOF_FILE = "oof_predictions.parquet"


class MarginParams(PrunerParams):
    method: Literal["margin"] = "margin"
    which_to_keep: WhichToKeep = "hard"
    class_balanced: bool = False


def margins(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``p_y − max_{c≠y} p_c`` per row (negative when the teacher prefers another class)."""
    probs = np.asarray(probs, dtype=np.float64)
    rows = np.arange(len(probs))
    labels = np.asarray(labels, dtype=np.int64)
    py = probs[rows, labels]
    others = probs.copy()
    others[rows, labels] = -np.inf
    return py - others.max(axis=1)


def oof_margins(teacher: Path) -> pa.Table:
    path = need_file(teacher / OOF_FILE, "no out-of-fold predictions",
                     "train the teacher with folds: K (K >= 2) so every sample is scored by a model that never saw it")
    t = pq.read_table(path, columns=["uid", "label", "probs"])
    n = t.num_rows
    flat = pc.list_flatten(t.column("probs")).to_numpy(zero_copy_only=False)
    probs = flat.reshape(n, -1) if n else np.zeros((0, 1))
    return pa.table({"uid": t.column("uid"), "score": margins(probs, t.column("label").to_numpy())})


@PRUNERS.register()
class MarginPruner(ScorePruner):
    name = "margin"
    Params = MarginParams
    needs = ("teacher",)

    def scores(self, artifact: Path) -> pa.Table:
        return oof_margins(artifact)

    def select(self, cand: Candidates, target: Target) -> Decision:
        p: MarginParams = self.params  # type: ignore[assignment]
        score = cand.column("score", np.float64)
        n_rows = len(score)
        n = target.size(n_rows)
        order = ranked(score, cand.tiebreak(), descending=p.which_to_keep == "easy")
        metrics = {"which_to_keep": p.which_to_keep, "negative_margins": int((score < 0).sum())}
        if p.class_balanced:
            _, group = group_ids(cand.rows["label"])
            quota = proportional_quota(np.bincount(group), n)
            keep = mask_of(take_per_group(order, group, quota), n_rows)
        else:
            keep = mask_of(order[:n], n_rows)
        why = "margin: too easy" if p.which_to_keep == "hard" else "margin: too hard"
        return Decision(keep, why, score=score, metrics=metrics)
