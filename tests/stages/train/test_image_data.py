"""Training data: streamed batches are deterministic per (seed, worker count) and cover every sample once."""
from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from stages.train.image_data import ShardStream, choose_mode, load_images, stream_batches


def _epoch(path, seed, workers, batch=64):
    return [(x.copy(), y.copy()) for x, y in stream_batches(path, "train", batch, num_workers=workers, shuffle=300,
                                                           seed=seed)]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(np.array_equal(x1, x2) and np.array_equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_is_deterministic_per_seed_and_covers_every_sample_once(digits_shards, workers):
    path = digits_shards.path
    a, b, c = _epoch(path, 0, workers), _epoch(path, 0, workers), _epoch(path, 1, workers)
    assert _same(a, b), "same seed and worker count: the same batches"
    assert not _same(a, c), "another seed: another order"
    whole = load_images(path, "train")
    streamed = np.concatenate([x for x, _ in a])
    labels = np.concatenate([y for _, y in a])
    assert len(streamed) == len(whole) == 1438
    # every sample exactly once: the multisets of (image bytes, label) agree
    key = lambda imgs, labs: sorted(im.tobytes() + bytes([int(lb)]) for im, lb in zip(imgs, labs))  # noqa: E731
    assert key(streamed, labels) == key(whole.images, whole.labels)
    assert not np.array_equal(labels, whole.labels), "shuffled, not in index order"


def test_shard_stream_feeds_the_trainer_deterministically(digits_shards):
    stream = ShardStream(digits_shards.path, "train", num_workers=2, shuffle=200)
    assert choose_mode(digits_shards.path, "train", None, "auto") == "memory"
    assert choose_mode(digits_shards.path, "train", None, "auto", limit=1000) == "stream"
    first = [y for _, y in stream.batches(128, seed=3)]
    again = [y for _, y in stream.batches(128, seed=3)]
    assert all(torch.equal(p, q) for p, q in zip(first, again)) and len(first) == len(again) == 12
    index = pq.read_table(digits_shards.path / "index.parquet").to_pylist()
    assert sorted(torch.cat(first).tolist()) == sorted(r["label"] for r in index if r["split"] == "train")
