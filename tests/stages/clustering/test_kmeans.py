"""k-means pieces against numpy: the seeded sample, assignment = brute-force argmax, d_intra and d_inter."""
from __future__ import annotations

import numpy as np
import pytest

from stages.clustering import kmeans


def blobs(n: int, k: int, d: int, seed: int, spread: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = kmeans.unit_rows(rng.normal(size=(k, d)))
    label = rng.integers(0, k, n)
    return kmeans.unit_rows(centres[label] + spread * rng.normal(size=(n, d)) / np.sqrt(d)), label


def test_fit_sample_is_seeded_sorted_and_sized():
    assert kmeans.fit_sample_size(10_000, 10, None, 256) == 2560  # faiss's cap
    assert kmeans.fit_sample_size(10_000, 10, 0.1, 256) == 1000
    assert kmeans.fit_sample_size(10_000, 10, None, None) == 10_000
    assert kmeans.fit_sample_size(100, 50, 0.1, 256) == 50  # never fewer than k
    with pytest.raises(ValueError, match="cannot make 20 clusters"):
        kmeans.fit_sample_size(10, 20, None, 256)
    a, b = kmeans.fit_sample(1000, 100, 7), kmeans.fit_sample(1000, 100, 7)
    assert (a == b).all() and len(np.unique(a)) == 100 and (np.diff(a) > 0).all()
    assert not (a == kmeans.fit_sample(1000, 100, 8)).all()
    assert (kmeans.fit_sample(50, 100, 7) == np.arange(50)).all()


def test_spherical_kmeans_recovers_separated_clusters_with_unit_centroids():
    x, label = blobs(2000, 8, 32, seed=0)
    fit = kmeans.fit_spherical_kmeans(x, 8, niter=20, seed=1, nredo=5)  # redos: random init can merge two blobs
    assert fit.centroids.shape == (8, 32)
    np.testing.assert_allclose(np.linalg.norm(fit.centroids, axis=1), 1, atol=1e-5)
    cluster, distance = kmeans.assign(x, fit.centroids)
    # each true blob maps to one cluster
    purity = sum(np.bincount(cluster[label == g]).max() for g in range(8)) / len(x)
    assert purity > 0.99
    assert fit.mean_distance == pytest.approx(distance.mean(), abs=1e-6) and len(fit.iterations) >= 20
    again = kmeans.fit_spherical_kmeans(x, 8, niter=20, seed=1, nredo=5)
    assert np.array_equal(fit.centroids, again.centroids), "seeded"


def test_assignment_is_the_brute_force_argmax_and_distance_is_one_minus_cos():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(3000, 24)).astype(np.float16)  # stored embeddings are float16, only nearly unit
    c = kmeans.unit_rows(rng.normal(size=(40, 24)))
    cluster, distance = kmeans.assign(x, c, batch=700)
    xu = x.astype(np.float64) / np.linalg.norm(x.astype(np.float64), axis=1, keepdims=True)
    cos = xu @ c.astype(np.float64).T
    best = cos.max(1)
    # equal to the argmax, except where two centroids tie within float32 noise
    assert (np.take_along_axis(cos, cluster[:, None], 1)[:, 0] >= best - 1e-6).all()
    assert (cluster == cos.argmax(1)).mean() > 0.999
    np.testing.assert_allclose(distance, 1 - best, atol=1e-6)


def test_cluster_table_equals_numpy():
    x, _ = blobs(1500, 12, 16, seed=4)
    fit = kmeans.fit_spherical_kmeans(x, 12, niter=10, seed=2)
    cluster, distance = kmeans.assign(x, fit.centroids)
    sizes = np.bincount(cluster, minlength=12)
    sums = np.bincount(cluster, weights=distance.astype(np.float64), minlength=12)
    for l in (1, 5, 20):  # 20 > k - 1: capped at 11
        t = kmeans.cluster_table(sizes, sums, fit.centroids, l)
        c = fit.centroids.astype(np.float64)
        cdist = 1 - c @ c.T
        np.fill_diagonal(cdist, np.inf)
        want_inter = np.sort(cdist, 1)[:, :min(l, 11)].mean(1)
        np.testing.assert_allclose(t["d_inter"], want_inter, atol=1e-6)
        want_intra = [(1 - x[cluster == j].astype(np.float64) @ c[j]).mean() for j in range(12)]
        np.testing.assert_allclose(t["d_intra"], want_intra, atol=1e-6)
        assert t["size"].tolist() == sizes.tolist() and t["cluster"].tolist() == list(range(12))


def test_d_inter_drops_self_by_id_even_with_duplicated_centroids():
    rng = np.random.default_rng(5)
    c = kmeans.unit_rows(rng.normal(size=(6, 8)))
    c = np.concatenate([c, c[:2]])  # centroids 6, 7 duplicate 0, 1: distance 0 between them
    d = kmeans.neighbour_distance(c, 1)
    assert d[0] == pytest.approx(0, abs=1e-6) and d[6] == pytest.approx(0, abs=1e-6)
    assert np.isnan(kmeans.neighbour_distance(c[:1], 20)).all()
    t = kmeans.cluster_table(np.array([0, 3]), np.array([0.0, 0.6]), c[:2], 20)
    assert np.isnan(t["d_intra"][0]) and t["d_intra"][1] == pytest.approx(0.2)
