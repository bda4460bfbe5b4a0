"""Folder and tar sources follow the same tree rules: splits, hidden files, wrapping folders, where the class is."""
from __future__ import annotations

import tarfile
import warnings
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import jpeg_bytes
from stages.sources import SPLIT_NAMES, SourceError, create_source
from stages.sources.tree import SourceWarning


def serial(fn, items):
    return [fn(x) for x in items]


def put(root: Path, rels: list[str]) -> None:
    for i, rel in enumerate(rels):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(jpeg_bytes(i))


def tar_of(root: Path, archive: Path, arcname: str = ".") -> Path:
    with tarfile.open(archive, "w") as tf:
        tf.add(root, arcname=arcname)
    return archive


def rows(spec: dict, **kw) -> dict[str, dict]:
    refs = create_source({**spec, **kw}).scan(serial).refs
    return {r["source"]: r for r in refs.to_pylist()}


def test_every_source_recognises_the_same_split_folders(tmp_path):
    assert SPLIT_NAMES == ("train", "val", "validation", "test")
    rels = [f"{s}/{c}/{i}.jpg" for s in SPLIT_NAMES for c in ("cat", "dog") for i in range(2)]
    put(tmp_path / "src", rels)
    pq.write_table(pa.table({"path": rels}), tmp_path / "src" / "list.parquet")
    folder = rows({"kind": "folder", "path": str(tmp_path / "src")})
    tar = rows({"kind": "tar", "path": str(tar_of(tmp_path / "src", tmp_path / "a.tar"))})
    table = rows({"kind": "table", "path": str(tmp_path / "src" / "list.parquet")})
    expect = {rel: rel.split("/")[0] for rel in rels}
    for got in (folder, tar, table):
        assert {k: v["split"] for k, v in got.items()} == expect
    assert {k: v["uid"] for k, v in folder.items()} == {k: v["uid"] for k, v in tar.items()} \
        == {k: v["uid"] for k, v in table.items()}


def test_hidden_files_and_folders_are_skipped_by_folder_and_tar(tmp_path):
    put(tmp_path / "src", ["cat/a.jpg", "cat/.b.jpg", ".cache/cat/c.jpg", "cat/.thumbs/d.jpg", "dog/e.jpg",
                           "__MACOSX/dog/._e.jpg"])
    want = {"cat/a.jpg", "dog/e.jpg"}
    assert set(rows({"kind": "folder", "path": str(tmp_path / "src")})) == want
    # "./.cache/x" once became "cache/x" (lstrip("./")): hidden folders must stay hidden in tars too
    assert set(rows({"kind": "tar", "path": str(tar_of(tmp_path / "src", tmp_path / "a.tar"))})) == want


def test_wrapping_folder_is_stripped_in_folders_and_tars_alike(tmp_path):
    put(tmp_path / "src" / "mydata", ["train/cat/a.jpg", "test/cat/b.jpg"])
    folder = rows({"kind": "folder", "path": str(tmp_path / "src")})
    tar = rows({"kind": "tar", "path": str(tar_of(tmp_path / "src" / "mydata", tmp_path / "a.tar", "mydata"))})
    assert set(folder) == set(tar) == {"train/cat/a.jpg", "test/cat/b.jpg"}
    assert folder["train/cat/a.jpg"]["file"] == "mydata/train/cat/a.jpg"  # the locator keeps the real path
    assert folder["train/cat/a.jpg"]["uid"] == tar["train/cat/a.jpg"]["uid"]


def test_class_folder_below_the_split_at_any_depth_or_by_regex(tmp_path):
    put(tmp_path / "a", ["train/cat/images/1.jpg", "train/dog/images/2.jpg", "val/cat/images/3.jpg"])
    got = rows({"kind": "folder", "path": str(tmp_path / "a")})
    assert {k: (v["split"], v["label"]) for k, v in got.items()} == {
        "train/cat/images/1.jpg": ("train", "cat"), "train/dog/images/2.jpg": ("train", "dog"),
        "val/cat/images/3.jpg": ("val", "cat")}
    put(tmp_path / "b", ["train/batch1/cat/1.jpg", "train/batch2/dog/2.jpg", "train/batch2/3.jpg"])
    got = rows({"kind": "folder", "path": str(tmp_path / "b"), "label_depth": 1})
    assert {k: v["label"] for k, v in got.items()} == {
        "train/batch1/cat/1.jpg": "cat", "train/batch2/dog/2.jpg": "dog", "train/batch2/3.jpg": None}
    put(tmp_path / "c", ["train/cat_001.jpg", "train/dog_002.jpg", "test/cat_003.jpg"])
    got = rows({"kind": "tar", "path": str(tar_of(tmp_path / "c", tmp_path / "c.tar")),
                "label_regex": r"^(?P<label>[a-z]+)_\d+"})
    assert {k: (v["split"], v["label"]) for k, v in got.items()} == {
        "train/cat_001.jpg": ("train", "cat"), "train/dog_002.jpg": ("train", "dog"), "test/cat_003.jpg": ("test", "cat")}
    with pytest.raises(ValueError, match="needs a group"):
        create_source({"kind": "folder", "path": str(tmp_path), "label_regex": "cat"})


