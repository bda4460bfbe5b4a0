"""The embed stage's loader: per-sample generators on plain lists; loader processes and the thread fallback give
the same batches in shard order; bad bytes are rejects with the shard stage's reasons, never exceptions."""
from __future__ import annotations

import io

import numpy as np
import pytest

from conftest import jpeg_bytes, png_bytes
from stages.embedders import batches as B
from stages.embedders.checkpoint import DecodeAt


def test_bad_bytes_become_rejects_with_reasons():
    good = jpeg_bytes(1, 40)
    items = [(0, good), (1, good[: len(good) // 2]), (2, b"not an image at all"), (3, "unreadable: gone")]
    out = dict(B.to_pixels(items, DecodeAt(16)))
    assert out[0].shape == (16, 16, 3) and out[0].dtype == np.uint8
    assert out[1].startswith("undecodable image: OSError: image file is truncated")
    assert out[2].startswith("undecodable image: ")
    assert out[3] == "unreadable: gone"
    batch = B.batched(out.items())
    assert batch.rows.tolist() == [0] and batch.pixels.shape == (1, 16, 16, 3)
    assert [i for i, _ in batch.rejects] == [1, 2, 3]
    assert B.reject_reason(MemoryError("x")).startswith("image too large")


@pytest.fixture
def tar(tmp_path):
    """A byte blob standing in for a shard tar: members at offsets, one of them corrupt."""
    members = [jpeg_bytes(i, 20 + i) if i != 7 else b"garbage" for i in range(23)] + [png_bytes(99, 30)]
    blob, offsets, sizes = io.BytesIO(), [], []
    for m in members:
        offsets.append(blob.tell())
        sizes.append(len(m))
        blob.write(m + b"\0" * 7)
    path = tmp_path / "00000.tar"
    path.write_bytes(blob.getvalue())
    return str(path), offsets, sizes


def collect(batches):
    rows, pixels, rejects = [], [], []
    for b in batches:
        rows.append(b.rows)
        pixels.append(np.asarray(b.pixels))
        rejects += b.rejects
    return np.concatenate(rows), np.concatenate(pixels), rejects


def test_loader_processes_and_thread_fallback_agree(tar, monkeypatch):
    ds = B.ShardImages(*tar, DecodeAt(16), batch_size=5)
    assert len(ds) == 5
    procs = collect(B.shard_batches(ds, workers=2))
    thread = collect(B.shard_batches(ds, workers=0))
    monkeypatch.setattr(B, "can_fork_workers", lambda: False)  # a daemonic Dask worker
    daemon = collect(B.shard_batches(ds, workers=2))
    for got in (procs, thread, daemon):
        assert got[0].tolist() == [i for i in range(24) if i != 7]  # shard order, the bad row left out
        assert got[2] == [(7, got[2][0][1])] and got[2][0][1].startswith("undecodable image")
        np.testing.assert_array_equal(got[1], procs[1])
    np.testing.assert_array_equal(procs[1][0], DecodeAt(16)(jpeg_bytes(0, 20)))


def test_a_truncated_tar_member_is_an_unreadable_reject(tmp_path):
    path = tmp_path / "t.tar"
    path.write_bytes(jpeg_bytes(1))
    got = list(B.read_members(str(path), [0, 1], [0, 10], [len(jpeg_bytes(1)), 10 ** 6]))
    assert isinstance(got[0][1], bytes) and got[1][1].startswith("unreadable: tar member truncated")
