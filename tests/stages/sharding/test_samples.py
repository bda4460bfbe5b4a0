"""The per-sample chain on plain lists: every step passes rejects through, any exception is a reject."""
from __future__ import annotations

import io
import tarfile

import numpy as np
from PIL import Image

from conftest import jpeg_bytes
from stages.imaging.tar_writer import TarShardWriter
from stages.imaging.verify import ImageOptions, ResizeParams
from stages.sharding.samples import ChannelStats, Sample, ShardWriter, each, measure, read, skip_duplicates, verify
from stages.sources.base import FileReader


def ref(name: str, **kw) -> dict:
    return {"uid": f"u-{name}", "source": name, "file": name, "offset": -1, "size": -1, "label": "cat",
            "label_id": 0, "caption": None, "extra": None, "dup_of_uid": None, "dup_of_source": None,
            "source_sha256": None, "stats": False, **kw}


def test_each_turns_any_exception_into_that_samples_reject():
    def fn(s):
        if s.ref["source"] == "bad":
            raise KeyError("boom")
        s.row = {"ok": True}

    out = list(each([Sample(ref("a")), Sample(ref("bad")), Sample(ref("c"), ), Sample(ref("d"), reject="earlier")],
                    fn, "processing failed"))
    assert [s.reject for s in out] == [None, "processing failed: KeyError: 'boom'", None, "earlier"]
    assert out[3].row is None  # a rejected sample is passed through untouched


def test_read_names_missing_and_unreadable_files(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"abc")
    (tmp_path / "dir.jpg").mkdir()
    out = list(read([Sample(ref("a.jpg")), Sample(ref("gone.jpg")), Sample(ref("dir.jpg"))], FileReader(tmp_path)))
    assert out[0].data == b"abc" and out[0].source_sha256.startswith("ba7816bf")
    assert out[1].reject == "missing file: gone.jpg"
    assert out[2].reject.startswith("unreadable: ")


def test_chain_keeps_in_equal_out_plus_rejected(tmp_path):
    cmyk = io.BytesIO()
    Image.new("CMYK", (40, 40), (0, 255, 0, 0)).save(cmyk, format="JPEG")
    files = {"ok.jpg": jpeg_bytes(1), "cmyk.jpg": cmyk.getvalue(), "junk.jpg": b"junk", "empty.jpg": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    samples = [Sample(ref(n)) for n in files] + [Sample(ref("gone.jpg")), Sample(ref("dup.jpg", dup_of_uid="u-ok.jpg"))]
    buf = io.BytesIO()
    opts = ImageOptions(resize=ResizeParams(size=36, format="png"))  # ok.jpg (32 px) kept, cmyk.jpg (40) resized
    with TarShardWriter(buf) as tar:
        out = list(ShardWriter(tar, 7, "train", 4)(verify(read(skip_duplicates(samples), FileReader(tmp_path)), opts)))
    assert len(out) == 6
    written = [s for s in out if s.reject is None]
    assert [s.row["key"] for s in written] == ["000070000", "000070001"]
    assert {s.ref["source"]: s.reject.split(":")[0] for s in out if s.reject} == {
        "junk.jpg": "undecodable image", "empty.jpg": "empty file", "gone.jpg": "missing file", "dup.jpg": "duplicate"}
    cm = next(s.row for s in written if s.ref["source"] == "cmyk.jpg")
    assert cm["ext"] == "png" and cm["original_mode"] == "CMYK" and cm["normalised"] == "CMYK->RGB"
    names = tarfile.open(fileobj=io.BytesIO(buf.getvalue())).getnames()
    assert names == ["000070000.jpg", "000070000.cls", "000070000.json", "000070001.png", "000070001.cls", "000070001.json"]


def test_measure_counts_only_picked_written_samples():
    img = np.zeros((2, 2, 3), dtype=np.uint8)
    img[0, 0] = [255, 0, 0]
    png = io.BytesIO()
    Image.fromarray(img).save(png, format="PNG")
    s1 = Sample(ref("a", stats=True), data=png.getvalue())
    s2 = Sample(ref("b", stats=False), data=png.getvalue())
    s3 = Sample(ref("c", stats=True), reject="junk")
    from stages.imaging.verify import process

    for s in (s1, s2):
        s.image, s.row = process(s.data), {}
    stats = ChannelStats()
    assert len(list(measure([s1, s2, s3], stats))) == 3
    assert stats.result() == {"images": 1, "skipped": 0, "pixels": 4, "sum": [255, 0, 0], "sumsq": [255 * 255, 0, 0]}


def test_meta_json_is_exactly_json_dumps_of_the_fields():
    import json

    from stages.sharding.samples import meta_json

    row = {"key": "000000001", "uid": "u1", "source": 'dir/"quoted" é.jpg', "split": "train", "label": 3,
           "label_name": "cät", "caption": 'a "photo"\nline', "width": 32, "height": 16, "sha256": "ab",
           "normalised": "16-bit->8-bit", "extra": json.dumps({"b": [1, 2], "a": None}, sort_keys=True), "bytes": 9}
    expected = {k: row[k] for k in ("key", "uid", "source", "split", "label", "label_name", "caption", "width",
                                    "height", "sha256", "normalised")}
    assert meta_json(row) == json.dumps({**expected, "extra": {"a": None, "b": [1, 2]}})
    bare = {**row, "label": None, "label_name": None, "caption": None, "normalised": None, "extra": None}
    assert json.loads(meta_json(bare)) == {k: bare[k] for k in ("key", "uid", "source", "split", "width", "height",
                                                                  "sha256")}
