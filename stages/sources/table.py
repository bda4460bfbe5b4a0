"""A parquet or CSV/TSV table with a path column (+ optional uid, caption, label, split and extra columns).

Identity: a ``uid`` column is kept as it is. Otherwise a row's uid derives from its path relative to the root
(the table's folder, or ``root``; a single wrapping folder stripped, as for folders and tars), so a table of a
folder's files gets the folder source's uids, whatever the row order. A path listed on several rows (several captions per image) gives one sample per row: each such row's
uid derives from the path and the row's content (caption, label, split, extra columns), so it still does not
depend on row order; identical rows are numbered. Rows are explicit: hidden files are not skipped.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from stages.sources.base import REF_SCHEMA, SOURCES, Mapper, Scan, Source, SourceError, SourceParams
from stages.sources.columns import CHUNK, clean_relpath, ext_array, iter_rows, make_uid, uid_array
from stages.sources.fingerprints import files_fingerprint, head_tail
from stages.sources.tree import split_columns, strip_wrapper


class TableParams(SourceParams):
    kind: Literal["table"] = "table"
    path: Path
    path_column: str = "path"
    uid_column: str | None = "uid"  # used when present: the identity the table already gives its samples
    caption_column: str | None = "caption"  # used when present
    label_column: str | None = "label"
    split_column: str | None = "split"
    # the split of rows without a split value; default: the split folder the paths start with, if all do, else train
    split: str | None = None
    root: Path | None = None  # base of relative paths; default: the table's folder
    extra_columns: list[str] | None = None  # default: every other column


def read_table(path: Path) -> pa.Table:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    try:
        if path.suffix.lower() in (".parquet", ".pq"):
            return pq.read_table(path)
        if path.suffix.lower() in (".csv", ".tsv"):
            opts = pcsv.ParseOptions(delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
            return pcsv.read_csv(path, parse_options=opts)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad source
        raise SourceError(f"{path}: cannot read table: {e}") from None
    raise SourceError(f"{path}: table source must be .parquet, .csv or .tsv")


def stat_sizes(args: tuple[str, list[str]]) -> list[int]:
    """Sizes of files relative to a root (-1 when missing or not a file); runs on a worker."""
    root, files = args
    prefix = root.rstrip("/") + "/"
    out = []
    for f in files:
        try:
            st = os.stat(f if f.startswith("/") else prefix + f)
            out.append(st.st_size if stat.S_ISREG(st.st_mode) else -1)
        except (OSError, ValueError):
            out.append(-1)
    return out


@SOURCES.register("table")
class TableSource(Source):
    kind = "table"
    Params = TableParams
    params: TableParams
    location_fields = ("path", "root")

    def check(self) -> None:
        if not self.params.path.is_file():
            raise SourceError(f"{self.params.path}: source table does not exist")

    def root(self) -> Path:
        return self.params.root or self.params.path.parent

    def files(self, table: pa.Table) -> pa.Array:
        """Each row's file relative to the root (absolute when it lies outside the root), posix."""
        raw = pc.fill_null(table[self.params.path_column].cast(pa.string()).combine_chunks(), "")
        prefix = str(self.root()).rstrip("/") + "/"
        inside = pc.starts_with(raw, prefix)
        absolute = pc.starts_with(raw, "/")
        return pc.if_else(inside, pc.utf8_slice_codeunits(raw, len(prefix)),
                          pc.if_else(absolute, raw, clean_relpath(raw)))

    def content_fingerprint(self) -> str:
        """The table's own bytes and the files it lists."""
        table = self._read()
        listed = pa.table({"file": self.files(table)}).group_by("file").aggregate([]).sort_by("file")
        return f"{head_tail(self.params.path)}:{files_fingerprint(self.root(), (f for (f,) in iter_rows(listed, ['file'])))}"

    def _read(self) -> pa.Table:
        p = self.params
        table = read_table(p.path)
        if table.num_rows == 0:
            raise SourceError(f"{p.path}: source table has no rows")
        if p.path_column not in table.column_names:
            raise SourceError(f"{p.path}: no path column '{p.path_column}' (columns: {', '.join(table.column_names)})")
        return table

    def scan(self, map: Mapper) -> Scan:
        p = self.params
        table = self._read()
        cols = table.column_names
        present = {name: c for name, c in (("uid", p.uid_column), ("caption", p.caption_column),
                                           ("label", p.label_column), ("split", p.split_column)) if c in cols}
        files = self.files(table)
        ident = strip_wrapper(files)
        n = len(files)
        default_split = p.split
        if "split" in present:
            split = pc.fill_null(_text(table[present["split"]]), default_split or "train")
        elif default_split is not None:
            split = pa.repeat(pa.scalar(default_split), n)
        else:
            split = split_columns(ident, "auto")[0]
        used = {p.path_column, *present.values()}
        extra_cols = p.extra_columns if p.extra_columns is not None else [c for c in cols if c not in used]
        missing = [c for c in extra_cols if c not in cols]
        if missing:
            raise SourceError(f"{p.path}: extra_columns {missing} are not in the table (columns: {', '.join(cols)})")
        refs = pa.table({
            "uid": pa.nulls(n, pa.string()), "source": pc.fill_null(_text(table[p.path_column]), ""),
            "ext": ext_array(files), "split": split,
            "label": _text(table[present["label"]]) if "label" in present else pa.nulls(n, pa.string()),
            "caption": _text(table[present["caption"]]) if "caption" in present else pa.nulls(n, pa.string()),
            "extra": extra_json(table.select(extra_cols)) if extra_cols else pa.nulls(n, pa.string()),
            "file": files, "offset": pa.repeat(pa.scalar(-1, pa.int64()), n),
            "size": self._sizes(files, map),
        }, schema=REF_SCHEMA)
        uids = _given_uids(table[present["uid"]], p.path) if "uid" in present else derived_uids(refs, ident)
        return Scan(refs.set_column(0, "uid", uids))

    def _sizes(self, files: pa.Array, map: Mapper) -> pa.Array:
        root = str(self.root())
        chunks = [(root, files.slice(i, CHUNK).to_pylist()) for i in range(0, len(files), CHUNK)]
        return pa.concat_arrays([pa.array(s, pa.int64()) for s in map(stat_sizes, chunks)])


