"""Training data from shard artifacts: a decoded uint8 tensor cache for small sets, streaming for large ones.

Small datasets (CIFAR-10 is 184 MB as raw uint8) are decoded once into a ``.npy`` under the declared cache
location (``ctx.cache_dir/images/``, keyed by the artifact id, split, size and selection; never inside the
artifact, which is immutable) and augmented on the device; larger ones stream from the shards through webdataset
and DataLoader workers, shuffled deterministically for a seed and a worker count. The choice is automatic by
decoded size and can be forced.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterator, Literal, Sequence

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.artifacts import Artifact
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


def image_cache_path(cache_dir: Path, artifact_id: str, split: str, size: int | None, uids: Sequence[str]) -> Path:
    """Where a decoded split lives in the cache: keyed by artifact id, split, size and the selection's uids."""
    tag = hashlib.sha256("\n".join(uids).encode()).hexdigest()[:16]
    return Path(cache_dir) / "images" / f"{artifact_id}-{split}-{size or 'native'}-{tag}.npy"


def load_images(artifact: str | os.PathLike[str], split: str = "train", *, size: int | None = None,
                uids: Sequence[str] | None = None, cache_dir: str | os.PathLike[str] | None = None) -> ImageSet:
    """Decode a split (or a uid selection of it) into memory; with ``cache_dir`` through a uint8 ``.npy`` cache
    there (read with ``allow_pickle=False``)."""
    artifact = Path(artifact)
    table = read_index(artifact, split, uids)
    classes = json.loads((artifact / "classes.json").read_text())
    rows = table.to_pylist()
    labels = np.array([-1 if r["label"] is None else r["label"] for r in rows], dtype=np.int64)
    uid_list = [r["uid"] for r in rows]
    cache_path = None
    if cache_dir is not None:
        cache_path = image_cache_path(Path(cache_dir), Artifact(artifact).manifest().artifact_id, split, size,
                                      uid_list)
    if cache_path is not None and cache_path.is_file():
        images = np.load(cache_path, allow_pickle=False)
    else:
        images = decode_rows(artifact, split, rows, size)
        if cache_path is not None:
            with atomic_path(cache_path) as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, images, allow_pickle=False)
    return ImageSet(images, labels, uid_list, [r["key"] for r in rows], classes)


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


def _buffer_shuffle(items: Iterator, size: int, rng: np.random.Generator) -> Iterator:
    """webdataset-style shuffle buffer driven by an explicit generator: every item exactly once."""
    buf: list = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = int(rng.integers(len(buf)))
        buf[j], item = item, buf[j]
        yield item
    for j in rng.permutation(len(buf)):
        yield buf[j]


class _ShardBatches(torch.utils.data.IterableDataset):
    """Each DataLoader worker reads its share of a seeded shard order and yields batches.

    Determinism for (seed, number of workers): worker ``w`` of ``W`` reads shards ``perm[w::W]`` of a permutation
    drawn from ``seed``, shuffles them in a buffer seeded by (seed, w), and batches; the DataLoader interleaves
    the workers' batches in a fixed round-robin order.
    """

    def __init__(self, tars: list[str], size: int | None, batch_size: int, shuffle: int, seed: int,
                 keys: frozenset[str] | None = None) -> None:
        super().__init__()
        self.tars, self.size, self.batch_size, self.shuffle, self.seed = tars, size, batch_size, shuffle, seed
        self.keys = keys  # only these samples (a selection of the split), when given

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        order = np.random.default_rng(self.seed).permutation(len(self.tars)) if self.shuffle else range(len(self.tars))
        mine = [self.tars[i] for i in list(order)[worker::workers]]
        if not mine:
            return
        only = {} if self.keys is None else {"select_files": partial(member_in, self.keys)}
        samples = wds.WebDataset(mine, shardshuffle=False, nodesplitter=None, workersplitter=None,
                                 empty_check=False, **only).map(self._decode)
        if self.shuffle:
            samples = _buffer_shuffle(iter(samples), self.shuffle, np.random.default_rng([self.seed, worker]))
        batch: list[tuple[np.ndarray, int]] = []
        for item in samples:
            batch.append(item)
            if len(batch) == self.batch_size:
                yield self._stack(batch)
                batch = []
        if batch:
            yield self._stack(batch)

    def _decode(self, sample: dict) -> tuple[np.ndarray, int]:
        ext = next(k for k in ("jpg", "jpeg", "png", "webp") if k in sample)
        return decode(sample[ext], self.size), int(sample["cls"])

    @staticmethod
    def _stack(batch: list[tuple[np.ndarray, int]]) -> tuple[np.ndarray, np.ndarray]:
        return np.stack([b[0] for b in batch]), np.array([b[1] for b in batch], dtype=np.int64)


