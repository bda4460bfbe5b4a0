"""The dedup stage: SemDeDup within the clusters of a clusters artifact, as published (or with the exact
one-survivor-per-group rule), writing a selection.

Phases: ``partition`` (one task per embeddings part: its clustered rows, with their float16 vectors, written to
``by_cluster/<bucket>/`` with ``pipeline.partitions``; a bucket is ``cluster % buckets``, so 50,000 clusters make
at most ``buckets`` tasks) then ``dedup`` (one task per bucket: every cluster in it, whole, through
``stages.clustering.semdedup``; its per-row table goes to ``pruning/<bucket>.parquet``). Finalize writes the
selection (``write_selection``: dropped rows carry reason ``duplicate`` and ``duplicate_of``), ``pairs.parquet``,
the eps table and the pictures.
"""
from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from pipeline.artifacts import PartRecord
from pipeline.errors import InputError
from pipeline.partitions import planned_partitions, read_partition, write_partitions
from pipeline.stage import (STAGES, FinalizeContext, InputArtifact, PlanContext, Stage, StageParams, Summary, Task,
                            TaskContext, execution_only)
from stages.clustering import kmeans, pictures, semdedup
from stages.clustering.inputs import part_vectors, split_mask
from stages.clustering.store import assign_file
from stages.embedders.store import part_files
from stages.embedders.store import parts as embedding_parts
from stages.selections.store import write_selection
from stages.sharding.pool import find_pool, pool_record

PARTITIONS = "by_cluster"
ROW_COLUMNS = ["key", "uid", "split", "shard", "label", "cluster", "distance"]


class DedupParams(StageParams):
    eps: list[float] = [0.01]  # thresholds: drop when similarity > 1 - eps; a list gives the eps -> kept table
    eps_to_extract: float | None = None  # the eps that makes the selection (NeMo Curator's name); None: eps[0]
    which_to_keep: Literal["hard", "easy", "random"] = "hard"  # who survives: far from / near the centroid / random
    rule: Literal["published", "exact"] = "published"  # exact: one survivor per connected group of duplicates
    seed: int = 0  # for which_to_keep: random
    buckets: int = Field(256, ge=1)  # dedup tasks at most (clusters hashed into buckets)
    batch_size: int = execution_only(1024)  # block side of the pairwise products
    device: Literal["auto", "cpu", "cuda"] = execution_only("auto")
    sample_grid: bool = execution_only(True)  # duplicate_pairs.png (reads images from the pool)

    @field_validator("eps", mode="before")
    @classmethod
    def _as_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, (int, float)) else v

    @field_validator("eps")
    @classmethod
    def _range(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 < e < 2 for e in v):
            raise ValueError("give one or more eps in (0, 2): similarity thresholds are 1 - eps")
        return v

    @model_validator(mode="after")
    def _chosen(self) -> "DedupParams":
        if self.eps_to_extract is not None and self.eps_to_extract not in self.eps:
            raise ValueError(f"eps_to_extract {self.eps_to_extract} is not one of eps {self.eps}")
        return self

    @property
    def chosen(self) -> float:
        return self.eps[0] if self.eps_to_extract is None else self.eps_to_extract


def _device(choice: str) -> str:
    import torch

    if choice == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda, but torch sees no GPU (device: auto)")
    return "cuda" if choice != "cpu" and torch.cuda.is_available() else "cpu"


