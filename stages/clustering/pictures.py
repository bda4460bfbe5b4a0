"""What a person looks at after clustering and dedup: members of a few clusters, duplicate pairs at several
similarity levels (images read from the pool by byte offset, only the ones drawn), cluster sizes, and the
eps -> kept-fraction curve. Every PNG is written atomically; nothing here decides anything."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from pipeline.atomic import atomic_path
from stages.imaging.decode import decode
from stages.imaging.grid import read_at


def pool_images(pool: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """RGB arrays of the pool samples with these keys (keys the index lacks are left out)."""
    wanted = pa.array(sorted(set(keys)), pa.string())
    index = pq.read_table(pool / "index.parquet", columns=["key", "split", "shard", "offset", "bytes"])
    rows = index.filter(pc.is_in(index["key"], value_set=wanted)).to_pylist()
    return {r["key"]: decode(read_at(pool / "shards" / r["split"] / f"{r['shard']:05d}.tar", r["offset"], r["bytes"]),
                             None) for r in rows}


def _save(img: Image.Image, png: Path) -> None:
    with atomic_path(png) as tmp:
        img.save(tmp, format="PNG")


def _paste(canvas: Image.Image, arr: np.ndarray | None, x: int, y: int, cell: int) -> None:
    if arr is None:
        return
    img = Image.fromarray(arr)
    img.thumbnail((cell - 2, cell - 2))
    canvas.paste(img, (x + 1, y + 1))


def rows_grid(pool: Path, rows: Sequence[tuple[str, Sequence[str]]], png: Path, cell: int = 48,
              label_w: int = 150) -> None:
    """One labelled row of images per entry ``(label, keys)``."""
    images = pool_images(pool, [k for _, keys in rows for k in keys])
    width = max([len(keys) for _, keys in rows] + [1])
    canvas = Image.new("RGB", (label_w + width * cell, max(1, len(rows)) * cell), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, keys) in enumerate(rows):
        for line, text in enumerate(label.split("\n")[:3]):
            draw.text((4, i * cell + 4 + 13 * line), text[:24], fill="black")
        for j, k in enumerate(keys):
            _paste(canvas, images.get(k), label_w + j * cell, i * cell, cell)
    _save(canvas, png)


def pairs_grid(pool: Path, levels: Sequence[tuple[str, Sequence[tuple[str, str, float]]]], png: Path,
               cell: int = 48) -> None:
    """Per similarity level a row of pairs (survivor | duplicate, similarity under them)."""
    images = pool_images(pool, [k for _, pairs in levels for a, b, _ in pairs for k in (a, b)])
    width = max([len(p) for _, p in levels] + [1])
    pair_w, label_w, text_h = 2 * cell + 8, 110, 14
    row_h = cell + text_h
    canvas = Image.new("RGB", (label_w + width * pair_w, max(1, len(levels)) * row_h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, pairs) in enumerate(levels):
        y = i * row_h
        for line, text in enumerate(label.split("\n")[:3]):
            draw.text((4, y + 4 + 13 * line), text[:18], fill="black")
        for j, (a, b, sim) in enumerate(pairs):
            x = label_w + j * pair_w
            _paste(canvas, images.get(a), x, y, cell)
            _paste(canvas, images.get(b), x + cell, y, cell)
            draw.text((x + 4, y + cell), f"{sim:.4f}", fill="black")
    _save(canvas, png)


def size_histogram(sizes: np.ndarray, png: Path) -> None:
    """Cluster sizes: a histogram and the sizes sorted (log scale), the two views of imbalance."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    sizes = np.asarray(sizes)
    if not len(sizes):
        sizes = np.zeros(1, np.int64)
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax_h, ax_r = fig.subplots(1, 2)
    ax_h.hist(sizes, bins=min(50, max(5, len(sizes) // 4)), color="#4477aa")
    ax_h.set(xlabel="cluster size (samples)", ylabel="clusters", title=f"{len(sizes)} clusters")
    ax_r.plot(np.sort(sizes)[::-1], color="#4477aa")
    ax_r.set(xlabel="cluster rank", ylabel="size", yscale="symlog",
             title=f"sizes: min {sizes.min()}, median {np.median(sizes):g}, max {sizes.max()}")
    for ax in (ax_h, ax_r):
        ax.grid(alpha=0.3)
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def eps_curve(eps: Sequence[float], kept_fraction: Sequence[float], chosen: float, rule: str, png: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.8), layout="constrained")
    ax = fig.subplots()
    order = np.argsort(eps)
    ax.plot(np.asarray(eps)[order], np.asarray(kept_fraction)[order], "o-", color="#4477aa")
    ax.axvline(chosen, color="#cc6677", ls="--", label=f"selection: eps={chosen:g}")
    ax.set(xlabel="eps (drop if similarity > 1 - eps)", ylabel="kept fraction", title=f"SemDeDup ({rule} rule)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
