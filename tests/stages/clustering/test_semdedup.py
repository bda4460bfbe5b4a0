"""SemDeDup's core: M_j against the whole-matrix reference, blocks against no blocks, keep orders, both rules."""
from __future__ import annotations

import numpy as np
import pytest

from stages.clustering.kmeans import unit_rows
from stages.clustering.semdedup import dropped_by, keep_order, pairwise_pass, reference_max_similarity


def cluster_like(n: int, d: int, seed: int, dups: int = 0) -> np.ndarray:
    """Unit rows around a common direction (a cluster), with ``dups`` noisy copies of earlier rows appended."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) + 3 * rng.normal(size=d)
    if dups:
        src = rng.integers(0, n, dups)
        x = np.concatenate([x, x[src] + 0.01 * rng.normal(size=(dups, d))])
    return unit_rows(x[rng.permutation(len(x))])


@pytest.mark.parametrize("n,d,batch", [(1, 8, 4), (2, 8, 4), (37, 16, 8), (200, 32, 64), (129, 24, 128)])
def test_max_earlier_similarity_equals_the_whole_matrix_reference(n, d, batch):
    e = cluster_like(n, d, seed=n, dups=n // 5)
    ref_m, ref_arg = reference_max_similarity(e)
    res = pairwise_pass(e, batch=batch)
    assert res.max_sim[0] == -np.inf and res.argmax[0] == -1
    np.testing.assert_allclose(res.max_sim[1:], ref_m[1:], atol=2e-6)
    # the argmax attains the maximum (ties may pick either index)
    rows = np.arange(1, len(e))
    np.testing.assert_allclose(np.einsum("ij,ij->i", e[res.argmax[rows]], e[rows]), ref_m[1:], atol=2e-6)
    assert (res.argmax[rows] < rows).all()


def test_blocks_equal_one_block_and_decisions_agree():
    e = cluster_like(300, 24, seed=1, dups=60)
    whole = pairwise_pass(e, [0.99, 0.9], batch=len(e))
    for batch in (1, 7, 64, 299):
        part = pairwise_pass(e, [0.99, 0.9], batch=batch)
        np.testing.assert_allclose(part.max_sim, whole.max_sim, atol=1e-6)
        for t in (0.99, 0.9):
            assert (dropped_by(part, "published", t) == dropped_by(whole, "published", t)).all()
        for i in range(2):
            assert (part.roots[i] == whole.roots[i]).all()


def test_published_rule_drops_j_iff_an_earlier_member_is_closer_than_the_threshold():
    e = cluster_like(120, 16, seed=2, dups=30)
    s = e @ e.T
    res = pairwise_pass(e, batch=16)
    for eps in (0.001, 0.01, 0.05):
        want = np.array([j > 0 and (s[:j, j] > 1 - eps).any() for j in range(len(e))])
        assert (dropped_by(res, "published", 1 - eps) == want).all()
    assert dropped_by(res, "published", 1 - 0.01).sum() >= 30 * 0.9  # the planted copies are found


def chain(groups: list[int], d: int = 64, seed: int = 0, step: float = 0.16):
    """Vectors in known groups: group g of size m is a chain v_0, v_1, ... where consecutive members are at
    similarity ~cos(step) and members two apart fall below it; groups are far from each other."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
    rows, labels, axis = [], [], 0
    for g, m in enumerate(groups):
        u, w = basis[axis], basis[axis + 1]
        axis += 2
        for i in range(m):
            rows.append(np.cos(i * step) * u + np.sin(i * step) * w)
            labels.append(g)
    return unit_rows(np.array(rows)), np.array(labels)


def test_exact_rule_keeps_one_survivor_per_group_chains_included():
    sizes = [1, 2, 3, 5, 8, 1, 4]
    e, label = chain(sizes)
    threshold = np.cos(0.16) - 1e-4  # consecutive members are duplicates, members two apart are not
    s = e @ e.T
    assert s[3, 4] > threshold and s[4, 5] > threshold and s[3, 5] < threshold  # group 2: A~B, B~C, A not~ C
    rng = np.random.default_rng(3)
    for _ in range(5):  # any keep order
        perm = rng.permutation(len(e))
        res = pairwise_pass(e[perm], [threshold], batch=3)
        kept = ~dropped_by(res, "exact", threshold, 0)
        assert sorted(label[perm][kept].tolist()) == list(range(len(sizes))), "one survivor per group"
        root = res.roots[0]
        assert (label[perm][root] == label[perm]).all(), "duplicate_of is a member of the same group"
        assert kept[root].all(), "and it is the survivor"
        assert (root <= np.arange(len(e))).all(), "the survivor is the group's first in keep order"


def test_the_rules_on_a_chain_a_b_c_where_a_and_c_are_not_duplicates():
    e, _ = chain([3])
    threshold = np.cos(0.16) - 1e-4
    a, b, c = 0, 1, 2
    expect = {  # keep order -> (published drops, exact drops), in that order
        (a, b, c): ([False, True, True], [False, True, True]),  # published drops C although B (its only dup) goes
        (b, a, c): ([False, True, True], [False, True, True]),
        (a, c, b): ([False, False, True], [False, True, True]),  # published keeps two of one group, exact one
    }
    for order, (published, exact) in expect.items():
        res = pairwise_pass(e[list(order)], [threshold], batch=2)
        assert dropped_by(res, "published", threshold).tolist() == published, order
        assert dropped_by(res, "exact", threshold, 0).tolist() == exact, order


def test_exact_rule_drops_a_superset_of_the_published_rule_and_both_keep_sets_have_no_duplicates():
    e = cluster_like(250, 12, seed=5, dups=80)
    ts = [0.999, 0.99, 0.95]
    res = pairwise_pass(e, ts, batch=32)
    s = e @ e.T
    np.fill_diagonal(s, -1)
    for i, t in enumerate(ts):
        pub, ex = dropped_by(res, "published", t), dropped_by(res, "exact", t, i)
        assert (pub <= ex).all() and ex.sum() >= pub.sum() > 0
        for drop in (pub, ex):
            kept = np.flatnonzero(~drop)
            assert not (s[np.ix_(kept, kept)] > t).any()
    assert dropped_by(res, "exact", 0.95, 2).sum() > dropped_by(res, "published", 0.95).sum(), "the rules differ"


def test_keep_orders_follow_the_paper_and_ignore_arrival_order():
    dist = np.array([0.3, 0.1, 0.5, 0.1, 0.2])
    keys = ["e", "d", "c", "b", "a"]
    hard = keep_order(dist, keys, "hard")
    assert dist[hard].tolist() == sorted(dist, reverse=True)  # farthest from the centroid first: it survives
    assert [keys[i] for i in hard][-2:] == ["b", "d"], "ties break by key"
    easy = keep_order(dist, keys, "easy")
    assert dist[easy].tolist() == sorted(dist)
    r1, r2 = keep_order(dist, keys, "random", seed=1, cluster=4), keep_order(dist, keys, "random", seed=1, cluster=4)
    assert (r1 == r2).all() and sorted(r1.tolist()) == list(range(5))
    orders = {tuple(keep_order(dist, keys, "random", seed=s, cluster=4).tolist()) for s in range(8)}
    assert len(orders) > 1
    perm = np.array([4, 2, 0, 3, 1])  # rows arriving in another order give the same members in the same order
    again = keep_order(dist[perm], [keys[i] for i in perm], "random", seed=1, cluster=4)
    assert [keys[i] for i in perm[again]] == [keys[i] for i in r1]
