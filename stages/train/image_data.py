"""Training data from shard artifacts: a decoded uint8 tensor cache for small sets, streaming for large ones.

Small datasets (CIFAR-10 is 184 MB as raw uint8) are decoded once into ``cache/<split>-<size>.npy`` next to
the artifact and augmented on the device; larger ones stream from the shards through webdataset and
DataLoader workers. The choice is automatic by decoded size and can be forced.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.atomic import atomic_path
from pipeline.errors import InputError
from stages.imaging.decode import decode

MEMORY_LIMIT_BYTES = 4 << 30  # decoded size above which 'auto' streams


class DataError(InputError):
    pass


@dataclass
class ImageSet:
    """Decoded images (uint8, N x H x W x 3) with hard labels, row-aligned with uids and keys."""

    images: np.ndarray
    labels: np.ndarray
    uids: list[str]
    keys: list[str]
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, idx: Sequence[int] | np.ndarray) -> "ImageSet":
        idx = np.asarray(idx, dtype=np.int64)
        return ImageSet(self.images[idx], self.labels[idx], [self.uids[i] for i in idx], [self.keys[i] for i in idx],
                        self.classes)


def read_index(artifact: Path, split: str, uids: Sequence[str] | None = None):
    """The artifact's index rows for ``split`` (optionally only ``uids``), in index order."""
    path = artifact / "index.parquet"
    if not path.is_file():
        raise DataError(f"{artifact}: no index.parquet (not a shard artifact)")
    table = pq.read_table(path, columns=["key", "uid", "split", "shard", "label", "offset", "bytes", "width", "height"])
    table = table.filter(pc.equal(table["split"], split))
    if table.num_rows == 0:
        have = sorted(set(pq.read_table(path, columns=["split"]).column("split").to_pylist()))
        raise DataError(f"{artifact}: no samples in split '{split}' (have: {', '.join(have)})")
    if uids is not None:
        table = table.filter(pc.is_in(table["uid"], value_set=__import__("pyarrow").array(list(uids))))
    return table


def decoded_bytes(table, size: int | None) -> int:
    if size is not None:
        return table.num_rows * size * size * 3
    return int(pc.sum(pc.multiply(table["width"], table["height"])).as_py() or 0) * 3


def load_images(artifact: str | os.PathLike[str], split: str = "train", *, size: int | None = None,
                uids: Sequence[str] | None = None, cache: bool = True) -> ImageSet:
    """Decode a split (or a uid selection of it) into memory, through the on-disk uint8 cache."""
    artifact = Path(artifact)
    table = read_index(artifact, split, uids)
    classes = json.loads((artifact / "classes.json").read_text())
    rows = table.to_pylist()
    tag = hashlib.sha256("".join(r["uid"] for r in rows).encode()).hexdigest()[:12]
    cache_path = artifact / "cache" / f"{split}-{size or 'native'}-{tag}.npy"
    labels = np.array([-1 if r["label"] is None else r["label"] for r in rows], dtype=np.int64)
    if cache and cache_path.is_file():
        images = np.load(cache_path)
    else:
        images = decode_rows(artifact, split, rows, size)
        if cache:
            with atomic_path(cache_path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, images)
    return ImageSet(images, labels, [r["uid"] for r in rows], [r["key"] for r in rows], classes)


def decode_rows(artifact: Path, split: str, rows: list[dict], size: int | None) -> np.ndarray:
    out: np.ndarray | None = None
    handles: dict[int, object] = {}
    try:
        for i, r in enumerate(rows):
            f = handles.get(r["shard"])
            if f is None:
                f = handles[r["shard"]] = open(artifact / "shards" / split / f"{r['shard']:05d}.tar", "rb")
            f.seek(r["offset"])  # type: ignore[attr-defined]
            arr = decode(f.read(r["bytes"]), size)  # type: ignore[attr-defined]
            if out is None:
                out = np.empty((len(rows), *arr.shape), dtype=np.uint8)
            elif arr.shape != out.shape[1:]:
                raise DataError(f"{artifact}: sample {r['key']} is {arr.shape[1]}x{arr.shape[0]}, others "
                                f"{out.shape[2]}x{out.shape[1]}: pass size= to resize on load")
            out[i] = arr
    finally:
        for f in handles.values():
            f.close()  # type: ignore[attr-defined]
    if out is None:
        raise DataError(f"{artifact}: no rows to decode in split '{split}'")
    return out


def choose_mode(artifact: Path, split: str, size: int | None, mode: Literal["auto", "memory", "stream"],
                limit: int = MEMORY_LIMIT_BYTES) -> Literal["memory", "stream"]:
    if mode != "auto":
        return mode
    return "memory" if decoded_bytes(read_index(artifact, split), size) <= limit else "stream"


def stream_batches(artifact: str | os.PathLike[str], split: str, batch_size: int, *, size: int | None = None,
                   num_workers: int = 2, shuffle: int = 1000, seed: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of (uint8 N x H x W x 3, int64 labels) streamed from the shards with DataLoader workers."""
    import torch
    import webdataset as wds

    tars = sorted(str(p) for p in (Path(artifact) / "shards" / split).glob("*.tar"))
    if not tars:
        raise DataError(f"{artifact}: no shards for split '{split}'")

    def to_arrays(sample: dict) -> tuple[np.ndarray, int]:
        ext = next(k for k in ("jpg", "jpeg", "png", "webp") if k in sample)
        return decode(sample[ext], size), int(sample["cls"])

    ds = (wds.WebDataset(tars, shardshuffle=len(tars) if shuffle else False, seed=seed,
                         workersplitter=wds.split_by_worker, nodesplitter=None)
          .shuffle(shuffle).map(to_arrays).batched(batch_size, partial=True))
    import multiprocessing

    if multiprocessing.current_process().daemon:  # a Dask worker started with daemon=True cannot fork loaders
        num_workers = 0
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=min(num_workers, len(tars)))
    for images, labels in loader:
        yield np.asarray(images), np.asarray(labels, dtype=np.int64)


class ShardStream:
    """A split of a shard artifact as a ``trainer.BatchStream``: decoded on DataLoader workers, never all in memory."""

    def __init__(self, artifact: str | os.PathLike[str], split: str = "train", size: int | None = None,
                 num_workers: int = 2, shuffle: int = 2000) -> None:
        self.artifact, self.split, self.size = Path(artifact), split, size
        self.num_workers, self.shuffle = num_workers, shuffle
        self._n = read_index(self.artifact, split).num_rows

    def __len__(self) -> int:
        return self._n

    def sample(self, n: int):
        import torch

        rows = read_index(self.artifact, self.split).slice(0, n).to_pylist()
        return torch.from_numpy(decode_rows(self.artifact, self.split, rows, self.size)), \
            torch.tensor([r["label"] for r in rows])

    def batches(self, batch_size: int, seed: int):
        import torch

        for images, labels in stream_batches(self.artifact, self.split, batch_size, size=self.size,
                                             num_workers=self.num_workers, shuffle=self.shuffle, seed=seed):
            yield torch.from_numpy(images), torch.from_numpy(labels)
