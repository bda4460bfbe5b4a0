"""The prune stage's figures (matplotlib's object API, no pyplot; images decoded with the shared decode):

    clusters.png   complexity distribution and quota / kept against cluster size (cluster-aware methods)
    scores.png     the method's score, kept against pruned
    samples.png    kept and pruned samples of a few clusters (or classes), read from the pool by offset
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return path


def plot_clusters(table: pa.Table, path: Path) -> Path:
    from matplotlib.figure import Figure

    size = table.column("size").to_numpy().astype(float)
    kept = table.column("kept").to_numpy().astype(float)
    has_c = "complexity" in table.column_names
    fig = Figure(figsize=(11 if has_c else 5.5, 4), layout="constrained")
    axes = fig.subplots(1, 2 if has_c else 1)
    axes = np.atleast_1d(axes)
    nz = size > 0
    if has_c:
        comp = table.column("complexity").to_numpy(zero_copy_only=False).astype(float)[nz]
        axes[0].hist(comp[np.isfinite(comp)], bins=min(50, max(5, int(nz.sum() // 2))), color="tab:blue")
        axes[0].set(xlabel="complexity  d_inter · d_intra", ylabel="clusters", title="cluster complexity")
        axes[0].grid(alpha=0.3)
    ax = axes[-1]
    if "quota" in table.column_names:
        ax.scatter(size[nz], table.column("quota").to_numpy()[nz], s=12, label="quota", alpha=0.7)
    ax.scatter(size[nz], kept[nz], s=6, label="kept", alpha=0.7, marker="x")
    top = max(size.max() if len(size) else 1, 1)
    ax.plot([1, top], [1, top], color="grey", lw=0.8, ls="--", label="whole cluster")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_ylim(bottom=0)
    ax.set(xlabel="cluster size (candidate rows)", ylabel="samples", title="quota and kept vs cluster size")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_scores(kept: pa.Table, dropped: pa.Table, path: Path, label: str) -> Path:
    from matplotlib.figure import Figure

    def values(t: pa.Table) -> np.ndarray:
        if "score" not in t.column_names:
            return np.zeros(0)
        v = t.column("score").to_numpy(zero_copy_only=False).astype(float)
        return v[np.isfinite(v)]

    k, d = values(kept), values(dropped)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    both = np.concatenate([k, d])
    bins = np.linspace(both.min(), both.max(), 50) if len(both) and both.max() > both.min() else 10
    ax.hist(d, bins=bins, alpha=0.6, label=f"pruned ({len(d)})", color="tab:red")
    ax.hist(k, bins=bins, alpha=0.6, label=f"kept ({len(k)})", color="tab:green")
    ax.set(xlabel=label, ylabel="samples", title="scores of this step's candidates")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def _pick_groups(kept: pa.Table, dropped: pa.Table, column: str, n: int) -> list:
    k = pc.value_counts(kept[column]).to_pylist() if kept.num_rows else []
    d = {r["values"]: r["counts"] for r in (pc.value_counts(dropped[column]).to_pylist() if dropped.num_rows else [])}
    both = [(r["values"], r["counts"] / (r["counts"] + d[r["values"]])) for r in k
            if r["values"] is not None and r["values"] in d]
    both.sort(key=lambda t: (t[1], t[0]))
    if len(both) <= n:
        return [g for g, _ in both]
    return [g for g, _ in both[: n // 2]] + [g for g, _ in both[len(both) - (n - n // 2):]]


def sample_grid(pool: Path, kept: pa.Table, dropped: pa.Table, path: Path, per_side: int = 6, groups: int = 6,
                cell: int = 48) -> Path:
    """Rows = a few clusters (the least and the most pruned; classes when there are no clusters), left the kept
    samples, right the pruned ones, each in score order (highest first)."""
    from PIL import Image, ImageDraw

    from stages.imaging.decode import decode
    from stages.imaging.grid import read_at

    column = "cluster" if "cluster" in kept.column_names else "label"
    chosen = _pick_groups(kept, dropped, column, groups)

    def shown(t: pa.Table, g) -> pa.Table:
        t = t.filter(pc.equal(t[column], g))
        if "score" in t.column_names:
            order = np.argsort(-np.nan_to_num(t.column("score").to_numpy(zero_copy_only=False).astype(float),
                                              nan=-np.inf), kind="stable")
            t = t.take(pa.array(order[:per_side]))
        return t.slice(0, per_side)

    picked = {(side, g): shown(t, g) for side, t in enumerate((kept, dropped)) for g in chosen}
    uids = sorted({u for t in picked.values() for u in t.column("uid").to_pylist()})
    # only the rows drawn are read from the pool's index (a filter pushed into the parquet reader)
    index = pq.read_table(pool / "index.parquet", columns=["uid", "split", "shard", "offset", "bytes"],
                          filters=[("uid", "in", uids)]) if uids else None

    def rows_of(side: int, g) -> list[dict]:
        t = picked[(side, g)]
        pos = pc.index_in(t["uid"], value_set=index["uid"].combine_chunks())
        return index.take(pos).to_pylist()

    label_w, gap = 110, 16
    width = label_w + 2 * per_side * cell + gap
    grid = Image.new("RGB", (width, 18 + max(1, len(chosen)) * cell), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((label_w + 4, 3), "kept", fill="darkgreen")
    draw.text((label_w + per_side * cell + gap + 4, 3), "pruned", fill="darkred")
    for i, g in enumerate(chosen):
        y = 18 + i * cell
        nk = pc.sum(pc.equal(kept[column], g)).as_py() or 0
        nd = pc.sum(pc.equal(dropped[column], g)).as_py() or 0
        draw.text((4, y + cell // 2 - 12), f"{column} {g}", fill="black")
        draw.text((4, y + cell // 2 + 2), f"kept {nk}/{nk + nd}", fill="grey")
        for side in (0, 1):
            x0 = label_w + side * (per_side * cell + gap)
            for j, r in enumerate(rows_of(side, g)):
                data = read_at(pool / "shards" / r["split"] / f"{r['shard']:05d}.tar", r["offset"], r["bytes"])
                img = Image.fromarray(decode(data, None))
                img.thumbnail((cell - 2, cell - 2))
                grid.paste(img, (x0 + j * cell + 1, y + 1))
    with atomic_path(path) as tmp:
        grid.save(tmp, format="PNG")
    return path