def test_class_folders_outside_train_only_are_refused_by_default(tmp_path):
    """``val/images/`` once became a class named ``images``."""
    put(tmp_path / "src", ["train/cat/1.jpg", "train/dog/2.jpg", "val/images/3.jpg", "test/images/4.jpg"])
    spec = {"kind": "folder", "path": str(tmp_path / "src")}
    with pytest.raises(SourceError, match=r"class folders test/images, val/images exist outside the train split"
                                          r".*label_depth, label_regex.*table source.*split_only_classes: warn"):
        rows(spec)
    with pytest.raises(SourceError, match="val/images"):
        rows({**spec, "kind": "tar", "path": str(tar_of(tmp_path / "src", tmp_path / "a.tar"))})
    with pytest.warns(SourceWarning, match="val/images"):
        assert rows(spec, split_only_classes="warn")["val/images/3.jpg"]["label"] == "images"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rows(spec, split_only_classes="allow")["test/images/4.jpg"]["label"] == "images"
    # a class missing from a small test split is fine
    put(tmp_path / "ok", ["train/cat/1.jpg", "train/dog/2.jpg", "test/cat/3.jpg"])
    assert len(rows({"kind": "folder", "path": str(tmp_path / "ok")})) == 3


def test_webdataset_skips_hidden_members(tmp_path):
    import io

    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in (("k1.jpg", jpeg_bytes(1)), ("k1.cls", b"3"), (".k2.jpg", jpeg_bytes(2)),
                           ("._k1.jpg", b"mac"), ("k3.png", jpeg_bytes(3))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    got = rows({"kind": "webdataset", "path": str(tmp_path / "s.tar")})
    assert set(got) == {"s.tar/k1", "s.tar/k3"} and got["s.tar/k1"]["label"] == "3"


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT],
                         ids=["gnu", "pax", "ustar"])
def test_fast_tar_listing_agrees_with_tarfile(tmp_path, fmt):
    """Long names (GNU records, pax paths, USTAR prefixes), non-ASCII names, pax mtimes: the numpy header reader
    lists exactly what ``tarfile`` lists, without falling back to it."""
    import io

    from stages.sources.tararchive import _scan_headers, _tarfile_members

    names = ["a/" + "x" * 90 + ".jpg", "short.jpg", "d/" * 70 + "deep.jpg"]
    if fmt != tarfile.USTAR_FORMAT:
        names += ["ü/ñ.png", "b/" + "y" * 150 + ".jpg"]
    with tarfile.open(tmp_path / "t.tar", "w", format=fmt) as tf:
        for i, name in enumerate(names):
            info = tarfile.TarInfo(name)
            info.size, info.mtime = 100 + i, 1.5
            tf.addfile(info, io.BytesIO(bytes(range(100 + i))))
    fast = _scan_headers(str(tmp_path / "t.tar"))
    assert list(zip(*(fast[c].to_pylist() for c in ("name", "offset", "size")))) == list(_tarfile_members(str(tmp_path / "t.tar")))
    assert sorted(fast["name"].to_pylist()) == sorted(names)


def test_symlinked_split_folders_are_followed_once(tmp_path):
    put(tmp_path / "real", ["cat/a.jpg", "dog/b.jpg"])
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "train").symlink_to(tmp_path / "real")
    (tmp_path / "real" / "cat" / "loop").symlink_to(tmp_path / "real")  # a cycle
    (tmp_path / "real" / "dog" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    got = rows({"kind": "folder", "path": str(tmp_path / "src")})
    assert {k: (v["split"], v["label"]) for k, v in got.items()} == {"train/cat/a.jpg": ("train", "cat"),
                                                                    "train/dog/b.jpg": ("train", "dog")}
