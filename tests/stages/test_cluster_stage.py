"""The cluster stage on the digits pool: fit on a sample, assign every part, the cluster table, resume (named apart from
tests/pipeline/test_cluster.py, the Dask cluster profiles: test modules need unique basenames)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import run_pipeline, tree_bytes
from curation_inputs import embed_shards
from stages.clustering.store import load_assignments, load_centroids, load_cluster_table
from stages.embedders.store import load_embeddings


def pixel_features(images: np.ndarray, _rows) -> np.ndarray:
    """Grey levels pooled to 8x8, centred: digits of a class end up near each other."""
    n = len(images)
    g = images.astype(np.float32).mean(-1).reshape(n, 8, 4, 8, 4).mean((2, 4)).reshape(n, 64)
    return g - g.mean(1, keepdims=True) + 1e-3


@pytest.fixture(scope="module")
def digit_embeddings(digits_shards, tmp_path_factory):
    return embed_shards(tmp_path_factory.mktemp("emb") / "embed", digits_shards.path, pixel_features)


def manifest(tmp, emb, **params):
    return {"name": "cl", "output_dir": str(tmp / "run"),
            "stages": [{"name": "cluster", "inputs": {"embeddings": str(emb)}, "params": params}]}


PARAMS = {"n_clusters": 12, "niter": 20, "max_points_per_centroid": 64, "neighbours": 4}


def test_cluster_fits_on_a_sample_and_assigns_every_train_row(digit_embeddings, tmp_path, client):
    (res,) = run_pipeline(manifest(tmp_path, digit_embeddings, **PARAMS), client)
    art = res.path
    m = json.loads((art / "manifest.json").read_text())
    phases = [p["phase"] for p in m["parts"]]
    assert phases[0] == "fit" and phases.count("fit") == 1
    emb = load_embeddings(digit_embeddings, "train")
    assert phases.count("assign") == len(m["metrics"]["parts"]) == 4  # one per embeddings part (3 train + 1 test)
    assert m["kind"] == "clusters" and m["counts"] == {"in": len(emb), "out": len(emb), "rejected": 0}
    assert m["metrics"]["fit_rows"] == 12 * 64 < len(emb)  # faiss's cap, applied by us with our seed
    assert m["metrics"]["pool"]["path"] == json.loads((digit_embeddings / "manifest.json").read_text())[
        "metrics"]["pool"]["path"]

    # row-aligned with the train rows of the embeddings, nearest centroid by brute force, 1 - cos
    a = load_assignments(art)
    assert a["uid"].to_pylist() == emb.uids and set(a["split"].to_pylist()) == {"train"}
    c = load_centroids(art)
    assert c.shape == (12, 64) and np.allclose(np.linalg.norm(c, axis=1), 1, atol=1e-5)
    x = emb.vectors / np.linalg.norm(emb.vectors, axis=1, keepdims=True)
    cos = x.astype(np.float64) @ c.T.astype(np.float64)
    cluster = a["cluster"].to_numpy()
    assert (cluster == cos.argmax(1)).mean() > 0.999
    np.testing.assert_allclose(a["distance"].to_numpy(), 1 - cos.max(1), atol=1e-5)

    # the table against numpy
    t = load_cluster_table(art).to_pydict()
    sizes = np.bincount(cluster, minlength=12)
    assert t["size"] == sizes.tolist() and sum(t["size"]) == len(emb)
    d = 1 - cos[np.arange(len(x)), cluster]
    np.testing.assert_allclose(t["d_intra"], [d[cluster == j].mean() for j in range(12)], atol=1e-5)
    cd = 1 - c.astype(np.float64) @ c.T.astype(np.float64)
    np.fill_diagonal(cd, np.inf)
    np.testing.assert_allclose(t["d_inter"], np.sort(cd, 1)[:, :4].mean(1), atol=1e-5)
    # digits cluster by class: most clusters are dominated by one digit
    labels = a["label"].to_numpy()
    purity = sum(np.bincount(labels[cluster == j]).max() for j in range(12) if sizes[j]) / len(labels)
    assert purity > 0.7
    for png in ("sizes.png", "cluster_samples.png"):
        assert (art / png).stat().st_size > 1000
    assert len(m["metrics"]["grid_clusters"]) == 8


def test_cluster_splits_param_and_sample_fraction(digit_embeddings, tmp_path, client):
    (res,) = run_pipeline(manifest(tmp_path, digit_embeddings, **{**PARAMS, "splits": None, "fit_fraction": 0.25,
                                                                  "max_points_per_centroid": None,
                                                                  "sample_grid": False}), client)
    m = json.loads((res.path / "manifest.json").read_text())
    everything = load_embeddings(digit_embeddings, None)
    assert m["counts"]["in"] == len(everything) == 1797 and m["metrics"]["fit_rows"] == int(np.ceil(0.25 * 1797))
    assert set(load_assignments(res.path)["split"].to_pylist()) == {"train", "test"}
    assert not (res.path / "cluster_samples.png").exists()


def test_cluster_is_cached_resumes_through_its_phases_and_ignores_execution_only_params(digit_embeddings, tmp_path,
                                                                                         client):
    (res,) = run_pipeline(manifest(tmp_path, digit_embeddings, **PARAMS), client)
    art = res.path
    ref = tree_bytes(art)
    (again,) = run_pipeline(manifest(tmp_path, digit_embeddings, **PARAMS, sample_grid=False, device="cpu"), client)
    assert again.status == "cached" and again.path == art
    # a killed run: no manifest, one assign part missing -> only that task runs again, same bytes
    (art / "manifest.json").unlink()
    (art / ".parts" / "assign.part1.json").unlink()
    (art / "assign" / "assign_1.parquet").unlink()
    (resumed,) = run_pipeline(manifest(tmp_path, digit_embeddings, **PARAMS), client)
    assert resumed.status == "ran" and tree_bytes(art) == ref
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    last = [e for e in events if e["event"] == "stage_resumed"][-1]
    assert last["phase"] == "assign" and last["pending"] == 1
    # the fit re-ran (its marker gone): every assignment is planned and written again, identical (seeded fit)
    (art / "manifest.json").unlink()
    (art / ".parts" / "fit.kmeans.json").unlink()
    run_pipeline(manifest(tmp_path, digit_embeddings, **PARAMS), client)
    assert tree_bytes(art) == ref
    # a different seed is a different artifact
    (other,) = run_pipeline(manifest(tmp_path, digit_embeddings, **{**PARAMS, "seed": 7}), client)
    assert other.path != art
    assert pq.read_table(other.path / "clusters.parquet").num_rows == 12
