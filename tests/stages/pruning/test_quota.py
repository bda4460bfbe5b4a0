"""DBP's per-cluster quotas: the closed form is the QP's exact solution, rounding hits N exactly within the bounds."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from stages.pruning.dbp import complexity, dbp_quotas
from stages.pruning.quota import (dbp_bounds, largest_remainder, project_capped_simplex, redistribute, softmax)


def osqp_solution(target: np.ndarray, total: float, lb: np.ndarray, ub: np.ndarray) -> np.ndarray:
    """The released code's way: ``qpsolvers.solve_qp(..., solver="osqp")`` on ½xᵀx − (N·P)ᵀx, tightened."""
    qpsolvers = pytest.importorskip("qpsolvers")
    import scipy.sparse as sp

    k = len(target)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        x = qpsolvers.solve_qp(sp.identity(k, format="csc"), -np.asarray(target, float),
                               A=sp.csc_matrix(np.ones((1, k))), b=np.array([float(total)]), lb=lb.astype(float),
                               ub=ub.astype(float), solver="osqp", eps_abs=1e-10, eps_rel=1e-10, polish=True,
                               max_iter=200_000)
    assert x is not None
    return x


def objective(x: np.ndarray, target: np.ndarray) -> float:
    return 0.5 * float(np.sum((x - target) ** 2))


def random_instance(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int, float]:
    k = int(rng.integers(2, 80))
    sizes = np.where(rng.random(k) < 0.2, rng.integers(1, 4, k), rng.integers(1, 2000, k)).astype(np.int64)
    comp = rng.random(k) * rng.choice([0.05, 0.3, 1.0])
    tau = float(rng.choice([0.01, 0.1, 0.5, 2.0]))
    ratio = float(rng.choice([0.0, 0.0, 0.25, 0.5, 1.0]))
    n = int(rng.integers(1, sizes.sum() + 1))
    lb, ub = dbp_bounds(sizes, n, ratio)
    n = int(np.clip(n, lb.sum(), ub.sum()))
    return sizes, softmax(comp, tau), n, ratio


def test_closed_form_equals_a_generic_qp_solver_on_many_random_instances():
    rng = np.random.default_rng(0)
    checked = 0
    for _ in range(300):
        sizes, prob, n, ratio = random_instance(rng)
        lb, ub = dbp_bounds(sizes, n, ratio)
        if lb.sum() > n:
            continue
        ours = project_capped_simplex(n * prob, n, lb, ub)
        ref = osqp_solution(n * prob, n, lb, ub)
        assert abs(ours.sum() - n) < 1e-6 * max(n, 1)
        assert np.all(ours >= lb - 1e-9) and np.all(ours <= ub + 1e-9)
        # ours is exact: never worse than the solver, and the same point up to the solver's tolerance
        assert objective(ours, n * prob) <= objective(np.clip(ref, lb, ub), n * prob) + 1e-6 * max(1, n)
        np.testing.assert_allclose(ours, ref, atol=1e-4 * max(1.0, n ** 0.5))
        # the KKT conditions of the projection: one shift λ for every coordinate strictly inside its bounds
        free = (ours > lb + 1e-7) & (ours < ub - 1e-7)
        if free.any():
            lam = (ours - n * prob)[free]
            assert np.ptp(lam) < 1e-6 * max(1, n)
            shifted = n * prob + lam.mean()
            at_lb, at_ub = ~free & (ours <= lb + 1e-7), ~free & (ours >= ub - 1e-7)
            assert np.all(shifted[at_lb] <= lb[at_lb] + 1e-6) and np.all(shifted[at_ub] >= ub[at_ub] - 1e-6)
        q = largest_remainder(ours, n, lb, ub)
        assert q.sum() == n and np.all(q >= lb) and np.all(q <= ub) and np.all(np.abs(q - ours) < 1)
        checked += 1
    assert checked > 250


def test_curation_example_qp_is_additive_and_the_reviewers_variant_is_not():
    sizes, prob, n = np.array([10, 100, 100]), np.array([0.5, 0.4, 0.1]), 60
    lb, ub = dbp_bounds(sizes, n, 0.0)
    assert lb.tolist() == [1, 1, 1] and ub.tolist() == [10, 100, 100]
    x = project_capped_simplex(n * prob, n, lb, ub)
    np.testing.assert_allclose(x, [10, 34, 16])
    assert largest_remainder(x, n, lb, ub).tolist() == [10, 34, 16]
    np.testing.assert_allclose(redistribute(n * prob, n, lb, ub), [10, 40, 10])
    np.testing.assert_allclose(osqp_solution(n * prob, n, lb, ub), [10, 34, 16], atol=1e-6)


def test_bounds_follow_the_released_code():
    sizes = np.array([1, 2, 50, 400, 0])
    assert dbp_bounds(sizes, 100, 0.0)[0].tolist() == [0, 1, 1, 1, 0]  # floor of 1, never the whole cluster
    # cls_bal_ratio 0.5: m = floor(100 / 5 * 0.5) = 10, capped at |j| - 1
    assert dbp_bounds(sizes, 100, 0.5)[0].tolist() == [0, 1, 10, 10, 0]
    with pytest.raises(ValueError, match="no allocation"):
        project_capped_simplex(np.ones(3), 10, np.zeros(3), np.array([1, 2, 3]))


def test_largest_remainder_is_exact_and_stable():
    x = np.array([2.5, 2.5, 2.5, 2.5])
    assert largest_remainder(x, 10).tolist() == [3, 3, 2, 2]  # ties: lower index first
    assert largest_remainder(np.array([33.999999999997, 26.000000000003]), 60).tolist() == [34, 26]
    q = largest_remainder(np.array([0.4, 0.4, 0.2]) * 7, 7)
    assert q.sum() == 7 and q.tolist() == [3, 3, 1]
    # rint (the released code) misses N here; largest remainder never does
    x = np.array([1.5, 1.5, 1.5, 1.5, 4.0])
    assert np.rint(x).sum() != 10 and largest_remainder(x, 10).sum() == 10


def test_complexity_nan_for_tiny_clusters_becomes_the_mean_and_quotas_sum_to_n():
    d_intra = np.array([0.2, 0.4, 0.3, 0.1])
    d_inter = np.array([0.5, 0.5, 0.6, 0.9])
    sizes = np.array([100, 80, 2, 1])
    c = complexity(d_intra, d_inter, sizes, 3)
    np.testing.assert_allclose(c, [0.1, 0.2, 0.15, 0.15])
    prob, x, q = dbp_quotas(sizes, c, 90, temperature=0.1)
    np.testing.assert_allclose(prob, softmax(c, 0.1))
    lb, ub = dbp_bounds(sizes, 90, 0.0)
    assert lb.tolist() == [1, 1, 1, 0] and q.sum() == 90 and np.all((q >= lb) & (q <= sizes))
    assert q[1] > q[0]  # the more complex cluster gets more
