"""Curation artifacts written directly in their formats (embeddings, clusters, selections, teachers' out-of-fold
predictions) over a pool, until the stages that make them land; and a pool without images for unit tests."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import Artifact, ArtifactManifest, now_iso
from stages.clustering.store import CLUSTER_SCHEMA, write_assignments
from stages.embedders.store import write_part
from stages.sharding.pool import pool_record


class Ctx:
    def __init__(self, root: Path) -> None:
        self.root = root

    def output(self, rel: str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def write_manifest(path: Path, kind: str, stage: str, metrics: dict | None = None, params: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    aid = hashlib.sha256(f"{path.resolve()}-{kind}-{stage}".encode()).hexdigest()
    Artifact(path).write_manifest(ArtifactManifest(artifact_id=aid, stage=stage, kind=kind, name=stage,
                                                   stage_version="1", params=params or {}, code_version="test",
                                                   created=now_iso(), metrics=metrics or {}))
    return path


def uid(i: int) -> str:
    return hashlib.md5(str(i).encode()).hexdigest()  # 32 hex characters, unordered like real uids


def fake_pool(path: Path, labels: np.ndarray, test: int = 0, classes: list[str] | None = None) -> Path:
    """A shards artifact without images: index rows for ``len(labels)`` train samples (+ ``test``)."""
    n = len(labels) + test
    lab = np.concatenate([np.asarray(labels), np.arange(test) % max(1, int(np.max(labels)) + 1)]).astype(np.int32)
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({
        "key": [f"{i // 1000:05d}{i % 1000:04d}" for i in range(n)], "uid": [uid(i) for i in range(n)],
        "split": ["train"] * len(labels) + ["test"] * test,
        "shard": pa.array([i // 1000 for i in range(n)], pa.int32()),
        "label": pa.array(lab, pa.int32()), "offset": pa.array([0] * n, pa.int64()),
        "bytes": pa.array([0] * n, pa.int64()), "width": pa.array([8] * n, pa.int32()),
        "height": pa.array([8] * n, pa.int32())}), path / "index.parquet")
    k = int(lab.max()) + 1 if n else 0
    (path / "classes.json").write_text(json.dumps(classes or [f"c{i}" for i in range(k)]))
    return write_manifest(path, "shards", "shard")


def index(pool: Path, split: str | None = "train") -> pa.Table:
    t = pq.read_table(pool / "index.parquet")
    if split is not None:
        import pyarrow.compute as pc

        t = t.filter(pc.equal(t["split"], split))
    return t


def fake_clusters(path: Path, pool: Path, cluster: np.ndarray, distance: np.ndarray, centroids: np.ndarray,
                  d_inter: np.ndarray | None = None, split: str = "train") -> Path:
    """A clusters artifact for the pool's ``split`` rows (row-aligned with its index order)."""
    meta = index(pool, split).select(["key", "uid", "split", "shard", "label"])
    write_assignments(Ctx(path), 0, meta, cluster, distance)
    k = len(centroids)
    np.save(path / "centroids.npy", np.asarray(centroids, np.float32))
    sizes = np.bincount(cluster, minlength=k)
    d_intra = np.bincount(cluster, weights=distance, minlength=k) / np.maximum(sizes, 1)
    if d_inter is None:
        from stages.pruning.clusters import inter_distance

        d_inter = inter_distance(centroids, 20)
    pq.write_table(pa.table({"cluster": np.arange(k, dtype=np.int32), "size": sizes.astype(np.int64),
                             "d_intra": d_intra, "d_inter": np.asarray(d_inter, np.float64)}, schema=CLUSTER_SCHEMA),
                   path / "clusters.parquet")
    return write_manifest(path, "clusters", "cluster", {"pool": pool_record(pool), "parts": [0]})


def clusters_from_vectors(path: Path, pool: Path, vectors: np.ndarray, k: int, seed: int = 0) -> Path:
    """Spherical k-means (a few Lloyd steps) of unit ``vectors`` (row-aligned with the pool's train rows)."""
    x = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    c = x[rng.choice(len(x), k, replace=False)]
    for _ in range(20):
        a = np.argmax(x @ c.T, axis=1)
        for j in range(k):
            m = x[a == j]
            if len(m):
                c[j] = m.sum(0) / np.linalg.norm(m.sum(0))
    a = np.argmax(x @ c.T, axis=1)
    dist = 1 - np.einsum("ij,ij->i", x, c[a])
    return fake_clusters(path, pool, a, dist, c)


def fake_embeddings(path: Path, pool: Path, img: np.ndarray, text: np.ndarray | None = None,
                    split: str = "train") -> Path:
    meta = index(pool, split).select(["key", "uid", "split", "shard", "label"])
    write_part(Ctx(path), 0, img, meta, text)
    return write_manifest(path, "embeddings", "embed", {"pool": pool_record(pool), "parts": [0]})


def fake_teacher(path: Path, uids: list[str], labels: np.ndarray, probs: np.ndarray) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"uid": uids, "label": np.asarray(labels, np.int64), "pred": probs.argmax(1),
                             "probs": list(np.asarray(probs, np.float32))}), path / "oof_predictions.parquet")
    return write_manifest(path, "model", "teacher", params={"folds": 5})


def fake_selection(path: Path, pool: Path, keep_uids: set[str], stage: str = "dedup", split: str = "train") -> Path:
    """A dedup-like selection of the pool's ``split``: the others dropped as duplicates of the first kept row."""
    from stages.selections.store import write_selection
    import pyarrow.compute as pc

    rows = index(pool, split).select(["key", "uid", "split", "shard", "label"])
    mask = pc.is_in(rows["uid"], value_set=pa.array(sorted(keep_uids)))
    kept, dropped = rows.filter(mask), rows.filter(pc.invert(mask))
    first = kept.column("uid")[0].as_py() if kept.num_rows else None
    dropped = dropped.append_column("reason", pa.array(["duplicate"] * dropped.num_rows)).append_column(
        "duplicate_of", pa.array([first] * dropped.num_rows, pa.string()))
    path.mkdir(parents=True, exist_ok=True)
    write_selection(path, kept, dropped)
    return write_manifest(path, "selection", stage, {"pool": pool_record(pool)})
