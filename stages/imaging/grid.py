"""A PNG grid of sample images per class: the first thing a person wants to see of a dataset.

It reads one shard's index at a time, only until every row of the grid is filled, and decodes only the images it
draws (with the shared decode), so it costs the same for a thousand samples or a billion.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from stages.imaging.decode import decode

UNLABELLED = "(unlabelled)"


def read_at(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def pick(index_files: list[Path], per_class: int, max_classes: int, n_classes: int | None = None) -> dict[str, list[dict]]:
    """Up to ``per_class`` rows for each of the first ``max_classes`` classes met, reading shard by shard and
    stopping once ``min(n_classes, max_classes)`` classes are full."""
    want = min(n_classes or max_classes, max_classes)
    picked: dict[str, list[dict]] = {}
    for f in index_files:
        for r in pq.read_table(f, columns=["split", "shard", "label_name", "offset", "bytes"]).to_pylist():
            name = r["label_name"] if r["label_name"] is not None else UNLABELLED
            if name not in picked and len(picked) >= max_classes:
                continue
            rows = picked.setdefault(name, [])
            if len(rows) < per_class:
                rows.append(r)
        if sum(len(v) >= per_class for v in picked.values()) >= want:
            break
    return picked


def sample_grid(artifact: Path, index_files: list[Path], png: Path, n_classes: int | None = None, per_class: int = 8,
                max_classes: int = 16, cell: int = 48) -> None:
    """Draw the grid of one split from its per-shard index files (in shard order)."""
    picked = pick(index_files, per_class, max_classes, n_classes)
    label_w = 96
    grid = Image.new("RGB", (label_w + per_class * cell, max(1, len(picked)) * cell), "white")
    draw = ImageDraw.Draw(grid)
    for i, (name, rs) in enumerate(sorted(picked.items())):
        draw.text((4, i * cell + cell // 2 - 6), name[:14], fill="black")
        for j, r in enumerate(rs):
            data = read_at(artifact / "shards" / r["split"] / f"{r['shard']:05d}.tar", r["offset"], r["bytes"])
            img = Image.fromarray(decode(data, None))
            img.thumbnail((cell - 2, cell - 2))
            grid.paste(img, (label_w + j * cell + 1, i * cell + 1))
    grid.save(png, format="PNG")
