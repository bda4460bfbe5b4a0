"""Frozen-embedding classifiers (SELECT's second evaluation mode): a linear probe and a cosine kNN.

They rank many selections in seconds on a CPU, before paying for training; ``ranking.py`` measures how far that
ranking can be trusted against trained accuracies.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ProbeResult:
    top1: float  # percent
    n_train: int
    n_test: int


def knn_predict(train: np.ndarray, labels: np.ndarray, test: np.ndarray, k: int, num_classes: int,
                chunk: int = 2048) -> np.ndarray:
    """Class of each test row by a similarity-weighted vote of its ``k`` most cosine-similar training rows
    (rows are unit vectors, so cosine is a dot product)."""
    k = min(k, len(train))
    out = np.empty(len(test), dtype=np.int64)
    for i in range(0, len(test), chunk):
        sims = test[i:i + chunk] @ train.T
        idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        w = np.take_along_axis(sims, idx, axis=1)
        votes = np.zeros((len(idx), num_classes))
        np.add.at(votes, (np.arange(len(idx))[:, None], labels[idx]), np.maximum(w, 0) + 1e-6)
        out[i:i + chunk] = votes.argmax(1)
    return out


def knn_probe(train: np.ndarray, labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray, k: int = 20,
              num_classes: int | None = None) -> ProbeResult:
    c = int(num_classes or max(labels.max(), test_labels.max()) + 1)
    pred = knn_predict(train, labels, test, k, c)
    return ProbeResult(float((pred == test_labels).mean() * 100), len(train), len(test))


def linear_probe(train: np.ndarray, labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray, c: float = 1.0,
                 max_iter: int = 1000, seed: int = 0) -> ProbeResult:
    """Multinomial logistic regression (L-BFGS) on standardised features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(train)
    clf = LogisticRegression(C=c, max_iter=max_iter, random_state=seed)
    clf.fit(scaler.transform(train), labels)
    pred = clf.predict(scaler.transform(test))
    return ProbeResult(float((pred == test_labels).mean() * 100), len(train), len(test))
