"""The shard stage: raw sources -> WebDataset shards + per-shard parquet/_stats.json + index + rejects.

Layout (what img2dataset, NeMo Curator and DataComp users already read)::

    shards/<split>/00000.tar            {key}.jpg|png|webp  {key}.cls  {key}.txt  {key}.json
    shards/<split>/00000.parquet        one row per sample (key, uid, label, caption, size, sha256, ...)
    shards/<split>/00000_rejects.parquet
    shards/<split>/00000_stats.json     written last: the shard's done-marker
    index.parquet  rejects.parquet  duplicates.parquet  classes.json  samples.png
    .plan/refs/00000.parquet            the plan: each task's sample references (the task payload names it)

Shard numbers are global across splits, so keys (``{shard:05d}{row:04d}``) are unique in the artifact.
Every input sample passes through exactly one task and ends as a shard row or a reject row, so
``in == out + rejected`` always holds. The driver never holds a Python object per sample: sources scan into
columns, the plan writes each shard's references to a parquet chunk, finalize streams one shard at a time.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import field_validator

from pipeline.artifacts import PartRecord
from pipeline.atomic import atomic_path, write_json
from pipeline.stage import (
    STAGES, FinalizeContext, InputArtifact, PlanContext, Stage, StageParams, Summary, Task, TaskContext,
    execution_only,
)
from stages.imaging.tar_writer import TarShardWriter
from stages.imaging.verify import PIL_HARD_LIMIT, PIL_MAX_PIXELS, ImageOptions, ResizeParams
from stages.sharding import outputs
from stages.sharding.plan import (
    build_classes, check_unique_uids, duplicate_of, label_ids, ordered, shard_bounds, split_order, stats_sample,
)
from stages.sharding.samples import ChannelStats, Sample, ShardWriter, measure, read, skip_duplicates, verify
from stages.sources import SOURCES, SourceError, create_source

REFS_DIR = ".plan/refs"
HASH_CHUNK = 2000


class ShardParams(StageParams):
    # Where the data lives is execution-only: the artifact id takes the source's other parameters
    # (``ShardStage.identity``) and a fingerprint of its content, so moving a dataset re-runs nothing.
    source: dict[str, Any] = execution_only(...)
    samples_per_shard: int = 10_000
    shard_bytes: int | None = None  # close a shard at this many bytes too (e.g. 256_000_000)
    resize: ResizeParams | None = None  # None: keep original bytes unless the mode must be normalised
    verify: Literal["full", "header"] = "full"  # header: trust readable headers (faster; truncation goes unseen)
    max_pixels: int = PIL_MAX_PIXELS  # larger images are rejected from their header, before any decode
    dedup: bool = False  # drop exact duplicates of the source bytes (the evaluation copy is kept)
    dedup_scope: Literal["split", "global"] = "split"
    shuffle: bool = True  # shuffle samples within each split (seeded), so no shard is class-sorted
    seed: int = 0
    stats_images: int = 10_000  # images (a seeded random sample of the train split) behind metrics.image_stats
    sample_grid: bool = execution_only(True)

    @field_validator("samples_per_shard", "stats_images")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("max_pixels")
    @classmethod
    def _pixels(cls, v: int) -> int:
        if not 1 <= v <= PIL_HARD_LIMIT:
            raise ValueError(f"must be between 1 and {PIL_HARD_LIMIT} (PIL refuses to open larger images)")
        return v

    @field_validator("source")
    @classmethod
    def _valid_source(cls, v: dict[str, Any]) -> dict[str, Any]:
        """Validate with the adapter's own model; make paths absolute (workers may run elsewhere)."""
        if "kind" not in v:
            raise ValueError(f"needs 'kind' (one of: {', '.join(SOURCES.names())})")
        src_cls = SOURCES.get(v["kind"])
        model = src_cls.Params.model_validate(v)
        out = model.model_dump(mode="json")
        for name, value in model:
            if isinstance(value, Path) or (name == "path" and isinstance(value, str)):
                out[name] = os.path.abspath(os.path.expanduser(str(value)))
        return out


def key_digits(samples_per_shard: int) -> int:
    return max(4, len(str(samples_per_shard - 1)))


