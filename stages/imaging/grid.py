"""A PNG grid of sample images per class: the first thing a person wants to see of a dataset."""
from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
from PIL import Image, ImageDraw


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def sample_grid(artifact: Path, index: pa.Table, png: Path, per_class: int = 8, max_classes: int = 16,
                cell: int = 48) -> None:
    rows = index.select(["split", "shard", "label_name", "offset", "bytes"]).to_pylist()
    split = "train" if any(r["split"] == "train" for r in rows) else rows[0]["split"]
    picked: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        name = r["label_name"] if r["label_name"] is not None else "(unlabelled)"
        if r["split"] == split and len(picked[name]) < per_class and (name in picked or len(picked) < max_classes):
            picked[name].append(r)
    label_w = 96
    grid = Image.new("RGB", (label_w + per_class * cell, max(1, len(picked)) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for i, (name, rs) in enumerate(sorted(picked.items())):
        draw.text((4, i * cell + cell // 2 - 6), name[:14], fill="black")
        for j, r in enumerate(rs):
            data = read_at(artifact / "shards" / split / f"{r['shard']:05d}.tar", r["offset"], r["bytes"])
            img = Image.open(io.BytesIO(data)).convert("RGB")
            img.thumbnail((cell - 2, cell - 2))
            grid.paste(img, (label_w + j * cell + 1, i * cell + 1))
    grid.save(png, format="PNG")
