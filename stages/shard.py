"""The shard stage: raw sources -> WebDataset shards + per-shard parquet/_stats.json + index + rejects.

Layout (what img2dataset, NeMo Curator and DataComp users already read)::

    shards/<split>/00000.tar            {key}.jpg|png|...  {key}.cls  {key}.txt  {key}.json
    shards/<split>/00000.parquet        one row per sample (key, uid, label, caption, size, sha256, ...)
    shards/<split>/00000_rejects.parquet
    shards/<split>/00000_stats.json     written last: the shard's done-marker
    index.parquet  rejects.parquet  duplicates.parquet  classes.json  samples.png

Shard numbers are global across splits, so keys (``{shard:05d}{row:04d}``) are unique in the artifact.
Every input sample passes through exactly one task and ends as a shard row or a reject row, so
``in == out + rejected`` always holds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import field_validator

from pipeline.atomic import atomic_path, write_json
from pipeline.artifacts import PartRecord
from pipeline.stage import FinalizeContext, InputArtifact, PlanContext, Stage, StageParams, STAGES, Summary, Task, TaskContext
from stages.imaging.verify import Decoded, ImageError, ResizeParams, process_many
from stages.sources import SOURCES, SampleRef, SourceError, make_source
from stages.imaging.tar_writer import TarShardWriter

DECODE_BATCH = 256
SPLIT_ORDER = ("train", "val", "validation", "valid", "test")

SHARD_SCHEMA = pa.schema([
    ("key", pa.string()), ("uid", pa.string()), ("split", pa.string()), ("shard", pa.int32()),
    ("label", pa.int32()), ("label_name", pa.string()), ("caption", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("bytes", pa.int64()), ("offset", pa.int64()),
    ("sha256", pa.string()),
    ("ext", pa.string()), ("source", pa.string()), ("original_width", pa.int32()),
    ("original_height", pa.int32()), ("original_bytes", pa.int64()), ("extra", pa.string()),
])
REJECT_SCHEMA = pa.schema([
    ("source", pa.string()), ("uid", pa.string()), ("split", pa.string()), ("shard", pa.int32()),
    ("reason", pa.string()), ("sha256", pa.string()), ("duplicate_of", pa.string()),
    ("duplicate_of_source", pa.string()),
])


class ShardParams(StageParams):
    source: dict[str, Any]
    samples_per_shard: int = 10_000
    shard_bytes: int | None = None  # close a shard at this many bytes too (e.g. 256_000_000)
    resize: ResizeParams | None = None  # None: keep original bytes, no re-encode
    dedup: bool = False  # drop exact duplicates by content sha256 (first occurrence is kept)
    dedup_scope: Literal["split", "global"] = "split"
    sample_grid: bool = True

    @field_validator("samples_per_shard")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
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


def make_uid(ident: str) -> str:
    """128-bit id (hex) from the sample's identity in its source, as DataComp keeps per sample."""
    return hashlib.blake2b(ident.encode("utf-8"), digest_size=16).hexdigest()


def key_digits(samples_per_shard: int) -> int:
    return max(4, len(str(samples_per_shard - 1)))


def build_classes(refs: list[SampleRef], declared: list[str] | None) -> list[str]:
    labels = {r.label for r in refs if r.label is not None}
    if declared is not None:
        unknown = {str(x) for x in labels} - set(declared)
        if unknown:
            raise SourceError(f"labels {sorted(unknown)[:5]} are not among the source's classes")
        return declared
    if labels and all(isinstance(x, int) for x in labels):
        return [str(i) for i in range(max(labels) + 1)]
    return sorted(str(x) for x in labels)


def label_id(label: str | int | None, classes: list[str]) -> int | None:
    if label is None:
        return None
    if isinstance(label, int) and classes == [str(i) for i in range(len(classes))]:
        return label
    return classes.index(str(label))


def hash_refs(args: tuple[dict[str, Any], list[SampleRef]]) -> list[str | None]:
    """sha256 of each ref's bytes (None when unreadable: the shard task will reject it with the reason)."""
    spec, refs = args
    out: list[str | None] = []
    with make_source(spec).open_reader() as reader:
        for r in refs:
            try:
                out.append(hashlib.sha256(reader.read(r)).hexdigest())
            except OSError:
                out.append(None)
    return out


