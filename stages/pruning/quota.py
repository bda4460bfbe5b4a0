"""Per-cluster quotas (DBP, curation.md §1.3) and exact-size rounding: pure functions over arrays.

The DBP paper allots ``N`` samples over ``k`` clusters by the quadratic program

    minimise ½‖x − N·P‖²   s.t.  Σ_j x_j = N,  lb_j ≤ x_j ≤ ub_j

(the released code hands it to OSQP). It is the Euclidean projection of ``N·P`` onto a box cut by a hyperplane,
so its solution is ``x_j = clip(N·P_j + λ, lb_j, ub_j)`` for the one scalar ``λ`` with ``Σ_j x_j = N``: the shift
is *additive*. ``Σ_j x_j(λ)`` is non-decreasing and piecewise linear in ``λ``; bisection brackets ``λ`` on one
linear piece and the piece is then solved exactly. ``largest_remainder`` turns the real solution into integers
that sum to ``N`` exactly and stay within the (integer) bounds, where the released code's ``rint`` can miss ``N``.
"""
from __future__ import annotations

import numpy as np

BISECTION_STEPS = 200


def softmax(x: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(x, dtype=np.float64) / temperature
    z = np.exp(z - z.max())
    return z / z.sum()


def dbp_bounds(sizes: np.ndarray, n: int, cls_bal_ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """The released code's bounds: ``ub_j = |cluster j|``, ``lb_j = min(m, |cluster j| − 1)`` with
    ``m = floor(N/k · cls_bal_ratio)`` (``cls_bal_ratio > 0``) else 1; never below 0."""
    sizes = np.asarray(sizes, dtype=np.int64)
    m = int(np.floor(n / len(sizes) * cls_bal_ratio)) if cls_bal_ratio > 0 else 1
    return np.maximum(np.minimum(m, sizes - 1), 0), sizes


def project_capped_simplex(target: np.ndarray, total: float, lb: np.ndarray, ub: np.ndarray,
                           tol: float = 1e-9) -> np.ndarray:
    """The exact solution of ``min ½‖x − target‖²  s.t.  Σx = total, lb ≤ x ≤ ub``: ``clip(target + λ, lb, ub)``."""
    t, lb, ub = (np.asarray(a, dtype=np.float64) for a in (target, lb, ub))
    if np.any(lb > ub):
        raise ValueError("a lower bound exceeds its upper bound")
    if not lb.sum() - tol <= total <= ub.sum() + tol:
        raise ValueError(f"no allocation of {total:g} fits the bounds (they allow {lb.sum():g} to {ub.sum():g})")
    mass = lambda lam: np.clip(t + lam, lb, ub).sum()  # noqa: E731 - non-decreasing in lam
    lo, hi = float((lb - t).min()), float((ub - t).max())  # mass(lo) = Σlb <= total <= Σub = mass(hi)
    for _ in range(BISECTION_STEPS):
        mid = 0.5 * (lo + hi)
        if mass(mid) < total:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):
            break
    # Solve the linear piece exactly: the coordinates strictly between their bounds at the bracket move with λ.
    lam = 0.5 * (lo + hi)
    x = np.clip(t + lam, lb, ub)
    free = (t + lo > lb) & (t + hi < ub)
    if free.any():
        fixed_mass = x[~free].sum()
        lam = (total - fixed_mass - t[free].sum()) / free.sum()
        x = np.clip(t + lam, lb, ub)
    return x


def redistribute(target: np.ndarray, total: float, lb: np.ndarray, ub: np.ndarray) -> np.ndarray:
    """The ICLR reviewer's iterative alternative (*not* what the QP does): cap every cluster at its bounds and hand
    the leftover to the uncapped ones in proportion to their share, until nothing moves. Offered as a variant."""
    x = np.clip(np.asarray(target, dtype=np.float64), lb, ub)
    weight = np.asarray(target, dtype=np.float64).copy()
    for _ in range(len(x) + 1):
        left = total - x.sum()
        if abs(left) <= 1e-9 * max(total, 1.0):
            break
        room = (x < ub) if left > 0 else (x > lb)
        w = np.where(room, weight, 0.0)
        if w.sum() <= 0:
            w = room.astype(np.float64)
            if w.sum() == 0:
                raise ValueError(f"no allocation of {total:g} fits the bounds")
        x = np.clip(x + left * w / w.sum(), lb, ub)
    return x


def largest_remainder(x: np.ndarray, total: int, lb: np.ndarray | None = None,
                      ub: np.ndarray | None = None) -> np.ndarray:
    """Integers ``q`` with ``Σq = total``, ``floor(x) ≤ q ≤ ceil(x)`` and ``lb ≤ q ≤ ub``: the floors, plus one for
    the largest fractional parts (ties: the lower index). ``x`` must already sum to ``total`` within bounds."""
    x = np.asarray(x, dtype=np.float64)
    lb = np.zeros(len(x), np.int64) if lb is None else np.asarray(lb, dtype=np.int64)
    ub = np.full(len(x), np.iinfo(np.int64).max) if ub is None else np.asarray(ub, dtype=np.int64)
    # values within rounding noise of an integer are that integer (33.99999999997 is 34, not 33 + a remainder)
    near = np.abs(x - np.rint(x)) < 1e-7
    x = np.where(near, np.rint(x), x)
    q = np.clip(np.floor(x).astype(np.int64), lb, ub)
    short = int(total - q.sum())
    if short < 0:
        raise ValueError(f"the floors already exceed {total}")
    if short:
        frac = np.where(q < ub, x - q, -np.inf)
        order = np.lexsort((np.arange(len(x)), -frac))[:short]
        if np.isinf(frac[order]).any():
            raise ValueError(f"cannot round to {total} within the bounds")
        q[order] += 1
    return q
