"""Source fingerprints are about content: moving or touching data changes nothing, changing a byte does."""
from __future__ import annotations

import os
import shutil
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import jpeg_bytes, make_tree
from stages.sources import create_source
from stages.sources.fingerprints import BLOCK


def fp(kind: str, path, **kw) -> str:
    return create_source({"kind": kind, "path": str(path), **kw}).fingerprint()


def flip_byte(path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def test_folder_fingerprint_ignores_location_and_mtime_not_content(tmp_path):
    make_tree(tmp_path / "a", per_class=2, corrupt=False)
    before = fp("folder", tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    assert fp("folder", tmp_path / "elsewhere" / "b") == before
    target = tmp_path / "a" / "train" / "cat" / "0000.jpg"
    os.utime(target, (1, 1))
    assert fp("folder", tmp_path / "a") == before
    flip_byte(target, len(target.read_bytes()) // 2)
    assert fp("folder", tmp_path / "a") != before


def test_large_file_counts_by_size_head_and_tail(tmp_path):
    (tmp_path / "d" / "c").mkdir(parents=True)
    big = tmp_path / "d" / "c" / "x.jpg"
    big.write_bytes(bytes(5 * BLOCK))
    before = fp("folder", tmp_path / "d")
    flip_byte(big, len(big.read_bytes()) - 1)
    tail = fp("folder", tmp_path / "d")
    flip_byte(big, 0)
    assert len({before, tail, fp("folder", tmp_path / "d")}) == 3


def test_tar_fingerprint_by_listing_and_head_tail(tmp_path):
    make_tree(tmp_path / "src", per_class=2, corrupt=False)
    with tarfile.open(tmp_path / "a.tar", "w") as tf:
        tf.add(tmp_path / "src", arcname=".")
    before = fp("tar", tmp_path / "a.tar")
    (tmp_path / "moved").mkdir()
    os.replace(tmp_path / "a.tar", tmp_path / "moved" / "a.tar")
    os.utime(tmp_path / "moved" / "a.tar", (1, 1))
    assert fp("tar", tmp_path / "moved" / "a.tar") == before
    with tarfile.open(tmp_path / "b.tar", "w") as tf:
        tf.add(tmp_path / "src", arcname=".")
        tf.add(tmp_path / "src" / "train" / "cat" / "0000.jpg", arcname="train/cat/new.jpg")
    assert fp("tar", tmp_path / "b.tar") != before


def test_table_fingerprint_covers_the_files_it_lists(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    pq.write_table(pa.table({"path": [f"imgs/{i}.jpg" for i in range(3)]}), tmp_path / "t.parquet")
    before = fp("table", tmp_path / "t.parquet")
    os.utime(tmp_path / "imgs" / "1.jpg", (1, 1))
    assert fp("table", tmp_path / "t.parquet") == before
    flip_byte(tmp_path / "imgs" / "1.jpg", 40)
    assert fp("table", tmp_path / "t.parquet") != before


def test_declared_version_replaces_the_scan(tmp_path, monkeypatch):
    from stages.sources.folder import FolderSource

    make_tree(tmp_path / "a", per_class=1, corrupt=False)

    def no_scan(self):
        raise AssertionError("scanned although a version was declared")

    monkeypatch.setattr(FolderSource, "content_fingerprint", no_scan)
    assert fp("folder", tmp_path / "a", version="2024-05-01") == "version:2024-05-01"
    with pytest.raises(AssertionError, match="scanned"):
        fp("folder", tmp_path / "a")
