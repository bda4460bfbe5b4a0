"""Loading any ``shards`` or ``selection`` artifact into your own training code, without exporting a selection first.

    from stages.train.loaders import load_rows, webdataset, ArtifactDataset, dataloader, load_tensors

    ds = webdataset("runs/c10/prune").to_tuple("jpg;png;webp", "cls")    # streaming (webdataset, DataLoader workers)
    dl = dataloader("runs/c10/prune", batch_size=256, transform=tf)      # random access by offset (map-style)
    images, labels, uids = load_tensors("runs/c10/prune", size=32)       # decoded uint8 tensors (cached)
    mean, std = pool_stats("runs/c10/prune")                             # the pool's statistics: the model space

A selection is read from its *pool*: ``webdataset`` streams the pool's tars that hold selected samples and keeps
only those members (the trie-at-load-time idea of DBP's code, as a key set), ``ArtifactDataset`` seeks straight to
each selected image (best for small selections), ``load_tensors`` decodes them once into the cache. All of them
give exactly the selected rows, in the pool's order, for a shards artifact all of its rows.

It lives with the reference trainer because the trainer's ``selection`` loader (``training_sets.py``) is built on
the same rows and decode, so what you train on here is what ``validate`` trains on.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pyarrow as pa
import torch

from stages.imaging.decode import decode
from stages.train.image_data import member_in
from stages.selections.store import INDEX_COLUMNS, pool_rows
from stages.sharding.pool import find_pool

PathLike = str | os.PathLike[str]


@dataclass
class Rows:
    """The pool rows an artifact stands for (key, uid, split, shard, label, offset, bytes, width, height)."""

    artifact: Path
    pool: Path
    split: str | None
    table: pa.Table
    classes: list[str]
    selection: bool  # a subset of the pool (not all of its rows)

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def uids(self) -> list[str]:
        return self.table.column("uid").to_pylist()

    @property
    def keys(self) -> frozenset[str]:
        return frozenset(self.table.column("key").to_pylist())

    def tars(self) -> list[str]:
        """The pool tars holding at least one of the rows, in shard order."""
        pairs = sorted(set(zip(self.table.column("split").to_pylist(), self.table.column("shard").to_pylist())),
                       key=lambda t: t[1])
        return [str(self.pool / "shards" / s / f"{n:05d}.tar") for s, n in pairs]


def load_rows(artifact: PathLike, split: str | None = "train") -> Rows:
    """The rows of ``split`` (all splits: None) a shards or selection artifact stands for."""
    artifact = Path(artifact)
    pool = find_pool(artifact)
    table = pool_rows(artifact, split, INDEX_COLUMNS)
    kind = json.loads((artifact / "manifest.json").read_text()).get("kind")
    return Rows(artifact, pool, split, table, json.loads((pool / "classes.json").read_text()), kind != "shards")


def pool_stats(artifact: PathLike) -> tuple[list[float], list[float]]:
    """(mean, std) per channel of [0, 1] pixels of the pool's training split (its manifest's ``image_stats``):
    normalise a selection with these, never with the subset's own."""
    stats = json.loads((find_pool(Path(artifact)) / "manifest.json").read_text())["metrics"]["image_stats"]
    return list(stats["mean"]), list(stats["std"])


def webdataset(artifact: PathLike, split: str = "train", *, decode: str | None = "pil", shardshuffle: bool = False,
               **kw: Any):
    """A ``webdataset.WebDataset`` of the rows (split across DataLoader workers by shard); chain ``.shuffle(n)``,
    ``.to_tuple("jpg;png;webp", "cls")``, ``.map(...)`` as usual. ``decode=None`` yields raw bytes."""
    import webdataset as wds

    rows = load_rows(artifact, split)
    if rows.selection:
        kw.setdefault("select_files", partial(member_in, rows.keys))
    ds = wds.WebDataset(rows.tars(), shardshuffle=shardshuffle, nodesplitter=kw.pop("nodesplitter", wds.split_by_node),
                        empty_check=False, **kw)
    return ds.decode(decode) if decode is not None else ds


class ArtifactDataset(torch.utils.data.Dataset):
    """Map-style: item ``i`` is ``(image, label)`` of row ``i``, read from the pool's tar at its offset and decoded
    with the shared decode (``image``: PIL RGB for ``decode="pil"``, a uint8 H x W x 3 array for ``"numpy"``; then
    ``transform``). Picklable: DataLoader workers open their own file handles."""

    def __init__(self, artifact: PathLike, split: str = "train", transform: Callable[[Any], Any] | None = None,
                 size: int | None = None, decode: Literal["pil", "numpy"] = "pil") -> None:
        rows = load_rows(artifact, split)
        t = rows.table
        self.pool, self.transform, self.size, self.mode = rows.pool, transform, size, decode
        self.uids = t.column("uid").to_pylist()
        self.classes = rows.classes
        self._split = t.column("split").to_pylist()
        self._shard = t.column("shard").to_numpy()
        self._offset = t.column("offset").to_numpy()
        self._bytes = t.column("bytes").to_numpy()
        self.labels = np.array([-1 if v is None else v for v in t.column("label").to_pylist()], dtype=np.int64)
        self._files: dict[tuple[str, int], Any] = {}

    def __len__(self) -> int:
        return len(self.uids)

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_files"] = {}
        return state

    def read(self, i: int) -> bytes:
        key = (self._split[i], int(self._shard[i]))
        f = self._files.get(key)
        if f is None:
            f = self._files[key] = open(self.pool / "shards" / key[0] / f"{key[1]:05d}.tar", "rb")
        f.seek(int(self._offset[i]))
        return f.read(int(self._bytes[i]))

    def __getitem__(self, i: int) -> tuple[Any, int]:
        img: Any = decode(self.read(i), self.size)
        if not img.flags.writeable:  # PIL-backed arrays are read-only; torch wants to own writable memory
            img = img.copy()
        if self.mode == "pil":
            from PIL import Image

            img = Image.fromarray(img)
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])


def dataloader(artifact: PathLike, split: str = "train", *, batch_size: int = 256,
               transform: Callable[[Any], Any] | None = None, size: int | None = None, shuffle: bool = True,
               seed: int = 0, num_workers: int = 2, **kw: Any) -> torch.utils.data.DataLoader:
    """A DataLoader over ``ArtifactDataset`` (seeded shuffling). Without ``transform`` a batch is (uint8 N x H x W x 3,
    int64 labels); with one the transform gets PIL images (torchvision style)."""
    ds = ArtifactDataset(artifact, split, transform, size, decode="pil" if transform is not None else "numpy")
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers,
                                       generator=torch.Generator().manual_seed(seed), **kw)


def load_tensors(artifact: PathLike, split: str = "train", *, size: int | None = None,
                 cache_dir: PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Every row decoded into memory: (uint8 N x H x W x 3, int64 labels, uids), cached under ``cache_dir``."""
    from stages.train.image_data import load_images

    rows = load_rows(artifact, split)
    s = load_images(rows.pool, split, size=size, uids=rows.uids if rows.selection else None, cache_dir=cache_dir)
    return torch.from_numpy(np.ascontiguousarray(s.images)), torch.from_numpy(s.labels), s.uids
