"""``clip-score``: image–caption cosine similarity from an open_clip embeddings artifact (DataComp's CLIP-score
filter, curation.md §5.2).

* ``threshold: t`` keeps every row with score >= t (DataComp: B/32 >= 0.25 or 0.28, LAION-2B style);
* ``fraction: f`` is DataComp's ``--fraction``: the threshold is the value at index ``int(n·f)`` of the scores
  sorted descending and every row scoring at least that is kept, so ties (and that one row) keep slightly more
  than ``f·n``; the manifest records the threshold;
* ``count: c`` keeps exactly the ``c`` best (equal scores ordered by uid).

Rows without a caption (no, or an all-zero, caption embedding) are dropped with the reason
``clip-score: no score``. Scores are computed part by part, so the embeddings never sit in memory whole.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa

from stages.pruning.base import PRUNERS, Candidates, Decision, PrunerParams, ScorePruner, Target, mask_of, ranked


class ClipScoreParams(PrunerParams):
    method: Literal["clip-score"] = "clip-score"
    threshold: float | None = None  # keep score >= threshold (then give neither fraction nor count)


def clip_scores(artifact: Path) -> pa.Table:
    """uid, score: the cosine of each row's image and caption embeddings (null without a caption)."""
    from stages.embedders.store import iter_parts, read_part

    uids, scores = [], []
    for n, img, meta in iter_parts(artifact):
        txt, _ = read_part(artifact, n, text=True)
        s = np.einsum("ij,ij->i", img, txt)
        has_text = np.linalg.norm(txt, axis=1) > 0.5  # unit rows; an all-zero row means no caption
        uids.append(meta.column("uid"))
        scores.append(pa.array(s.astype(np.float64), mask=~has_text))
    if not uids:
        return pa.table({"uid": pa.array([], pa.string()), "score": pa.array([], pa.float64())})
    return pa.table({"uid": pa.chunked_array([c for u in uids for c in u.chunks], pa.string()),
                     "score": pa.chunked_array(scores, pa.float64())})


def datacomp_threshold(scores: np.ndarray, fraction: float) -> float:
    """DataComp's ``get_threshold``: ``-sort(-scores)[int(n · fraction)]`` (keep everything when that is past the
    end)."""
    n = int(len(scores) * fraction)
    if n >= len(scores):
        return -np.inf
    return float(-np.sort(-np.asarray(scores, np.float64))[n])


@PRUNERS.register()
class ClipScorePruner(ScorePruner):
    name = "clip-score"
    Params = ClipScoreParams
    needs = ("embeddings",)

    def wants_target(self) -> bool:
        return self.params.threshold is None  # type: ignore[attr-defined]

    def scores(self, artifact: Path) -> pa.Table:
        return clip_scores(artifact)

    def select(self, cand: Candidates, target: Target) -> Decision:
        p: ClipScoreParams = self.params  # type: ignore[assignment]
        score = cand.column("score", np.float64)
        n_rows = len(score)
        if p.threshold is not None:
            thr, keep = p.threshold, score >= p.threshold
        elif target.count is not None:
            keep = mask_of(ranked(score, cand.tiebreak(), descending=True)[: target.size(n_rows)], n_rows)
            thr = float(score[keep].min()) if keep.any() else float("inf")
        else:
            thr = datacomp_threshold(score, target.fraction)  # type: ignore[arg-type]
            keep = score >= thr
        return Decision(keep, f"clip-score: below {thr:.6g}", score=score,
                        metrics={"threshold": thr if np.isfinite(thr) else None,
                                 "score": {"min": float(score.min()), "mean": float(score.mean()),
                                           "max": float(score.max())} if n_rows else None})
