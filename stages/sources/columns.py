"""Column helpers every source shares: uids, relative paths, extensions, hidden files, chunked building.

Pure functions over arrow arrays, so a scan costs a few bytes per sample, not a Python object per sample.
"""
from __future__ import annotations

import hashlib
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc

CHUNK = 65_536


def make_uid(ident: str) -> str:
    """128-bit id (hex) of a sample's identity in its source (its relative path), as DataComp keeps per sample."""
    return hashlib.blake2b(ident.encode("utf-8"), digest_size=16).hexdigest()


def uid_array(idents: pa.Array | pa.ChunkedArray) -> pa.ChunkedArray:
    """``make_uid`` over a column, a chunk at a time."""
    arr = idents.combine_chunks() if isinstance(idents, pa.ChunkedArray) else idents
    chunks = [pa.array([make_uid(x) for x in arr.slice(i, CHUNK).to_pylist()], pa.string())
              for i in range(0, len(arr), CHUNK)]
    return pa.chunked_array(chunks, pa.string())


def clean_relpath(paths: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Posix relative paths without leading ``./`` or ``/`` and without doubled slashes."""
    out = pc.replace_substring_regex(paths, r"/{2,}", "/")
    out = pc.replace_substring_regex(out, r"^(\./|/)+", "")
    return pc.replace_substring_regex(out, r"(/\.)+/", "/")


def ext_array(paths: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Lower-case extension of each path's file name ("" when it has none)."""
    found = pc.extract_regex(paths, r"\.(?P<ext>[^./]+)$")
    return pc.fill_null(pc.utf8_lower(pc.struct_field(found, "ext")), "")


def hidden_mask(paths: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """True where any component of the path starts with a dot (``.git/``, ``._x.jpg`` from macOS archives)."""
    return pc.match_substring_regex(paths, r"(^|/)\.")


class ColumnBuffer:
    """Appends rows as plain values and turns every ``CHUNK`` rows into arrow arrays: bounded Python memory."""

    def __init__(self, schema: pa.Schema) -> None:
        self.schema = schema
        self._rows: list[tuple[Any, ...]] = []
        self._batches: list[pa.RecordBatch] = []

    def add(self, *row: Any) -> None:
        self._rows.append(row)
        if len(self._rows) >= CHUNK:
            self.flush()

    def extend(self, rows: Iterable[tuple[Any, ...]]) -> None:
        for r in rows:
            self.add(*r)

    def flush(self) -> None:
        if self._rows:
            cols = list(zip(*self._rows))
            self._batches.append(pa.record_batch([pa.array(c, f.type) for c, f in zip(cols, self.schema)],
                                                 schema=self.schema))
            self._rows = []

    def table(self) -> pa.Table:
        self.flush()
        return pa.Table.from_batches(self._batches, schema=self.schema)


def iter_rows(table: pa.Table, columns: list[str]) -> Iterable[tuple[Any, ...]]:
    """Rows of some columns as tuples, materialising one chunk at a time."""
    for batch in table.select(columns).to_batches(max_chunksize=CHUNK):
        yield from zip(*(c.to_pylist() for c in batch.columns))
