"""The relabel stage's picture: the most confident flags, each image with its given label, the suggestion and the
noise score (PIL, images read from the pool by offset with the shared decode)."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq


def flags_grid(pool: Path, flags: pa.Table, classes: list[str], path: Path, columns: int = 8, cell: int = 72) -> Path:
    """``flags``: uid, given, suggested, noise_score, action (in the order to show). A blank note when empty."""
    from PIL import Image, ImageDraw, ImageOps

    from stages.imaging.decode import decode
    from stages.imaging.grid import read_at

    n = flags.num_rows
    rows_n = max(1, -(-n // columns))
    text_h = 42  # three lines: given, suggested, score and action (one line overflowed a cell)
    grid = Image.new("RGB", (columns * cell, 18 + rows_n * (cell + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    draw.text((4, 3), f"most confident label-noise flags ({n}): given -> suggested, noise score", fill="black")
    if n:
        index = pq.read_table(pool / "index.parquet", columns=["uid", "split", "shard", "offset", "bytes"],
                              filters=[("uid", "in", flags.column("uid").to_pylist())])
        where = index.take(pc.index_in(flags["uid"], value_set=index["uid"].combine_chunks())).to_pylist()
        for i, (r, f) in enumerate(zip(where, flags.to_pylist())):
            x, y = (i % columns) * cell, 18 + (i // columns) * (cell + text_h)
            data = read_at(pool / "shards" / r["split"] / f"{r['shard']:05d}.tar", r["offset"], r["bytes"])
            img = ImageOps.contain(Image.fromarray(decode(data, None)), (cell - 4, cell - 4), Image.NEAREST)
            grid.paste(img, (x + 2, y + 2))
            name = lambda c: classes[c][:9] if 0 <= c < len(classes) else str(c)  # noqa: E731
            draw.text((x + 2, y + cell - 2), name(f["given"]), fill="darkred")
            draw.text((x + 2, y + cell + 10), f"-> {name(f['suggested'])}", fill="darkgreen")
            draw.text((x + 2, y + cell + 22), f"{f['noise_score']:.2f} {f['action']}", fill="black")
    grid.save(path, format="PNG")
    return path