@STAGES.register()
class DedupStage(Stage[DedupParams]):
    name = "dedup"
    version = "1"
    Params = DedupParams
    input_kinds = {"embeddings": ("embeddings",), "clusters": ("clusters",)}
    output_kind = "selection"
    resources = {"GPU": 1}  # the pairwise products run on it when there is one
    phases = ("partition", "dedup")

    def plan(self, inputs: dict[str, InputArtifact], params: DedupParams, ctx: PlanContext) -> list[Task]:
        emb, clusters = inputs["embeddings"], inputs["clusters"]
        cm = clusters.manifest
        if cm.inputs.get("embeddings") != emb.manifest.artifact_id:
            raise InputError(f"{clusters.path}: clustered other embeddings ({str(cm.inputs.get('embeddings'))[:12]}), "
                             f"not {emb.path} ({emb.manifest.artifact_id[:12]})")
        if ctx.phase == "partition":
            k = int(cm.metrics["n_clusters"])
            return [Task(id=f"part{n}", payload={"part": n, "splits": cm.metrics["splits"],
                                                 "buckets": min(k, params.buckets)})
                    for n in embedding_parts(emb.path)]
        return [Task(id=f"b{name}", payload={"bucket": name}, size=n)
                for name, n in planned_partitions(ctx.previous["partition"]).items()]

    def run(self, task: Task, params: DedupParams, ctx: TaskContext) -> dict[str, Any]:
        if ctx.phase == "partition":
            return self._partition(task.payload, ctx)
        kmeans.worker_threads()
        device = _device(params.device)
        t = read_partition(ctx.out_dir, task.payload["bucket"], PARTITIONS)
        t = t.take(pc.sort_indices(t, [("cluster", "ascending"), ("key", "ascending")]))
        clusters = t["cluster"].to_numpy()
        starts = np.flatnonzero(np.r_[True, clusters[1:] != clusters[:-1]]) if len(t) else np.array([], int)
        bounds = list(zip(starts.tolist(), np.r_[starts[1:], len(t)].tolist()))
        vectors = _unpack(t["emb"].combine_chunks())
        tables, kept, pairs = [], np.zeros(len(params.eps), np.int64), 0
        for done, (lo, hi) in enumerate(bounds):
            tables.append(self._cluster(t.slice(lo, hi - lo), vectors[lo:hi], params, device, kept))
            pairs += (hi - lo) * (hi - lo - 1) // 2
            ctx.progress(done + 1, len(bounds), rows=hi)
        out = pa.concat_tables(tables) if tables else None
        if out is not None:
            pq.write_table(out, ctx.output(f"pruning/{task.payload['bucket']}.parquet"))
        return {"bucket": task.payload["bucket"], "rows": len(t), "clusters": len(bounds), "pairs": int(pairs),
                "kept": kept.tolist(), "dropped": int(0 if out is None else pc.sum(out["dropped"]).as_py() or 0),
                "largest": max((hi - lo for lo, hi in bounds), default=0)}

    @staticmethod
    def _partition(payload: dict[str, Any], ctx: TaskContext) -> dict[str, Any]:
        """One embeddings part's clustered rows, with their stored vectors, split into buckets by cluster."""
        emb, clusters = ctx.inputs["embeddings"].path, ctx.inputs["clusters"].path
        n = payload["part"]
        meta = pq.read_table(emb / part_files(n)["meta"], columns=["key", "split"])
        rows = np.flatnonzero(split_mask(meta["split"], payload["splits"]))
        assigned = pq.read_table(clusters / assign_file(n), columns=ROW_COLUMNS)
        if assigned.num_rows != len(rows) or not assigned["key"].equals(meta["key"].take(pa.array(rows))):
            raise InputError(f"{clusters / assign_file(n)}: rows do not match embeddings part {n}")
        vec = part_vectors(emb, n, rows).astype(np.float16)
        packed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(2 * vec.shape[1]), len(vec),
                                                      [None, pa.py_buffer(np.ascontiguousarray(vec).tobytes())])
        table = assigned.append_column("emb", packed)
        return {"part": n, "rows": table.num_rows,
                "partitions": write_partitions(ctx, table, "cluster", PARTITIONS, payload["buckets"])}

    @staticmethod
    def _cluster(rows: pa.Table, vectors: np.ndarray, params: DedupParams, device: str, kept: np.ndarray) -> pa.Table:
        """SemDeDup of one whole cluster: its rows in keep order with M_j, the nearest earlier member, and the
        decision at the chosen eps; adds the survivors per eps to ``kept``."""
        cluster = int(rows["cluster"][0].as_py())
        keys = rows["key"].to_pylist()
        order = semdedup.keep_order(rows["distance"].to_numpy(), keys, params.which_to_keep, params.seed, cluster)
        emb = kmeans.unit_rows(vectors[order])
        exact = params.rule == "exact"
        res = semdedup.pairwise_pass(emb, [1 - e for e in params.eps] if exact else (), params.batch_size, device)
        for i, e in enumerate(params.eps):
            kept[i] += int((~semdedup.dropped_by(res, params.rule, 1 - e, i)).sum())
        chosen = params.eps.index(params.chosen)
        drop = semdedup.dropped_by(res, params.rule, 1 - params.chosen, chosen)
        nearest = np.where(res.argmax >= 0, res.argmax, 0)
        if exact:  # the group's survivor, and the similarity to it
            of = res.roots[chosen]
            sim_of = np.einsum("ij,ij->i", emb, emb[of])
        else:  # the most similar earlier member: the reason j goes
            of, sim_of = nearest, res.max_sim
        out = rows.select(ROW_COLUMNS).take(pa.array(order))
        first = res.argmax < 0
        at = pa.array(nearest)
        for name, col in {"rank": pa.array(np.arange(len(order)), pa.int32()),
                          "max_similarity": _masked(pa.array(res.max_sim.astype(np.float32)), first),
                          "nearest": _masked(out["uid"].take(at), first),
                          "nearest_key": _masked(out["key"].take(at), first),
                          "dropped": pa.array(drop),
                          "duplicate_of": _masked(out["uid"].take(pa.array(of)), ~drop),
                          "similarity": _masked(pa.array(np.asarray(sim_of, np.float32)), ~drop)}.items():
            out = out.append_column(name, col)
        return out

    def finalize(self, parts: list[PartRecord], params: DedupParams, ctx: FinalizeContext) -> Summary:
        emb = ctx.inputs["embeddings"].path
        done = [p.info for p in parts if p.phase == "dedup"]
        rows = pa.concat_tables([pq.read_table(ctx.out_dir / f"pruning/{d['bucket']}.parquet")
                                 for d in done if d["rows"]])
        n = rows.num_rows
        drop = rows["dropped"]
        kept = rows.filter(pc.invert(drop)).select(ROW_COLUMNS).sort_by("key")
        dropped = rows.filter(drop).select([*ROW_COLUMNS, "duplicate_of", "similarity"]).sort_by("key")
        dropped = dropped.add_column(5, "reason", pa.array(["duplicate"] * dropped.num_rows, pa.string()))
        files = write_selection(ctx.out_dir, kept, dropped)
        # every member with a near-duplicate earlier in its cluster, at the loosest eps (re-threshold any eps in it)
        loosest = 1 - max(params.eps)
        near = rows.filter(pc.greater(pc.fill_null(rows["max_similarity"], -2.0), loosest))
        pairs = pa.table({"key": near["key"], "uid": near["uid"], "duplicate_of": near["nearest"],
                          "duplicate_of_key": near["nearest_key"],
                          "similarity": near["max_similarity"], "cluster": near["cluster"],
                          "dropped": near["dropped"]}).sort_by([("similarity", "descending"), ("key", "ascending")])
        pq.write_table(pairs, ctx.path("pairs.parquet"))
        files.append("pairs.parquet")
        kept_by_eps = np.sum([d["kept"] for d in done], axis=0) if done else np.zeros(len(params.eps))
        table = [{"eps": e, "kept": int(k), "kept_fraction": float(k / max(n, 1))}
                 for e, k in zip(params.eps, kept_by_eps)]
        pictures.eps_curve(params.eps, [r["kept_fraction"] for r in table], params.chosen, params.rule,
                           ctx.path("eps.png"))
        files.append("eps.png")
        metrics: dict[str, Any] = {
            "pool": pool_record(emb), "eps": params.chosen, "rule": params.rule,
            "which_to_keep": params.which_to_keep, "eps_table": table, "kept": kept.num_rows,
            "dropped": dropped.num_rows, "kept_fraction": kept.num_rows / max(n, 1), "pairs": pairs.num_rows,
            "clusters": sum(d["clusters"] for d in done), "largest_cluster": max((d["largest"] for d in done), default=0),
            "similarities_computed": sum(d["pairs"] for d in done),
        }
        if params.sample_grid and pairs.num_rows:
            try:
                pictures.pairs_grid(find_pool(emb), _levels(pairs, 1 - params.chosen), ctx.path("duplicate_pairs.png"))
                files.append("duplicate_pairs.png")
            except InputError as e:  # the pool moved: a picture is not worth failing the stage for
                metrics["grid"] = f"not drawn: {e}"
        return Summary(counts={"in": n, "out": kept.num_rows, "rejected": dropped.num_rows}, metrics=metrics,
                       files=files)


