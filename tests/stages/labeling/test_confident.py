"""Confident learning: thresholds, the confident joint and the flags against a hand computation, and against
cleanlab itself on random instances (when cleanlab is installed: ``pip install cleanlab``)."""
from __future__ import annotations

import numpy as np
import pytest

from stages.labeling.confident import (calibrate_joint, confident_classes, confident_joint, confident_thresholds,
                                       find_label_issues, noise_score, normalized_margin)

# 6 samples, 3 classes; labels as given (sample 5 is labelled 0 but looks like class 2)
LABELS = np.array([0, 0, 1, 1, 2, 0])
PROBS = np.array([
    [0.8, 0.1, 0.1],
    [0.6, 0.3, 0.1],
    [0.2, 0.7, 0.1],
    [0.1, 0.5, 0.4],
    [0.1, 0.2, 0.7],
    [0.1, 0.1, 0.8],
])


def test_thresholds_and_confident_joint_equal_a_hand_computation():
    t = confident_thresholds(LABELS, PROBS)
    # t_0 = mean(0.8, 0.6, 0.1) = 0.5; t_1 = mean(0.7, 0.5) = 0.6; t_2 = mean(0.7) = 0.7
    np.testing.assert_allclose(t, [0.5, 0.6, 0.7])
    # confident classes: s0 {0}; s1 {0}; s2 {1}; s3 none (0.5 < 0.6, 0.4 < 0.7); s4 {2}; s5 {2}
    assert confident_classes(PROBS, t).tolist() == [0, 0, 1, -1, 2, 2]
    joint = confident_joint(LABELS, PROBS, t)
    assert joint.tolist() == [[2, 0, 1],   # labelled 0: two confidently 0, one (s5) confidently 2
                              [0, 1, 0],   # labelled 1: s2 (s3 counts nowhere)
                              [0, 0, 1]]
    # calibration: row i rescaled to the count of label i (3, 2, 1) and the whole to n = 6, rounding keeping rows
    assert calibrate_joint(joint, LABELS).tolist() == [[2, 0, 1], [0, 2, 0], [0, 0, 1]]
    issues = find_label_issues(LABELS, PROBS)
    assert issues.flagged.tolist() == [False, False, False, False, False, True]
    assert abs(issues.noise_rate - 1 / 6) < 1e-12


def test_several_confident_classes_paper_vs_cleanlab_argmax():
    # both 1 and 2 pass their thresholds; the overall argmax (0) does not
    probs = np.array([[0.5, 0.3, 0.2]])
    t = np.array([0.6, 0.25, 0.15])
    assert confident_classes(probs, t, among="confident").tolist() == [1]  # the paper: argmax among the confident
    assert confident_classes(probs, t, among="all").tolist() == [0]  # cleanlab: the overall argmax


def test_a_class_nobody_is_labelled_with_gets_an_unreachable_threshold():
    t = confident_thresholds(np.array([0, 0, 1]), np.array([[0.9, 0.05, 0.05], [0.1, 0.1, 0.8], [0.2, 0.7, 0.1]]))
    assert t[2] == 2.0 and confident_classes(np.array([[0.0, 0.0, 1.0]]), t).tolist() == [-1]


def test_scores():
    nm = normalized_margin(LABELS, PROBS)
    np.testing.assert_allclose(nm, [(0.8 - 0.1 + 1) / 2, (0.6 - 0.3 + 1) / 2, (0.7 - 0.2 + 1) / 2,
                                    (0.5 - 0.4 + 1) / 2, (0.7 - 0.2 + 1) / 2, (0.1 - 0.8 + 1) / 2])
    assert noise_score(LABELS, PROBS).argmax() == 5


def _random_instance(rng, n, c, noise):
    true = rng.integers(0, c, n)
    labels = true.copy()
    flip = rng.random(n) < noise
    labels[flip] = (true[flip] + rng.integers(1, c, flip.sum())) % c
    logits = rng.normal(0, 1, (n, c)) + 2.5 * np.eye(c)[true]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probs


@pytest.mark.parametrize("seed", range(6))
def test_agrees_with_cleanlab_on_random_instances(seed):
    cl_count = pytest.importorskip("cleanlab.count")
    cl_filter = pytest.importorskip("cleanlab.filter")
    rng = np.random.default_rng(seed)
    labels, probs = _random_instance(rng, int(rng.integers(60, 400)), int(rng.integers(3, 8)), 0.25)
    np.testing.assert_allclose(confident_thresholds(labels, probs), cl_count.get_confident_thresholds(labels, probs))
    raw = cl_count.compute_confident_joint(labels, probs, calibrate=False)
    assert np.array_equal(confident_joint(labels, probs, among="all"), raw)
    cal = cl_count.compute_confident_joint(labels, probs, calibrate=True)
    assert np.array_equal(calibrate_joint(raw, labels), cal)
    for method in ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given"):
        want = cl_filter.find_label_issues(labels, probs, filter_by=method, n_jobs=1)
        got = find_label_issues(labels, probs, method, among="all").flagged
        assert np.array_equal(got, want), method
