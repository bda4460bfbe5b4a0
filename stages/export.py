"""The export stage: materialise a selection (or re-shard a shards artifact) into new WebDataset shards, one task
per output shard, reading each chosen sample from the pool's tars by offset (DataComp's resharder, streaming and
parallel).

The output is a complete ``shards`` artifact every consumer reads (the shard stage's layout: tars, per-shard
parquet, ``_stats.json`` done-markers, ``index.parquet``, ``rejects.parquet``, ``classes.json``, ``read_with``),
with the **original pool's** ``image_stats``, so a model trained on the export lives in the pool's model space.
uids and keys are the pool's; the pool's order (its recorded shuffle) is kept. The splits a selection decided
nothing about (typically ``test``) are copied whole unless ``other_splits: drop``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from pipeline.artifacts import PartRecord
from pipeline.atomic import atomic_path, write_bytes
from pipeline.errors import InputError
from pipeline.stage import (STAGES, FinalizeContext, InputArtifact, PlanContext, Stage, StageParams, Summary, Task,
                            TaskContext, execution_only)
import stages.labeling.export_members  # noqa: F401 - registers the ``labels`` member hook
from stages.imaging.tar_writer import TarShardWriter
from stages.selections.reshard import MEMBER_HOOKS, Item, PoolReader, Writer, read, reject_row, verify
from stages.selections.store import pool_rows
from stages.sharding import outputs
from stages.sharding.plan import shard_bounds
from stages.sharding.pool import find_pool, pool_record

REFS_DIR = ".plan/refs"


class ExportParams(StageParams):
    samples_per_shard: int = Field(10_000, ge=1)
    shard_bytes: int | None = Field(None, ge=1)  # also close a shard at this many bytes
    splits: list[str] | None = None  # only these splits (default: all)
    other_splits: Literal["copy", "drop"] = "copy"  # pool splits the selection did not cover
    sample_grid: bool = execution_only(True)


@STAGES.register()
class ExportStage(Stage[ExportParams]):
    name = "export"
    version = "1"
    Params = ExportParams
    input_kinds = {"data": ("selection", "shards"), "labels": ("labels",)}
    output_kind = "shards"

    def plan(self, inputs: dict[str, InputArtifact], params: ExportParams, ctx: PlanContext) -> list[Task]:
        data = inputs["data"].path
        if "labels" in inputs:
            MEMBER_HOOKS.get(inputs["labels"].manifest.kind)  # fails early, naming the hooks there are
        pool = find_pool(data)
        rows = pool_rows(data, columns=None, other_splits=params.other_splits == "copy")
        if params.splits is not None:
            rows = rows.filter(pc.is_in(rows["split"], value_set=pa.array(params.splits, pa.string())))
        if rows.num_rows == 0:
            raise InputError(f"{data}: nothing to export (no rows in splits {params.splits or 'any'})")
        write_bytes(ctx.out_dir / "classes.json", (pool / "classes.json").read_bytes())
        tasks: list[Task] = []
        for split in dict.fromkeys(rows.column("split").to_pylist()):
            part = rows.filter(pc.equal(rows["split"], split))
            sizes = part.column("bytes").to_numpy()
            for a, b in shard_bounds(np.ones(part.num_rows, bool), sizes, params.samples_per_shard, params.shard_bytes):
                shard = len(tasks)
                rel = f"{REFS_DIR}/{shard:05d}.parquet"
                with atomic_path(ctx.out_dir / rel) as tmp:
                    pq.write_table(part.slice(a, b - a), tmp)
                tasks.append(Task(id=f"{shard:05d}", size=b - a, payload={"shard": shard, "split": split, "refs": rel,
                                                                          "pool": str(pool)}))
        return tasks

    def run(self, task: Task, params: ExportParams, ctx: TaskContext) -> dict[str, Any]:
        p = task.payload
        shard, split = p["shard"], p["split"]
        stem = f"shards/{split}/{shard:05d}"
        refs = pq.read_table(ctx.out_dir / p["refs"])
        hooks = []
        if "labels" in ctx.inputs:
            art = ctx.inputs["labels"]
            hooks.append(ctx.cached(f"member-hook:{art.path}", lambda: MEMBER_HOOKS.get(art.manifest.kind)(art.path)))
        rows, rejects = [], []
        with open(ctx.output(f"{stem}.tar"), "wb", buffering=1 << 20) as f, TarShardWriter(f) as tar, \
                PoolReader(Path(p["pool"])) as reader:
            items = (Item(r) for b in refs.to_batches(max_chunksize=1024) for r in b.to_pylist())
            for it in Writer(tar, shard, hooks)(verify(read(items, reader))):
                if it.reject is None:
                    rows.append(it.out)
                else:
                    rejects.append(reject_row(it, shard))
        return outputs.write_shard_outputs(ctx, stem, shard, split, refs.num_rows, rows, rejects)

    def finalize(self, parts: list[PartRecord], params: ExportParams, ctx: FinalizeContext) -> Summary:
        out = ctx.out_dir
        infos = sorted((p.info for p in parts), key=lambda i: i["shard"])
        stems = [out / f"shards/{i['split']}/{i['shard']:05d}" for i in infos]
        with atomic_path(ctx.path("index.parquet")) as tmp:
            n_out = outputs.concat_parquet([Path(f"{s}.parquet") for s in stems], tmp, outputs.SHARD_SCHEMA)
        with atomic_path(ctx.path("rejects.parquet")) as tmp:
            n_rejected = outputs.concat_parquet([Path(f"{s}_rejects.parquet") for s in stems], tmp,
                                                outputs.REJECT_SCHEMA)
        data = ctx.inputs["data"]
        pool = find_pool(data.path)
        pool_manifest = json.loads((pool / "manifest.json").read_text())
        splits, by_reason = outputs.split_counts(infos)
        counts = {"in": sum(i["count"] for i in infos), "out": n_out, "rejected": n_rejected,
                  "rejected_by_reason": dict(sorted(by_reason.items())), "splits": splits, "shards": len(infos),
                  "bytes": sum(i["bytes"] for i in infos)}
        files = ["classes.json", "index.parquet", "rejects.parquet"]
        if params.sample_grid and n_out:
            from stages.imaging.grid import sample_grid

            first = outputs.stats_split(list(splits))
            classes = json.loads((out / "classes.json").read_text())
            with atomic_path(ctx.path("samples.png")) as tmp:
                sample_grid(out, [Path(f"{s}.parquet") for s, i in zip(stems, infos) if i["split"] == first], tmp,
                            n_classes=len(classes) or 1)
            files.append("samples.png")
        metrics = {
            "mean_bytes_per_sample": round(counts["bytes"] / max(n_out, 1), 1),
            # the pool's statistics, not the subset's: a model trained on the export lives in the pool's space
            "image_stats": pool_manifest.get("metrics", {}).get("image_stats"),
            "read_with": outputs.read_with(infos, out),
            "order": {"kept": "the pool's", **(pool_manifest.get("metrics", {}).get("order") or {})},
            "exported_from": {"artifact_id": data.manifest.artifact_id, "kind": data.manifest.kind,
                              "path": str(data.path.resolve()), "pool": pool_record(pool),
                              "other_splits": params.other_splits},
        }
        if "labels" in ctx.inputs:
            from stages.labeling.export_members import exported_labels

            metrics["labels"] = exported_labels(ctx.inputs["labels"].path)
        return Summary(counts=counts, files=files, metrics=metrics)
