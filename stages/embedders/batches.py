"""One shard's images as model-ready batches: tar bytes by offset -> the embedder's ``pixels`` -> stacked arrays.

The per-sample work is a chain of small generators (``read_members`` -> ``to_pixels`` -> ``batched``), each
testable on a plain list. ``shard_batches`` runs the chain on DataLoader worker processes so decoding overlaps
the model; a process that cannot fork them (a daemonic Dask worker) runs it on a background thread instead,
which still overlaps (the JPEG decoder and PIL's resize release the GIL). A sample that fails to decode is a
reject with its reason, never an exception.
"""
from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

Pixels = Callable[[bytes], np.ndarray]


@dataclass
class Batch:
    """Stacked pixels of the good rows of one batch (``rows``: their row numbers in the shard) and the rejects."""

    rows: np.ndarray
    pixels: np.ndarray | torch.Tensor | None
    rejects: list[tuple[int, str]]


def read_members(tar: str, rows: Iterable[int], offsets: Sequence[int], sizes: Sequence[int]
                 ) -> Iterator[tuple[int, bytes | str]]:
    """(row, stored bytes) by byte offset in the shard's tar; (row, reason) when the bytes cannot be read."""
    with open(tar, "rb") as f:
        for i in rows:
            f.seek(int(offsets[i]))
            data = f.read(int(sizes[i]))
            yield (i, data) if len(data) == int(sizes[i]) else (i, f"unreadable: tar member truncated "
                                                                   f"({len(data)} of {sizes[i]} bytes)")


def reject_reason(err: BaseException) -> str:
    """The shard stage's reason vocabulary: ``image too large`` / ``undecodable image: <error>``."""
    if isinstance(err, (MemoryError, Image.DecompressionBombError)):
        return f"image too large: {err}"
    return f"undecodable image: {type(err).__name__}: {err}"


def to_pixels(items: Iterable[tuple[int, bytes | str]], pixels: Pixels
              ) -> Iterator[tuple[int, np.ndarray | str]]:
    for i, data in items:
        if isinstance(data, str):
            yield i, data
            continue
        try:
            yield i, pixels(data)
        except Exception as e:  # noqa: BLE001 - any decoder error (MemoryError too) is this sample's reject
            yield i, reject_reason(e)


def batched(items: Iterable[tuple[int, np.ndarray | str]]) -> Batch:
    rows, arrays, rejects = [], [], []
    for i, x in items:
        if isinstance(x, str):
            rejects.append((i, x))
        else:
            rows.append(i)
            arrays.append(x)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:  # members resize to one size; a mismatch is a member bug, not a bad sample
        raise ValueError(f"pixels gave differently shaped arrays {sorted(shapes)}")
    return Batch(np.asarray(rows, dtype=np.int64), np.stack(arrays) if arrays else None, rejects)


class ShardImages(torch.utils.data.Dataset):
    """Item ``b`` = batch ``b`` of one shard (rows ``b*batch_size ...``), read, decoded and stacked."""

    def __init__(self, tar: str, offsets: Sequence[int], sizes: Sequence[int], pixels: Pixels,
                 batch_size: int) -> None:
        self.tar, self.pixels, self.batch_size = tar, pixels, batch_size
        self.offsets, self.sizes = np.asarray(offsets, np.int64), np.asarray(sizes, np.int64)

    def __len__(self) -> int:
        return -(-len(self.offsets) // self.batch_size)

    def __getitem__(self, b: int) -> tuple[np.ndarray, np.ndarray | None, list[tuple[int, str]]]:
        rows = range(b * self.batch_size, min(len(self.offsets), (b + 1) * self.batch_size))
        batch = batched(to_pixels(read_members(self.tar, rows, self.offsets, self.sizes), self.pixels))
        return batch.rows, batch.pixels, batch.rejects


def can_fork_workers() -> bool:
    """Daemonic processes (Dask workers started with ``daemon: true``) may not have children."""
    return not multiprocessing.current_process().daemon


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def shard_batches(ds: ShardImages, workers: int, pin_memory: bool = False, prefetch: int = 2) -> Iterator[Batch]:
    """The batches of ``ds`` in order: on up to ``workers`` loader processes (at most one per usable CPU) when this
    process may have children, else on a background thread (``workers == 0`` too).

    Loader processes are forked where the platform can: Dask workers default to ``spawn``, which would start a fresh
    interpreter per loader process per task (seconds of imports each); forked children inherit the loaded modules
    and only decode (no torch threads, no CUDA)."""
    workers = min(workers, len(ds), usable_cpus())
    if workers > 0 and can_fork_workers() and len(ds) > 1:
        context = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
        loader = torch.utils.data.DataLoader(ds, batch_size=None, shuffle=False, num_workers=workers,
                                             pin_memory=pin_memory, prefetch_factor=prefetch,
                                             collate_fn=_as_tensors, persistent_workers=False,
                                             multiprocessing_context=context)
        for rows, pixels, rejects in loader:
            yield Batch(np.asarray(rows), pixels, list(rejects))
        return
    yield from _threaded(ds, prefetch)


def _as_tensors(item: tuple[np.ndarray, np.ndarray | None, list]) -> tuple[np.ndarray, torch.Tensor | None, list]:
    rows, pixels, rejects = item
    return rows, None if pixels is None else torch.from_numpy(pixels), rejects


def _threaded(ds: ShardImages, depth: int) -> Iterator[Batch]:
    with ThreadPoolExecutor(1, thread_name_prefix="embed-decode") as pool:
        pending = deque(pool.submit(ds.__getitem__, b) for b in range(min(depth, len(ds))))
        nxt = len(pending)
        while pending:
            rows, pixels, rejects = pending.popleft().result()
            if nxt < len(ds):
                pending.append(pool.submit(ds.__getitem__, nxt))
                nxt += 1
            yield Batch(rows, pixels, rejects)