def member_in(keys: frozenset[str], name: str) -> bool:
    """Whether a tar member (``{key}.{ext}``) belongs to one of ``keys``: webdataset's ``select_files`` filter,
    so the members of other samples are skipped before they are decoded."""
    return name.rsplit("/", 1)[-1].split(".", 1)[0] in keys


def stream_batches(artifact: str | os.PathLike[str], split: str, batch_size: int, *, size: int | None = None,
                   num_workers: int = 2, shuffle: int = 1000, seed: int = 0,
                   keys: frozenset[str] | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches of (uint8 N x H x W x 3, int64 labels) streamed from the shards with DataLoader workers; the same
    ``seed`` and worker count give the same batches, every sample once per pass (``shuffle=0``: shard order).
    ``keys``: only those samples (a selection)."""
    import multiprocessing

    tars = sorted(str(p) for p in (Path(artifact) / "shards" / split).glob("*.tar"))
    if not tars:
        raise DataError(f"{artifact}: no shards for split '{split}'")
    if multiprocessing.current_process().daemon:  # a Dask worker started with daemon=True cannot fork loaders
        num_workers = 0
    ds = _ShardBatches(tars, size, batch_size, shuffle, seed, keys)
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=min(num_workers, len(tars)))
    for images, labels in loader:  # the loader converts to tensors; hand back arrays as documented
        yield np.asarray(images), np.asarray(labels, dtype=np.int64)


def sample_rows(artifact: Path, split: str, n: int, seed: int) -> list[dict]:
    """A seeded random sample of ``n`` index rows of a split (all of them when it has fewer), in index order."""
    table = read_index(artifact, split)
    if n < table.num_rows:
        idx = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=n, replace=False))
        table = table.take(idx)
    return table.to_pylist()


class ShardStream:
    """A split of a shard artifact as a ``trainer.BatchStream``: decoded on DataLoader workers, never all in memory."""

    def __init__(self, artifact: str | os.PathLike[str], split: str = "train", size: int | None = None,
                 num_workers: int = 2, shuffle: int = 2000, uids: Sequence[str] | None = None) -> None:
        self.artifact, self.split, self.size = Path(artifact), split, size
        self.num_workers, self.shuffle, self.uids = num_workers, shuffle, uids
        index = read_index(self.artifact, split, uids)
        self._n = index.num_rows
        self.keys = None if uids is None else frozenset(index.column("key").to_pylist())

    def __len__(self) -> int:
        return self._n

    def sample(self, n: int):
        rows = read_index(self.artifact, self.split, self.uids).slice(0, n).to_pylist()
        return torch.from_numpy(decode_rows(self.artifact, self.split, rows, self.size)), \
            torch.tensor([r["label"] for r in rows])

    def batches(self, batch_size: int, seed: int):
        for images, labels in stream_batches(self.artifact, self.split, batch_size, size=self.size,
                                             num_workers=self.num_workers, shuffle=self.shuffle, seed=seed,
                                             keys=self.keys):
            yield torch.from_numpy(np.asarray(images)), torch.from_numpy(np.asarray(labels))
