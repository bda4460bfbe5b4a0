"""Table sources: identity from paths relative to the root (row order never matters), the table's own path in
``source``, a named split, several rows for one path."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import jpeg_bytes
from stages.sources import SourceError, create_source
from stages.sources.columns import make_uid


def serial(fn, items):
    return [fn(x) for x in items]


def scan(path, **kw) -> list[dict]:
    return create_source({"kind": "table", "path": str(path), **kw}).scan(serial).refs.to_pylist()


@pytest.fixture
def images(tmp_path):
    (tmp_path / "imgs" / "cat").mkdir(parents=True)
    for i in range(5):
        (tmp_path / "imgs" / "cat" / f"{i}.jpg").write_bytes(jpeg_bytes(i))
    return tmp_path


def test_reordered_table_gives_the_same_uids_as_the_folder(images):
    paths = [f"imgs/cat/{i}.jpg" for i in range(5)]
    pq.write_table(pa.table({"path": paths, "caption": [f"c{i}" for i in range(5)]}), images / "a.parquet")
    pq.write_table(pa.table({"path": paths[::-1], "caption": [f"c{i}" for i in range(5)][::-1]}), images / "b.parquet")
    a = {r["source"]: r["uid"] for r in scan(images / "a.parquet")}
    b = {r["source"]: r["uid"] for r in scan(images / "b.parquet")}
    folder = {r["file"]: r["uid"] for r in create_source({"kind": "folder", "path": str(images)}).scan(serial).refs.to_pylist()}
    assert a == b == folder  # no row-index prefix: the source column is the table's own path
    assert set(a) == set(paths)
    assert a["imgs/cat/0.jpg"] == make_uid("cat/0.jpg")  # the single wrapping folder is stripped, as for folders


def test_absolute_and_dotted_paths_under_the_root_get_the_relative_uid(images):
    pq.write_table(pa.table({"path": [f"{images}/imgs/cat/0.jpg", "./imgs/cat/1.jpg"]}), images / "t.parquet")
    got = scan(images / "t.parquet")
    rel = {r["file"]: r for r in got}
    assert set(rel) == {"imgs/cat/0.jpg", "imgs/cat/1.jpg"}
    table_uids = {r["file"]: r["uid"] for r in scan(images / "t.parquet")}
    pq.write_table(pa.table({"path": ["imgs/cat/0.jpg", "imgs/cat/1.jpg"]}), images / "plain.parquet")
    assert table_uids == {r["file"]: r["uid"] for r in scan(images / "plain.parquet")}
    assert [r["source"] for r in got] == [f"{images}/imgs/cat/0.jpg", "./imgs/cat/1.jpg"]


def test_a_path_on_several_rows_gets_unique_order_independent_uids(images):
    rows = [("imgs/cat/0.jpg", "a cat"), ("imgs/cat/0.jpg", "a small cat"), ("imgs/cat/1.jpg", "another"),
            ("imgs/cat/0.jpg", "a cat")]  # the last row repeats the first exactly
    uids = []
    for order in (rows, rows[::-1], [rows[2], rows[0], rows[3], rows[1]]):
        pq.write_table(pa.table({"path": [p for p, _ in order], "caption": [c for _, c in order]}), images / "t.parquet")
        got = scan(images / "t.parquet")
        assert len({r["uid"] for r in got}) == 4
        uids.append(sorted((r["source"], r["caption"], r["uid"]) for r in got))
    assert uids[0] == uids[1] == uids[2]
    single = {r["source"]: r["uid"] for r in scan(images / "t.parquet") if r["source"] == "imgs/cat/1.jpg"}
    pq.write_table(pa.table({"path": ["imgs/cat/1.jpg"]}), images / "one.parquet")
    assert single == {r["source"]: r["uid"] for r in scan(images / "one.parquet")}  # unshared paths unchanged


def test_uid_column_is_kept_and_must_be_unique(images):
    pq.write_table(pa.table({"path": ["imgs/cat/0.jpg", "imgs/cat/1.jpg"], "uid": ["u-1", "u-2"]}), images / "t.parquet")
    assert [r["uid"] for r in scan(images / "t.parquet")] == ["u-1", "u-2"]
    pq.write_table(pa.table({"path": ["imgs/cat/0.jpg", "imgs/cat/1.jpg"], "uid": ["u-1", "u-1"]}), images / "d.parquet")
    with pytest.raises(SourceError, match="the uid column repeats values"):
        scan(images / "d.parquet")


def test_split_named_in_the_params_or_taken_from_split_folders(images):
    pq.write_table(pa.table({"path": ["imgs/cat/0.jpg", "imgs/cat/1.jpg"]}), images / "t.parquet")
    assert {r["split"] for r in scan(images / "t.parquet")} == {"train"}
    assert {r["split"] for r in scan(images / "t.parquet", split="test")} == {"test"}
    pq.write_table(pa.table({"path": ["imgs/cat/0.jpg", "imgs/cat/1.jpg"], "split": ["val", None]}), images / "s.parquet")
    assert [r["split"] for r in scan(images / "s.parquet", split="test")] == ["val", "test"]


def test_integer_labels_and_extra_columns(images):
    pq.write_table(pa.table({"path": ["imgs/cat/0.jpg", "imgs/cat/1.jpg"], "label": [3, 0], "score": [0.5, 1.5]}),
                   images / "t.parquet")
    got = scan(images / "t.parquet")
    assert [r["label"] for r in got] == ["3", "0"] and got[0]["extra"] == '{"score": 0.5}'
    assert got[0]["size"] == len(jpeg_bytes(0))
