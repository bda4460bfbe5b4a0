"""The cluster stage: spherical k-means (FAISS) of an embeddings artifact, fitted on a seeded sample, then every
embeddings part assigned in parallel.

Phases: ``fit`` (one task: draw the sample from the chosen splits, fit, write ``centroids.npy``) then ``assign``
(one task per embeddings part: nearest centroid and cosine distance of each row, ``assign/assign_{N}.parquet``).
Finalize streams the assignments once for the per-cluster table (size, d_intra, d_inter) and draws the pictures.
Layout: ``stages/clustering/store.py``; the maths: ``stages/clustering/kmeans.py``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, field_validator

from pipeline.artifacts import PartRecord
from pipeline.errors import InputError
from pipeline.stage import (STAGES, FinalizeContext, InputArtifact, PlanContext, Stage, StageParams, Summary, Task,
                            TaskContext, execution_only)
from stages.clustering import kmeans, pictures
from stages.clustering.inputs import part_split_rows, part_vectors, sample_vectors
from stages.clustering.store import CLUSTER_SCHEMA, assign_file, write_assignments
from stages.embedders.store import parts as embedding_parts
from stages.embedders.store import read_part
from stages.sharding.pool import find_pool, pool_record


class ClusterParams(StageParams):
    n_clusters: int = Field(100, ge=1)  # SemDeDup: 50,000 for LAION-440M; DBP: 500 (LAION), 100 (DataComp medium)
    splits: list[str] | None = ["train"]  # which splits to cluster (None: every split)
    niter: int = Field(100, ge=1)  # SemDeDup's and DBP's faiss setting
    seed: int = 1234  # faiss's seed (SemDeDup's) and the fit sample's
    nredo: int = Field(1, ge=1)
    fit_fraction: float | None = Field(None, gt=0, le=1)  # NeMo Curator's fit_data_fraction (None: all rows)
    max_points_per_centroid: int | None = Field(256, ge=1)  # faiss's cap on the fit sample (None: no cap)
    neighbours: int = Field(20, ge=1)  # l of d_inter (DBP's --num_NNs), capped at k - 1
    device: Literal["auto", "cpu", "cuda"] = execution_only("auto")  # GPU k-means/search when faiss has GPUs
    sample_grid: bool = execution_only(True)  # cluster_samples.png (reads images from the pool)
    grid_clusters: int = execution_only(8)
    grid_per_cluster: int = execution_only(10)

    @field_validator("splits")
    @classmethod
    def _some_split(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and not v:
            raise ValueError("name at least one split, or null for every split")
        return v


@STAGES.register()
class ClusterStage(Stage[ClusterParams]):
    name = "cluster"
    version = "1"
    Params = ClusterParams
    input_kinds = {"embeddings": ("embeddings",)}
    output_kind = "clusters"
    resources = {"GPU": 1}  # used by faiss when it has GPU support; CPU workers otherwise
    phases = ("fit", "assign")

    def plan(self, inputs: dict[str, InputArtifact], params: ClusterParams, ctx: PlanContext) -> list[Task]:
        parts = embedding_parts(inputs["embeddings"].path)
        if ctx.phase == "fit":
            return [Task(id="kmeans", payload={"parts": parts})]
        # the centroids' hash keys the per-worker cache: a forced re-fit in the same directory is never served stale
        sha = next(f.sha256 for f in ctx.previous["fit"][0].files if f.path == "centroids.npy")
        return [Task(id=f"part{n}", payload={"part": n, "centroids": sha}) for n in parts]

    def run(self, task: Task, params: ClusterParams, ctx: TaskContext) -> dict[str, Any]:
        kmeans.worker_threads()
        gpus = kmeans.faiss_gpus(params.device)
        emb = ctx.inputs["embeddings"].path
        if ctx.phase == "fit":
            return self._fit(emb, task.payload["parts"], params, gpus, ctx)
        n = task.payload["part"]
        vec, meta = read_part(emb, n)
        rows = part_split_rows(emb, n, params.splits)
        centroids = ctx.cached(f"centroids:{task.payload['centroids']}", lambda: np.load(ctx.out_dir / "centroids.npy"))
        cluster, distance = kmeans.assign(vec[rows], centroids, gpus)
        return write_assignments(ctx, n, meta.take(pa.array(rows, pa.int64())), cluster, distance)

    @staticmethod
    def _fit(emb: Path, parts: list[int], params: ClusterParams, gpus: int, ctx: TaskContext) -> dict[str, Any]:
        split_rows = [part_split_rows(emb, n, params.splits) for n in parts]
        total = sum(len(r) for r in split_rows)
        size = kmeans.fit_sample_size(total, params.n_clusters, params.fit_fraction, params.max_points_per_centroid)
        picks = kmeans.fit_sample(total, size, params.seed)
        x = sample_vectors(emb, parts, split_rows, picks)
        fit = kmeans.fit_spherical_kmeans(x, params.n_clusters, niter=params.niter, seed=params.seed,
                                          nredo=params.nredo, gpus=gpus)
        with open(ctx.output("centroids.npy"), "wb") as f:
            np.save(f, fit.centroids.astype(np.float32), allow_pickle=False)
        return {"rows": total, "fit_rows": int(size), "dim": int(x.shape[1]), "fit_mean_distance": fit.mean_distance,
                "iterations": len(fit.iterations), "fit_seconds": fit.iterations[-1]["time"] if fit.iterations else None,
                "gpu": fit.gpu}

    def finalize(self, parts: list[PartRecord], params: ClusterParams, ctx: FinalizeContext) -> Summary:
        import faiss

        emb = ctx.inputs["embeddings"].path
        fit = next(p.info for p in parts if p.phase == "fit")
        assigned = [p.info for p in parts if p.phase == "assign"]
        k = params.n_clusters
        sizes, sums = np.zeros(k, np.int64), np.zeros(k, np.float64)
        for a in assigned:  # one streamed pass over two columns
            t = pq.read_table(ctx.out_dir / assign_file(a["part"]), columns=["cluster", "distance"])
            c = t["cluster"].to_numpy()
            sizes += np.bincount(c, minlength=k)
            sums += np.bincount(c, weights=t["distance"].to_numpy().astype(np.float64), minlength=k)
        centroids = np.load(ctx.out_dir / "centroids.npy")
        table = kmeans.cluster_table(sizes, sums, centroids, params.neighbours)
        pq.write_table(pa.table(table, schema=CLUSTER_SCHEMA), ctx.path("clusters.parquet"))
        files = ["clusters.parquet", "sizes.png"]
        pictures.size_histogram(sizes, ctx.path("sizes.png"))
        metrics: dict[str, Any] = {
            "parts": [a["part"] for a in assigned], "splits": params.splits, "pool": pool_record(emb),
            "n_clusters": k, "rows": int(sizes.sum()), "fit_rows": fit["fit_rows"], "dim": fit["dim"],
            "fit_mean_distance": fit["fit_mean_distance"], "iterations": fit["iterations"], "fit_seconds": fit["fit_seconds"],
            "gpu": fit["gpu"], "faiss": faiss.__version__, "empty_clusters": int((sizes == 0).sum()),
            "size": {"min": int(sizes.min()), "median": float(np.median(sizes)), "max": int(sizes.max())},
            "mean_distance": float(sums.sum() / max(1, sizes.sum())), "d_inter_neighbours": min(params.neighbours, k - 1),
        }
        if params.sample_grid:
            try:
                metrics["grid_clusters"] = self._grid(ctx, [a["part"] for a in assigned], table, params)
                files.append("cluster_samples.png")
            except InputError as e:  # the pool moved: a picture is not worth failing the stage for
                metrics["grid_clusters"] = f"not drawn: {e}"
        n = int(sizes.sum())
        return Summary(counts={"in": n, "out": n, "rejected": 0}, metrics=metrics, files=files)

    @staticmethod
    def _grid(ctx: FinalizeContext, parts: list[int], table: dict[str, np.ndarray], params: ClusterParams) -> list[int]:
        """Clusters spread over the size ranking (largest to smallest non-empty), each with its members nearest
        the centroid."""
        by_size = np.argsort(-table["size"], kind="stable")
        by_size = by_size[table["size"][by_size] > 0]
        chosen = sorted(set(by_size[np.linspace(0, len(by_size) - 1, min(params.grid_clusters, len(by_size)))
                                    .round().astype(int)].tolist()), key=lambda c: -table["size"][c])
        m = params.grid_per_cluster
        near = {c: pa.table({"key": pa.array([], pa.string()), "distance": pa.array([], pa.float32())}) for c in chosen}
        for n in parts:  # keep each chosen cluster's m nearest members seen so far
            t = pq.read_table(ctx.out_dir / assign_file(n), columns=["key", "cluster", "distance"])
            t = t.filter(pc.is_in(t["cluster"], value_set=pa.array(chosen, pa.int32())))
            for c in chosen:
                both = pa.concat_tables([near[c], t.filter(pc.equal(t["cluster"], c)).select(["key", "distance"])])
                near[c] = both.sort_by([("distance", "ascending"), ("key", "ascending")]).slice(0, m)
        rows = [(f"cluster {c}\n{table['size'][c]} samples\nd_intra {table['d_intra'][c]:.3f}",
                 near[c]["key"].to_pylist()) for c in chosen]
        pictures.rows_grid(find_pool(ctx.inputs["embeddings"].path), rows, ctx.path("cluster_samples.png"))
        return chosen
