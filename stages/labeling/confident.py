"""Confident learning (Northcutt, Jiang, Chuang, JAIR 2021; curation.md §7), pure numpy over (labels, probs).

Inputs are the given (possibly noisy) labels ỹ and **out-of-sample** probabilities p̂ (K-fold teachers, kNN without
the sample itself, CLIP zero-shot): probabilities from a model that fitted ỹ would agree with the noise.

    confident_thresholds(labels, probs)      t_j = mean of p̂_j over the samples labelled j
    confident_classes(probs, t)              per sample, the class it confidently belongs to (-1: none)
    confident_joint(labels, probs, t)        C[i][j] = #(ỹ = i, confident class j)
    calibrate_joint(C, labels)               rows rescaled to the given-label counts (cleanlab's calibration)
    find_label_issues(labels, probs, method) the flagged mask (prune_by_noise_rate | prune_by_class | both |
                                             confident_learning | predicted_neq_given)
    normalized_margin / self_confidence      per-sample quality scores (cleanlab's ``rank_by``); noise_score

Where cleanlab (2.x) departs from the paper it is reproduced exactly, and said so: a class no sample is labelled
with gets threshold 2 (nothing reaches it); the joint's diagonal is clipped to >= 1; ``_keep_at_least_n_per_class``
truncates and rounds prune counts the way it does; a flagged sample whose given label is (within 1e-6) the argmax
is unflagged. The one choice left open is what happens when several classes pass their thresholds:
``among="confident"`` (the paper: argmax over the confident classes, the default) or ``among="all"`` (cleanlab:
the overall argmax, even when that class is below its threshold).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

METHODS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given")
Method = Literal["prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given"]
Among = Literal["confident", "all"]
EPS = 1e-6  # cleanlab's FLOATING_POINT_COMPARISON
MISSING_THRESHOLD = 2.0  # cleanlab's BIG_VALUE: no probability reaches the threshold of a class nobody is labelled


def _check(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"probs must be (n, C) with n = {len(labels)} labels; got {probs.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= probs.shape[1]):
        raise ValueError(f"labels must lie in [0, {probs.shape[1]})")
    return labels, probs


def confident_thresholds(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """t_j = mean p̂_j over samples with ỹ = j (``MISSING_THRESHOLD`` for a class nobody is labelled with),
    clipped below at 2e-6 as cleanlab does."""
    labels, probs = _check(labels, probs)
    c = probs.shape[1]
    counts = np.bincount(labels, minlength=c)
    sums = np.zeros(c)
    np.add.at(sums, labels, probs[np.arange(len(labels)), labels])
    t = np.where(counts > 0, sums / np.maximum(counts, 1), MISSING_THRESHOLD)
    return np.clip(t, 2 * EPS, None)


def confident_classes(probs: np.ndarray, thresholds: np.ndarray, among: Among = "confident") -> np.ndarray:
    """Per sample the class j with p̂_j >= t_j (the largest such p̂ when several pass, or cleanlab's overall argmax
    with ``among="all"``); -1 where no class passes."""
    probs = np.asarray(probs, dtype=np.float64)
    passing = probs >= np.asarray(thresholds) - EPS
    n_pass = passing.sum(axis=1)
    if among == "all":
        guess = np.where(n_pass > 1, probs.argmax(axis=1), passing.argmax(axis=1))
    else:
        guess = np.where(passing, probs, -np.inf).argmax(axis=1)
    return np.where(n_pass > 0, guess, -1)


def confident_joint(labels: np.ndarray, probs: np.ndarray, thresholds: np.ndarray | None = None,
                    among: Among = "confident", clip_diagonal: bool = True) -> np.ndarray:
    """C[i][j]: samples labelled i whose confident class is j (uncalibrated counts). The diagonal is clipped to
    at least 1 (``clip_diagonal``, cleanlab's guarantee that every class keeps one correct example)."""
    labels, probs = _check(labels, probs)
    t = confident_thresholds(labels, probs) if thresholds is None else np.asarray(thresholds)
    guess = confident_classes(probs, t, among)
    ok = guess >= 0
    c = probs.shape[1]
    joint = np.zeros((c, c), dtype=np.int64)
    np.add.at(joint, (labels[ok], guess[ok]), 1)
    if clip_diagonal:
        np.fill_diagonal(joint, np.maximum(joint.diagonal(), 1))
    return joint


def round_preserving_sum(values: np.ndarray) -> np.ndarray:
    """Round to integers keeping the (rounded) total: the entries closest to rounding the other way move first
    (cleanlab's ``round_preserving_sum``)."""
    floats = np.asarray(values, dtype=float)
    ints = floats.round()
    total = np.sum(floats).round()
    while abs(np.sum(ints).round() - total) > EPS:
        diff = np.round(total - np.sum(ints).round())
        step = -1 if diff < 0 else 1
        changes = min(int(abs(diff)), len(floats))
        order = np.argsort(floats - ints)[::-step][:changes]
        ints[order] += step
    return ints


def round_preserving_row_totals(matrix: np.ndarray) -> np.ndarray:
    return np.apply_along_axis(round_preserving_sum, 1, np.asarray(matrix, float)).astype(np.int64)


def calibrate_joint(joint: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Rows rescaled so each sums to its class's given-label count, the whole to n, rounded keeping row totals
    (cleanlab's ``calibrate_confident_joint``)."""
    joint = np.asarray(joint, float)
    counts = np.bincount(np.asarray(labels, np.int64), minlength=len(joint)).astype(float)
    cal = (joint.T / np.clip(joint.sum(axis=1), 1e-100, None) * counts).T
    cal = cal / np.clip(cal.sum(), 1e-100, None) * counts.sum()
    return round_preserving_row_totals(cal)


def estimate_joint(calibrated: np.ndarray) -> np.ndarray:
    """Q̂(ỹ = i, y* = j): the calibrated joint normalised to sum 1."""
    cal = np.asarray(calibrated, float)
    return cal / max(cal.sum(), 1e-100)


def noise_rate(calibrated: np.ndarray) -> float:
    """The estimated fraction of samples whose given label is wrong: the off-diagonal mass of Q̂."""
    q = estimate_joint(calibrated)
    return float(1.0 - np.trace(q))


def _prune_counts(calibrated: np.ndarray, min_per_class: int = 1) -> np.ndarray:
    """cleanlab's ``_keep_at_least_n_per_class`` (frac_noise 1) on the transposed joint: entry [j, k] = how many
    samples labelled k to flag as truly j; the diagonal keeps at least ``min_per_class``."""
    m = np.asarray(calibrated, float).T
    diag = m.diagonal()
    new_diag = np.maximum(diag, min_per_class)
    per_col = np.maximum(np.count_nonzero(m, axis=0) - 1.0, 1.0)
    new = m - (new_diag - diag) / per_col
    new[new < 0] = 0
    np.fill_diagonal(new, new_diag)
    return round_preserving_row_totals(new.astype(int))


def _by_noise_rate(labels: np.ndarray, probs: np.ndarray, counts: np.ndarray, min_per_class: int) -> np.ndarray:
    """For each off-diagonal (given k, true j): the ``counts[j, k]`` samples labelled k with the largest margin
    p̂_j − p̂_k."""
    mask = np.zeros(len(labels), bool)
    for k in range(probs.shape[1]):
        rows = np.flatnonzero(labels == k)
        if len(rows) <= min_per_class:
            continue
        for j in range(probs.shape[1]):
            n = int(counts[j, k])
            if j != k and n > 0:
                margin = probs[rows, j] - probs[rows, k]
                mask[rows[np.argsort(-margin, kind="quicksort")[:n]]] = True
    return mask


def _by_class(labels: np.ndarray, probs: np.ndarray, counts: np.ndarray, min_per_class: int) -> np.ndarray:
    """For each class k: the ``n_k − counts[k, k]`` samples labelled k with the lowest p̂_k."""
    mask = np.zeros(len(labels), bool)
    for k in range(probs.shape[1]):
        rows = np.flatnonzero(labels == k)
        if len(rows) <= min_per_class:
            continue
        n = len(rows) - int(counts[k, k])
        if n >= 1:
            mask[rows[np.argsort(probs[rows, k], kind="quicksort")[:n]]] = True
    return mask


@dataclass
class Issues:
    """The verdict: ``flagged`` per sample, the thresholds, the raw and calibrated confident joints, and each
    sample's confident class (-1: none)."""

    flagged: np.ndarray
    thresholds: np.ndarray
    joint: np.ndarray
    calibrated: np.ndarray
    confident: np.ndarray

    @property
    def noise_rate(self) -> float:
        return noise_rate(self.calibrated)


def find_label_issues(labels: np.ndarray, probs: np.ndarray, method: Method = "prune_by_noise_rate",
                      among: Among = "confident", min_per_class: int = 1) -> Issues:
    """Which given labels are wrong, by confident learning (``method`` as cleanlab's ``filter_by``)."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}' (one of: {', '.join(METHODS)})")
    labels, probs = _check(labels, probs)
    t = confident_thresholds(labels, probs)
    guess = confident_classes(probs, t, among)
    joint = confident_joint(labels, probs, t, among)
    cal = calibrate_joint(joint, labels)
    if method == "confident_learning":
        flagged = (guess >= 0) & (guess != labels)
    elif method == "predicted_neq_given":
        flagged = probs.argmax(axis=1) != labels
    else:
        counts = _prune_counts(cal, min_per_class)
        flagged = np.zeros(len(labels), bool)
        if method in ("prune_by_class", "both"):
            flagged = _by_class(labels, probs, counts, min_per_class)
        if method in ("prune_by_noise_rate", "both"):
            by_rate = _by_noise_rate(labels, probs, counts, min_per_class)
            flagged = flagged & by_rate if method == "both" else by_rate
    if method != "predicted_neq_given" and len(labels):
        bumped = probs.copy()
        bumped[np.arange(len(labels)), labels] += EPS
        flagged &= bumped.argmax(axis=1) != labels  # the given label is (within EPS) the most probable: keep it
    return Issues(flagged, t, joint, cal, guess)


def self_confidence(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    labels, probs = _check(labels, probs)
    return probs[np.arange(len(labels)), labels]


def normalized_margin(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """(p̂_ỹ − max_{j≠ỹ} p̂_j + 1) / 2 in [0, 1] (cleanlab's label quality ``normalized_margin``)."""
    labels, probs = _check(labels, probs)
    rows = np.arange(len(labels))
    others = probs.copy()
    others[rows, labels] = -np.inf
    return (probs[rows, labels] - others.max(axis=1) + 1.0) / 2.0


def noise_score(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """How likely the given label is wrong, in [0, 1]: 1 − normalized margin (0.5 = a tie with the best other)."""
    return 1.0 - normalized_margin(labels, probs)