def _text(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_floating(arr.type):  # CSV reads integer labels with gaps as floats: 3.0 -> "3"
        whole = pc.equal(arr, pc.floor(arr))
        if pc.all(pc.or_kleene(whole, pc.is_null(arr))).as_py():
            arr = arr.cast(pa.int64())
    return arr.cast(pa.string())


def extra_json(table: pa.Table) -> pa.Array:
    """A JSON object per row of the extra columns (values that JSON cannot hold become strings)."""
    chunks = []
    for batch in table.to_batches(max_chunksize=CHUNK):
        chunks.append(pa.array([json.dumps({k: _jsonable(v) for k, v in row.items()}, sort_keys=True)
                                for row in batch.to_pylist()], pa.string()))
    return pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except TypeError:
        return str(v)


def _given_uids(col: pa.ChunkedArray, where: Path) -> pa.Array:
    uids = _text(col)
    if uids.null_count:
        raise SourceError(f"{where}: the uid column has {uids.null_count} empty values")
    if len(pc.unique(uids)) != len(uids):
        dup = pa.table({"u": uids}).group_by("u").aggregate([("u", "count")]).filter(pc.field("u_count") > 1)
        raise SourceError(f"{where}: the uid column repeats values, e.g. {dup['u'].to_pylist()[:3]}")
    return uids


def derived_uids(refs: pa.Table, ident: pa.Array) -> pa.Array:
    """uid from each row's identity (its path); rows sharing a path are told apart by their content."""
    counts = pa.table({"f": ident}).group_by("f").aggregate([("f", "count")])
    shared = counts.filter(pc.field("f_count") > 1)["f"]
    base = uid_array(ident).combine_chunks()
    if len(shared) == 0:
        return base
    rows = pc.indices_nonzero(pc.is_in(ident, value_set=shared)).to_numpy()  # ascending
    content = refs.select(["caption", "label", "split", "extra"]).take(rows).to_pylist()
    seen: dict[str, int] = {}
    new = []
    for path, r in zip(ident.take(pa.array(rows)).to_pylist(), content):
        key = f"{path}#{make_uid(json.dumps([r['caption'], r['label'], r['split'], r['extra']]))}"
        seen[key] = seen.get(key, -1) + 1
        new.append(make_uid(f"{key}#{seen[key]}" if seen[key] else key))
    mask = np.zeros(len(ident), dtype=bool)
    mask[rows] = True
    return pc.replace_with_mask(base, pa.array(mask), pa.array(new, pa.string()))
