"""Frozen-embedding probes and ranking agreement."""
from __future__ import annotations

import numpy as np
import pytest

from stages.evaluation.probe import knn_predict, knn_probe, linear_probe
from stages.evaluation.ranking import pairwise_agreement, spearman


def blobs(n, d=16, classes=4, noise=0.3, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, d))
    y = rng.integers(0, classes, n)
    x = centres[y] + noise * rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


def test_knn_matches_a_brute_force_vote():
    x, y = blobs(60)
    q, _ = blobs(7, seed=1)
    pred = knn_predict(x, y, q, k=5, num_classes=4, chunk=3)
    for i, row in enumerate(q):
        sims = x @ row
        top = np.argsort(-sims)[:5]
        votes = np.zeros(4)
        for j in top:
            votes[y[j]] += max(sims[j], 0) + 1e-6
        assert pred[i] == votes.argmax()


def test_probes_separate_good_from_useless_features():
    x, y = blobs(400)
    tx, ty = blobs(200, seed=0)
    tx = tx[::-1].copy()
    ty = ty[::-1].copy()
    assert linear_probe(x, y, tx, ty).top1 > 95 and knn_probe(x, y, tx, ty).top1 > 95
    rng = np.random.default_rng(3)
    noise = rng.normal(size=x.shape)
    assert linear_probe(noise, y, rng.normal(size=tx.shape), ty).top1 < 45  # 4 classes: chance is 25%


def test_rank_agreement():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert pairwise_agreement([1, 2, 3], [1, 3, 2]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least 3"):
        spearman([1, 2], [1, 2])