def hash_chunk(args: tuple[dict[str, Any], list[str], list[int], list[int]]) -> pa.Array:
    """sha256 of each sample's source bytes (null when unreadable: its task rejects it with the reason); runs on
    a worker and returns an arrow array, so the driver holds no Python string per sample."""
    spec, files, offsets, sizes = args
    out: list[str | None] = []
    with create_source(spec).open_reader() as reader:
        for f, o, s in zip(files, offsets, sizes):
            try:
                out.append(hashlib.sha256(reader.read(f, o, s)).hexdigest())
            except (OSError, ValueError):
                out.append(None)
    return pa.array(out, pa.string())


@STAGES.register()
class ShardStage(Stage[ShardParams]):
    name = "shard"
    # 3: uids from paths relative to the source root, shuffled splits, faithful 8-bit modes, new index columns
    version = "3"
    Params = ShardParams
    output_kind = "shards"
    takes_source = True

    def validate(self, params: ShardParams) -> None:
        create_source(params.source).check()

    def fingerprint(self, params: ShardParams) -> str:
        return create_source(params.source).fingerprint()

    def identity(self, params: ShardParams) -> dict[str, Any]:
        return {"source": create_source(params.source).identity()}

    # -- driver --------------------------------------------------------------------------------------
    def plan(self, inputs: dict[str, InputArtifact], params: ShardParams, ctx: PlanContext) -> list[Task]:
        source = create_source(params.source)
        source.check()
        where = str(params.source.get("path", params.source["kind"]))
        scan = source.scan(ctx.map)
        refs, declared = scan.refs, scan.classes
        del scan  # one copy of the refs at a time
        if refs.num_rows == 0:
            raise SourceError(f"{where}: source contains no samples")
        check_unique_uids(refs, where)
        classes = build_classes(refs["label"], declared)
        write_json(ctx.out_dir / "classes.json", classes)
        refs = ordered(refs, params.shuffle, params.seed)
        ids = label_ids(refs["label"], classes)
        refs = refs.set_column(refs.schema.get_field_index("label"), "label",
                               pc.take(pa.array(classes, pa.string()), ids))  # the class name as classes.json has it
        refs = refs.append_column("label_id", ids)
        refs = self._duplicates(refs, params, ctx)
        refs = refs.append_column("stats", self._stats_rows(refs, params))
        return self._write_tasks(refs, params, ctx.out_dir)

    def _duplicates(self, refs: pa.Table, params: ShardParams, ctx: PlanContext) -> pa.Table:
        n = refs.num_rows
        if not params.dedup:
            nulls = pa.nulls(n, pa.string())
            return refs.append_column("dup_of_uid", nulls).append_column("dup_of_source", nulls) \
                       .append_column("source_sha256", nulls)
        chunks = [(params.source, *(refs[c].slice(i, HASH_CHUNK).to_pylist() for c in ("file", "offset", "size")))
                  for i in range(0, n, HASH_CHUNK)]
        hashes = pa.concat_arrays(ctx.map(hash_chunk, chunks))
        dup = duplicate_of(hashes, refs["split"].combine_chunks(), refs["source"].combine_chunks(), params.dedup_scope)
        is_dup = pa.array(dup >= 0)
        pick = pa.array(np.maximum(dup, 0))
        of = lambda col: pc.if_else(is_dup, pc.take(refs[col], pick), pa.nulls(n, pa.string()))  # noqa: E731
        return refs.append_column("dup_of_uid", of("uid")).append_column("dup_of_source", of("source")) \
                   .append_column("source_sha256", hashes)

    @staticmethod
    def _stats_rows(refs: pa.Table, params: ShardParams) -> pa.Array:
        split = outputs.stats_split(split_order(refs["split"]))
        eligible = np.flatnonzero(pc.and_(pc.equal(refs["split"], split), pc.is_null(refs["dup_of_uid"])).to_numpy(
            zero_copy_only=False))
        mask = np.zeros(refs.num_rows, dtype=bool)
        mask[eligible[stats_sample(len(eligible), params.stats_images, params.seed)]] = True
        return pa.array(mask)

    @staticmethod
    def _write_tasks(refs: pa.Table, params: ShardParams, out_dir: Path) -> list[Task]:
        tasks: list[Task] = []
        splits = refs["split"].combine_chunks()
        start = 0
        for split in split_order(splits):
            n = int(pc.sum(pc.equal(splits, split)).as_py())
            part = refs.slice(start, n)
            kept = pc.is_null(part["dup_of_uid"]).to_numpy(zero_copy_only=False)
            for a, b in shard_bounds(kept, part["size"].to_numpy(), params.samples_per_shard, params.shard_bytes):
                shard = len(tasks)
                rel = f"{REFS_DIR}/{shard:05d}.parquet"
                with atomic_path(out_dir / rel) as tmp:
                    pq.write_table(part.slice(a, b - a), tmp)
                tasks.append(Task(id=f"{shard:05d}", size=b - a,
                                  payload={"shard": shard, "split": split, "refs": rel, "count": b - a}))
            start += n
        return tasks

    # -- worker --------------------------------------------------------------------------------------
    def run(self, task: Task, params: ShardParams, ctx: TaskContext) -> dict[str, Any]:
        p = task.payload
        shard, split = p["shard"], p["split"]
        stem = f"shards/{split}/{shard:05d}"
        refs = pq.read_table(ctx.out_dir / p["refs"])
        opts = ImageOptions(params.resize, params.max_pixels, params.verify)
        stats = ChannelStats()
        rows: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        source = create_source(params.source)
        with open(ctx.output(f"{stem}.tar"), "wb", buffering=1 << 20) as fobj, TarShardWriter(fobj) as tar, \
                source.open_reader() as reader:
            write = ShardWriter(tar, shard, split, key_digits(params.samples_per_shard))
            samples = (Sample(r) for b in refs.to_batches(max_chunksize=1024) for r in b.to_pylist())
            for s in measure(write(verify(read(skip_duplicates(samples), reader), opts)), stats):
                if s.reject is None:
                    rows.append(s.row)  # type: ignore[arg-type]
                else:
                    rejects.append(outputs.reject_row(s, split, shard))
        return outputs.write_shard_outputs(ctx, stem, shard, split, refs.num_rows, rows, rejects,
                                           stats=stats.result() if stats.images or stats.skipped else None)

    # -- driver --------------------------------------------------------------------------------------
    def finalize(self, parts: list[PartRecord], params: ShardParams, ctx: FinalizeContext) -> Summary:
        out = ctx.out_dir
        infos = [p.info for p in parts]
        stems = [out / f"shards/{i['split']}/{i['shard']:05d}" for i in infos]
        with atomic_path(ctx.path("index.parquet")) as tmp:
            n_out = outputs.concat_parquet([Path(f"{s}.parquet") for s in stems], tmp, outputs.SHARD_SCHEMA)
        reject_files = [Path(f"{s}_rejects.parquet") for s in stems]
        with atomic_path(ctx.path("rejects.parquet")) as tmp:
            n_rejected = outputs.concat_parquet(reject_files, tmp, outputs.REJECT_SCHEMA)
        files = ["classes.json", "index.parquet", "rejects.parquet"]
        if params.dedup:
            with atomic_path(ctx.path("duplicates.parquet")) as tmp:
                outputs.concat_parquet(reject_files, tmp, DUPLICATES_SCHEMA, keep=_duplicate_rows)
            files.append("duplicates.parquet")
        splits, by_reason = outputs.split_counts(infos)
        counts = {
            "in": sum(i["count"] for i in infos), "out": n_out, "rejected": n_rejected,
            "rejected_by_reason": dict(sorted(by_reason.items())), "splits": splits, "shards": len(parts),
            "bytes": sum(i["bytes"] for i in infos),
        }
        stats_split = outputs.stats_split(list(splits))
        if params.sample_grid and n_out:
            from stages.imaging.grid import sample_grid

            classes = json.loads((out / "classes.json").read_text())
            with atomic_path(ctx.path("samples.png")) as tmp:
                sample_grid(out, [Path(f"{s}.parquet") for s, i in zip(stems, infos) if i["split"] == stats_split],
                            tmp, n_classes=len(classes) or 1)
            files.append("samples.png")
        return Summary(counts=counts, files=files, metrics={
            "mean_bytes_per_sample": round(counts["bytes"] / max(counts["out"], 1), 1),
            "image_stats": outputs.image_stats(infos, stats_split, params.seed),
            "read_with": outputs.read_with(infos, out),
            "order": {"shuffle": params.shuffle, "seed": params.seed},
        })


DUPLICATES_SCHEMA = pa.schema([outputs.REJECT_SCHEMA.field(c) for c in
                               ("sha256", "duplicate_of", "duplicate_of_source", "uid", "source", "split")])


def _duplicate_rows(rejects: pa.Table) -> pa.Table:
    return rejects.filter(pc.equal(rejects["reason"], "duplicate"))
