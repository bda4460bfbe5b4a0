"""A PNG grid of sample images per class: the first thing a person wants to see of a dataset."""
from __future__ import annotations

import io
import tarfile
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
from PIL import Image, ImageDraw


def read_members(shard_tar: Path, names: set[str]) -> dict[str, bytes]:
    out = {}
    with tarfile.open(shard_tar) as tf:
        for m in tf:
            if m.name in names:
                out[m.name] = tf.extractfile(m).read()  # type: ignore[union-attr]
                if len(out) == len(names):
                    break
    return out


def sample_grid(artifact: Path, index: pa.Table, png: Path, per_class: int = 8, max_classes: int = 16,
                cell: int = 48) -> None:
    rows = index.select(["key", "split", "shard", "label_name", "ext"]).to_pylist()
    split = "train" if any(r["split"] == "train" for r in rows) else rows[0]["split"]
    picked: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        name = r["label_name"] if r["label_name"] is not None else "(unlabelled)"
        if r["split"] == split and len(picked[name]) < per_class and (name in picked or len(picked) < max_classes):
            picked[name].append(r)
    by_shard: dict[int, set[str]] = defaultdict(set)
    for rs in picked.values():
        for r in rs:
            by_shard[r["shard"]].add(f"{r['key']}.{r['ext']}")
    blobs: dict[str, bytes] = {}
    for shard, names in by_shard.items():
        blobs.update(read_members(artifact / "shards" / split / f"{shard:05d}.tar", names))
    label_w = 96
    grid = Image.new("RGB", (label_w + per_class * cell, max(1, len(picked)) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for i, (name, rs) in enumerate(sorted(picked.items())):
        draw.text((4, i * cell + cell // 2 - 6), name[:14], fill="black")
        for j, r in enumerate(rs):
            img = Image.open(io.BytesIO(blobs[f"{r['key']}.{r['ext']}"])).convert("RGB")
            img.thumbnail((cell - 2, cell - 2))
            grid.paste(img, (label_w + j * cell + 1, i * cell + 1))
    grid.save(png, format="PNG")
