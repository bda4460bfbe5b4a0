"""The tables and metrics of a shard artifact: schemas, per-shard rows, streaming concatenation, statistics,
and how to read the shards back."""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import pyarrow as pa
import pyarrow.parquet as pq

from stages.sharding.samples import Sample

SHARD_SCHEMA = pa.schema([
    ("key", pa.string()), ("uid", pa.string()), ("split", pa.string()), ("shard", pa.int32()),
    ("label", pa.int32()), ("label_name", pa.string()), ("caption", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("bytes", pa.int64()), ("offset", pa.int64()),
    ("sha256", pa.string()),  # of the stored bytes
    ("source_sha256", pa.string()),  # of the source bytes: what exact-duplicate removal compares
    ("ext", pa.string()), ("source", pa.string()), ("original_width", pa.int32()),
    ("original_height", pa.int32()), ("original_bytes", pa.int64()),
    ("original_mode", pa.string()),  # PIL mode of the source image (I;16, RGBA, CMYK, P, ...)
    ("orientation", pa.int32()),  # the source's EXIF orientation tag; applied only when re-encoded
    ("normalised", pa.string()),  # what was changed to store faithful 8-bit RGB (null: original bytes)
    ("extra", pa.string()),
])
REJECT_SCHEMA = pa.schema([
    ("source", pa.string()), ("file", pa.string()), ("uid", pa.string()), ("split", pa.string()),
    ("shard", pa.int32()), ("reason", pa.string()), ("sha256", pa.string()), ("duplicate_of", pa.string()),
    ("duplicate_of_source", pa.string()),
])
IMAGE_FIELDS = "jpg;png;webp"  # every stored image has one of these extensions


def reject_row(s: Sample, split: str, shard: int) -> dict[str, Any]:
    r = s.ref
    return {"source": r["source"], "file": r["file"], "uid": r["uid"], "split": split, "shard": shard,
            "reason": s.reject, "sha256": s.source_sha256, "duplicate_of": r.get("dup_of_uid"),
            "duplicate_of_source": r.get("dup_of_source")}


def to_table(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=schema)


class Outputs(Protocol):  # pipeline.stage.TaskContext
    def output(self, relpath: str) -> Path: ...


def write_shard_outputs(ctx: Outputs, stem: str, shard: int, split: str, count: int, rows: list[dict[str, Any]],
                        rejects: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A shard's parquet, its rejects and its ``_stats.json`` done-marker (requested last, so committed last);
    returns the task's info (the done-marker's content)."""
    pq.write_table(to_table(rows, SHARD_SCHEMA), ctx.output(f"{stem}.parquet"))
    pq.write_table(to_table(rejects, REJECT_SCHEMA), ctx.output(f"{stem}_rejects.parquet"))
    reasons = Counter(r["reason"].split(":")[0] for r in rejects)
    info = {"shard": shard, "split": split, "count": count, "successes": len(rows),
            "failed": len(rejects), "reasons": dict(sorted(reasons.items())),
            "bytes": sum(r["bytes"] for r in rows), "labelled": sum(r["label"] is not None for r in rows),
            "captioned": sum(r["caption"] is not None for r in rows), **extra}
    with open(ctx.output(f"{stem}_stats.json"), "w") as f:
        json.dump(info, f, indent=2, sort_keys=True)
    return info


def split_counts(infos: list[dict[str, Any]]) -> tuple[dict[str, dict[str, int]], Counter[str]]:
    """Per split in/out/rejected/shards, and the reject reasons over all shards, from the tasks' infos."""
    by_reason: Counter[str] = Counter()
    splits: dict[str, dict[str, int]] = {}
    for i in infos:
        by_reason.update(i["reasons"])
        s = splits.setdefault(i["split"], {"in": 0, "out": 0, "rejected": 0, "shards": 0})
        s["in"] += i["count"]
        s["out"] += i["successes"]
        s["rejected"] += i["failed"]
        s["shards"] += 1
    return splits, by_reason


def concat_parquet(paths: Iterable[Path], out: Path, schema: pa.Schema,
                   keep: Callable[[pa.Table], pa.Table] | None = None) -> int:
    """Concatenate parquet files (optionally filtered by ``keep``) into ``out`` one file at a time (bounded
    memory); returns the row count."""
    rows = 0
    with pq.ParquetWriter(out, schema) as writer:
        for p in paths:
            t = pq.read_table(p)
            if keep is not None:
                t = keep(t)
            t = t.select(schema.names).cast(schema)
            writer.write_table(t)
            rows += t.num_rows
    return rows


def stats_split(splits: list[str]) -> str:
    """The split whose statistics normalise inputs: train, else the first split."""
    return "train" if "train" in splits else splits[0]


def image_stats(parts: list[dict[str, Any]], split: str, seed: int) -> dict[str, Any]:
    """Per-channel mean/std (values /255, over pixels) from the tasks' exact sums."""
    mine = [info["stats"] for info in parts if info["split"] == split and info.get("stats")]
    images = sum(s["images"] for s in mine)
    n = max(sum(s["pixels"] for s in mine), 1)
    mean = [sum(s["sum"][c] for s in mine) / (255 * n) for c in range(3)]
    meansq = [sum(s["sumsq"][c] for s in mine) / (255 * 255 * n) for c in range(3)]
    std = [math.sqrt(max(q - m * m, 0.0)) for q, m in zip(meansq, mean)]
    return {"split": split, "mean": [round(x, 6) for x in mean], "std": [round(x, 6) for x in std],
            "images": images, "seed": seed}


def brace(numbers: list[int]) -> str:
    """``{00000..00004}`` for a contiguous run, ``00003`` for one, ``{00001,00004}`` otherwise."""
    if len(numbers) == 1:
        return f"{numbers[0]:05d}"
    if numbers == list(range(numbers[0], numbers[-1] + 1)):
        return f"{{{numbers[0]:05d}..{numbers[-1]:05d}}}"
    return "{" + ",".join(f"{n:05d}" for n in numbers) + "}"


def read_with(parts: list[dict[str, Any]], artifact: Path) -> dict[str, dict[str, Any]]:
    """Per split: the exact brace pattern of its tars, its sample count, and a working webdataset reader line."""
    out: dict[str, dict[str, Any]] = {}
    for split in dict.fromkeys(p["split"] for p in parts):
        mine = [p for p in parts if p["split"] == split]
        n = sum(p["successes"] for p in mine)
        pattern = f"shards/{split}/{brace(sorted(p['shard'] for p in mine))}.tar"
        fields = [IMAGE_FIELDS]
        if all(p.get("labelled", 0) == p["successes"] for p in mine):
            fields.append("cls")
        if n and all(p.get("captioned", 0) == p["successes"] for p in mine):
            fields.append("txt")
        if len(fields) == 1:
            fields.append("json")
        tuple_args = ", ".join(f'"{f}"' for f in fields)
        out[split] = {"pattern": pattern, "samples": n,
                      "python": f'wds.WebDataset("{artifact}/{pattern}", shardshuffle=False)'
                                f'.decode("pil").to_tuple({tuple_args})'}
    return out