def split_rank(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


def find_duplicates(refs: list[SampleRef], spec: dict[str, Any], scope: str, ctx: PlanContext,
                    chunk: int = 2000) -> dict[int, tuple[int, str]]:
    """Map index of each duplicate -> (index of the kept first occurrence, sha256)."""
    chunks = [(spec, refs[i:i + chunk]) for i in range(0, len(refs), chunk)]
    hashes = [h for part in ctx.map(hash_refs, chunks) for h in part]
    first: dict[tuple[str, str], int] = {}
    dups: dict[int, tuple[int, str]] = {}
    for i, (ref, h) in enumerate(zip(refs, hashes)):
        if h is None:
            continue
        k = (ref.split if scope == "split" else "", h)
        if k in first:
            dups[i] = (first[k], h)
        else:
            first[k] = i
    return dups


@STAGES.register()
class ShardStage(Stage[ShardParams]):
    name = "shard"
    version = "2"  # 2: index carries each image's byte offset in its tar
    Params = ShardParams
    output_kind = "shards"
    takes_source = True

    def validate(self, params: ShardParams) -> None:
        make_source(params.source).check()

    def fingerprint(self, params: ShardParams) -> str:
        return make_source(params.source).fingerprint()

    # -- driver --------------------------------------------------------------------------------------
    def plan(self, inputs: dict[str, InputArtifact], params: ShardParams, ctx: PlanContext) -> list[Task]:
        source = make_source(params.source)
        source.check()
        refs = source.scan(ctx.map)
        if not refs:
            raise SourceError(f"{params.source.get('path', params.source['kind'])}: source contains no samples")
        classes = build_classes(refs, source.classes())
        write_json(ctx.out_dir / "classes.json", classes)
        dups = find_duplicates(refs, params.source, params.dedup_scope, ctx) if params.dedup else {}

        order = sorted(range(len(refs)), key=lambda i: split_rank(refs[i].split))  # stable: source order within split
        tasks: list[Task] = []
        current: list[int] = []
        kept = size = 0

        def close() -> None:
            nonlocal current, kept, size
            if current:
                shard = len(tasks)
                dup_of = {str(j): [make_uid(refs[dups[i][0]].ident), refs[dups[i][0]].ident, dups[i][1]]
                          for j, i in enumerate(current) if i in dups}
                tasks.append(Task(id=f"{shard:05d}", size=len(current), payload={
                    "shard": shard, "split": refs[current[0]].split,
                    "refs": [dataclasses.asdict(refs[i]) for i in current],
                    "dup_of": dup_of, "classes": classes,
                }))
            current, kept, size = [], 0, 0

        for i in order:
            if current and refs[i].split != refs[current[0]].split:
                close()
            current.append(i)
            if i not in dups:
                kept += 1
                size += max(refs[i].size, 0)
            if kept >= params.samples_per_shard or (params.shard_bytes and size >= params.shard_bytes):
                close()
        close()
        return tasks

    # -- worker --------------------------------------------------------------------------------------
    def run(self, task: Task, params: ShardParams, ctx: TaskContext) -> dict[str, Any]:
        p = task.payload
        shard, split, classes = p["shard"], p["split"], p["classes"]
        kd = key_digits(params.samples_per_shard)
        stem = f"shards/{split}/{shard:05d}"
        rows: list[dict[str, Any]] = []
        rejects: list[dict[str, Any]] = []
        source = make_source(params.source)
        tar_tmp = ctx.output(f"{stem}.tar")
        refs = [SampleRef(**{**r, "locator": tuple(r["locator"])}) for r in p["refs"]]
        with open(tar_tmp, "wb") as fobj, TarShardWriter(fobj) as tar, source.open_reader() as reader:
            for start in range(0, len(refs), DECODE_BATCH):
                batch, blobs = [], []
                for j in range(start, min(start + DECODE_BATCH, len(refs))):
                    ref = refs[j]
                    base = {"source": ref.ident, "uid": make_uid(ref.ident), "split": split, "shard": shard}
                    if str(j) in p["dup_of"]:
                        kuid, kident, sha = p["dup_of"][str(j)]
                        rejects.append({**base, "reason": "duplicate", "sha256": sha, "duplicate_of": kuid,
                                        "duplicate_of_source": kident})
                        continue
                    try:
                        blobs.append(reader.read(ref))
                        batch.append((ref, base))
                    except FileNotFoundError:
                        rejects.append({**base, "reason": f"missing file: {ref.locator[0]}"})
                    except OSError as e:
                        rejects.append({**base, "reason": f"unreadable: {e}"})
                decoded = process_many(blobs, [r.ext for r, _ in batch], params.resize)
                for (ref, base), data, img in zip(batch, blobs, decoded):
                    if isinstance(img, ImageError):
                        rejects.append({**base, "reason": str(img)})
                        continue
                    rows.append(self._write(tar, ref, base, data, img, f"{shard:05d}{len(rows):0{kd}d}", classes))
        pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_SCHEMA), ctx.output(f"{stem}.parquet"))
        pq.write_table(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), ctx.output(f"{stem}_rejects.parquet"))
        reasons = Counter(r["reason"].split(":")[0] for r in rejects)
        stats = {"shard": shard, "split": split, "count": len(p["refs"]), "successes": len(rows),
                 "failed": len(rejects), "reasons": dict(sorted(reasons.items())),
                 "bytes": sum(r["bytes"] for r in rows)}
        with open(ctx.output(f"{stem}_stats.json"), "w") as f:  # the done-marker: committed last
            json.dump(stats, f, indent=2, sort_keys=True)
        return stats

    @staticmethod
    def _write(tar: TarShardWriter, ref: SampleRef, base: dict[str, Any], data: bytes, img: Decoded, key: str,
               classes: list[str]) -> dict[str, Any]:
        lid = label_id(ref.label, classes)
        row = {
            **base, "key": key, "label": lid, "label_name": None if lid is None else classes[lid],
            "caption": ref.caption, "width": img.width, "height": img.height, "bytes": len(img.data),
            "sha256": hashlib.sha256(img.data).hexdigest(), "ext": img.ext,
            "original_width": img.original_width, "original_height": img.original_height,
            "original_bytes": len(data), "extra": json.dumps(ref.extra, sort_keys=True) if ref.extra else None,
        }
        members = {img.ext: img.data}
        if lid is not None:
            members["cls"] = str(lid).encode()
        if ref.caption is not None:
            members["txt"] = ref.caption.encode("utf-8")
        meta = {k: v for k, v in row.items() if v is not None and k not in ("extra", "shard")}
        if ref.extra:
            meta["extra"] = ref.extra
        members["json"] = json.dumps(meta, sort_keys=True).encode("utf-8")
        row["offset"] = tar.write_sample(key, members)
        return row

    # -- driver --------------------------------------------------------------------------------------
    def finalize(self, parts: list[PartRecord], params: ShardParams, ctx: FinalizeContext) -> Summary:
        out = ctx.out_dir
        shard_files = [f.path for p in parts for f in p.files if f.path.endswith(".parquet")]
        index = _concat([out / f for f in shard_files if not f.endswith("_rejects.parquet")], SHARD_SCHEMA)
        rejects = _concat([out / f for f in shard_files if f.endswith("_rejects.parquet")], REJECT_SCHEMA)
        _write_parquet(index, ctx.path("index.parquet"))
        _write_parquet(rejects, ctx.path("rejects.parquet"))
        files = ["classes.json", "index.parquet", "rejects.parquet"]
        if params.dedup:
            dups = rejects.filter(pc.equal(rejects["reason"], "duplicate"))
            _write_parquet(dups.select(["sha256", "duplicate_of", "duplicate_of_source", "uid", "source", "split"]),
                           ctx.path("duplicates.parquet"))
            files.append("duplicates.parquet")
        by_reason: Counter[str] = Counter()
        splits: dict[str, dict[str, int]] = {}
        for p in parts:
            by_reason.update(p.info["reasons"])
            s = splits.setdefault(p.info["split"], {"in": 0, "out": 0, "rejected": 0, "shards": 0})
            s["in"] += p.info["count"]
            s["out"] += p.info["successes"]
            s["rejected"] += p.info["failed"]
            s["shards"] += 1
        counts = {
            "in": sum(p.info["count"] for p in parts), "out": index.num_rows, "rejected": rejects.num_rows,
            "rejected_by_reason": dict(sorted(by_reason.items())), "splits": splits, "shards": len(parts),
            "bytes": sum(p.info["bytes"] for p in parts),
        }
        if params.sample_grid and index.num_rows:
            from stages.imaging.grid import sample_grid

            with atomic_path(ctx.path("samples.png")) as tmp:
                sample_grid(out, index, tmp)
            files.append("samples.png")
        return Summary(counts=counts, files=files, metrics={
            "mean_bytes_per_sample": round(counts["bytes"] / max(counts["out"], 1), 1),
        })


def _concat(paths: list[Path], schema: pa.Schema) -> pa.Table:
    tables = [pq.read_table(p, schema=schema) for p in paths]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def _write_parquet(table: pa.Table, path: Path) -> None:
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)

