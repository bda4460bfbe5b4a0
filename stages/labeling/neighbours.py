"""``neighbours``: the distribution of the *given* labels of a sample's k nearest neighbours in embedding space
(FAISS exact inner product on the L2-normalised embeddings = cosine), the sample itself excluded.

* Neighbours are drawn from the rows being labelled (the pool's split), with the labels those rows came with.
* The sample itself is excluded by its row, never by "the first hit": ``k + 1`` are searched and the row's own
  entry removed (the last hit when ties at similarity 1 pushed it out). **Exact duplicates of the sample are
  kept** as neighbours: a duplicate with the same label is real agreement, one with another label is exactly the
  conflict worth flagging; run dedup first when duplicates should not vote (cleanlab's Datalab instead assumes the
  first hit is the sample and miscounts duplicates, curation.md §7).
* ``weighted``: votes weighted by max(cosine, 0) instead of 1. ``smoothing`` ε mixes in the uniform distribution,
  ``(1 − ε)·votes + ε/C``, so no class has probability exactly 0.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from stages.labeling.base import LABEL_SOURCES, LabelSource, SourceParams, embedding_rows


class NeighboursParams(SourceParams):
    source: Literal["neighbours"] = "neighbours"
    k: int = Field(10, ge=1)
    weighted: bool = False
    smoothing: float = Field(0.01, ge=0, lt=1)


def knn_excluding_self(vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, indices), each (n, k): the k nearest other rows of each row (inner product)."""
    import faiss

    x = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(x)
    k = min(k, n - 1)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    sims, idx = index.search(x, k + 1)
    own = idx == np.arange(n)[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), k)  # the own entry, else the last hit
    keep = np.ones_like(own)
    keep[np.arange(n), drop] = False
    return sims[keep].reshape(n, k), idx[keep].reshape(n, k)


def neighbour_distribution(labels: np.ndarray, sims: np.ndarray, idx: np.ndarray, num_classes: int,
                           weighted: bool = False, smoothing: float = 0.0) -> np.ndarray:
    """(n, C): the (optionally similarity-weighted) share of each class among the neighbours, smoothed."""
    votes = labels[idx]
    w = np.maximum(sims, 0.0).astype(np.float64) if weighted else np.ones(idx.shape)
    out = np.zeros((len(idx), num_classes))
    np.add.at(out, (np.repeat(np.arange(len(idx)), idx.shape[1]), votes.ravel()), w.ravel())
    total = out.sum(axis=1, keepdims=True)
    out = np.where(total > 0, out / np.where(total > 0, total, 1), 1.0 / num_classes)
    return (1 - smoothing) * out + smoothing / num_classes


@LABEL_SOURCES.register()
class NeighboursSource(LabelSource):
    name = "neighbours"
    Params = NeighboursParams
    needs = ("embeddings",)

    missing_reason = "neighbours: no embedding for this row"

    def probs(self, rows: pa.Table, inputs: dict[str, Path], classes: list[str]) -> np.ndarray:
        p: NeighboursParams = self.params  # type: ignore[assignment]
        vec = embedding_rows(inputs["embeddings"], rows.column("uid"))
        ok = ~np.isnan(vec).any(axis=1)
        out = np.full((rows.num_rows, len(classes)), np.nan)
        if ok.sum() < 2:
            return out
        labels = rows.column("label").to_numpy(zero_copy_only=False)[ok].astype(np.int64)
        sims, idx = knn_excluding_self(vec[ok], p.k)
        out[ok] = neighbour_distribution(labels, sims, idx, len(classes), p.weighted, p.smoothing)
        return out