def _unpack(packed: pa.FixedSizeBinaryArray) -> np.ndarray:
    """The float16 vectors of a ``fixed_size_binary`` column, without copying."""
    d = packed.type.byte_width // 2
    return np.frombuffer(packed.buffers()[1], dtype=np.float16, count=len(packed) * d,
                         offset=packed.offset * d * 2).reshape(len(packed), d)


def _masked(values: pa.Array, null: np.ndarray) -> pa.Array:
    """``values`` with nulls where ``null`` is set."""
    return pc.if_else(pa.array(null), pa.nulls(len(values), values.type), values)


def _levels(pairs: pa.Table, threshold: float, per_level: int = 6) -> list[tuple[str, list]]:
    """Pairs (sorted by similarity, descending) in rows of a few each: the dropped ones cut into four equal-count
    similarity levels, then two levels of the closest pairs that were kept (what the threshold let through)."""
    sims = pairs["similarity"].to_numpy()
    a, b = pairs["duplicate_of_key"].to_pylist(), pairs["key"].to_pylist()
    dropped = np.flatnonzero(sims > threshold)
    near = np.flatnonzero(sims <= threshold)[:max(4 * per_level, len(dropped) // 4)]
    out = []
    for idx, levels, tag in ((dropped, 4, "dropped"), (near, 2, "kept")):
        for chunk in np.array_split(idx, min(levels, len(idx))) if len(idx) else []:
            pick = chunk[np.linspace(0, len(chunk) - 1, min(per_level, len(chunk))).round().astype(int)]
            out.append((f"{sims[chunk[0]]:.4f}-{sims[chunk[-1]]:.4f}\n{tag}",
                        [(a[i], b[i], float(sims[i])) for i in pick]))
    return out
