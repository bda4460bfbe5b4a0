"""A tar archive of an image-folder tree, read in place by member offset (never extracted to disk); the layout
rules (splits, classes, a wrapping folder) are those of the folder source (``stages.sources.tree``)."""
from __future__ import annotations

import mmap
import os
import tarfile
from array import array
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import pyarrow as pa

from stages.sources.base import SOURCES, Mapper, Scan, Source, SourceError
from stages.sources.columns import ColumnBuffer, clean_relpath, iter_rows
from stages.sources.fingerprints import archive_fingerprint
from stages.sources.tree import TreeParams, tree_scan

ZERO_BLOCK = bytes(512)
MEMBERS = pa.schema([("name", pa.string()), ("offset", pa.int64()), ("size", pa.int64())])


class TarParams(TreeParams):
    kind: Literal["tar"] = "tar"


def list_members(path: str) -> pa.Table:
    """(name, data offset, size) of every regular file member, in archive order, as columns.

    Plain USTAR/GNU headers are parsed directly from a memory map, their checksums verified in one numpy pass
    (~10x faster than ``tarfile`` on 60k members); an archive with pax or GNU long-name records, or a bad
    checksum, goes through ``tarfile``.
    """
    try:
        return _scan_headers(path)
    except _NeedsTarfile:
        pass
    buf = ColumnBuffer(MEMBERS)
    try:
        buf.extend(_tarfile_members(path))
    except tarfile.ReadError as e:
        raise SourceError(f"{path}: not an uncompressed tar archive ({e}); decompress it first") from None
    return buf.table()


def _tarfile_members(path: str) -> Iterator[tuple[str, int, int]]:
    with tarfile.open(path, mode="r:") as tf:
        while (m := tf.next()) is not None:
            if m.isfile():
                yield m.name, m.offset_data, m.size
            tf.members.clear()  # tarfile keeps every member it has seen: not for a million-member archive


class _NeedsTarfile(Exception):
    pass


FILE_KINDS = b"0\x007"  # regular files (``\0``: old tars, ``7``: contiguous files)
OTHER_KINDS = b"123456"  # links, devices, directories, fifos: nothing to list


META_KINDS = b"xgLK"  # pax (per member, global) and GNU long-name records: they describe the next header


def _scan_headers(path: str, chunk: int = 8192) -> pa.Table:
    """Walk the header chain in Python (only the size field, and pax/GNU long-name records, decide where the
    next header is and what it is called), copying headers out; kinds, checksums and names are then read
    ``chunk`` headers at a time with numpy."""
    batches: list[pa.RecordBatch] = []
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return MEMBERS.empty_table()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            headers, offsets = bytearray(), array("q")
            names: dict[int, bytes] = {}  # header number in the chunk -> name from a pax/GNU long-name record
            sizes: dict[int, int] = {}  # header number in the chunk -> size from a pax "size" record
            pending: dict[str, bytes] = {}
            end, offset = len(mm), 0
            while offset + 512 <= end:
                h = mm[offset:offset + 512]
                if h[257:262] != b"ustar":
                    if h == ZERO_BLOCK:
                        break
                    raise _NeedsTarfile
                try:
                    size = int(h[124:135], 8)
                except ValueError:
                    raise _NeedsTarfile from None  # base-256 or oddly padded size
                kind = h[156:157]
                if kind in (b"x", b"L"):
                    body = mm[offset + 512:offset + 512 + size]
                    pending.update(pax_records(body) if kind == b"x" else {"path": body.rstrip(b"\0")})
                elif kind not in (b"g", b"K"):
                    if "size" in pending:
                        size = sizes[len(offsets)] = int(pending["size"])
                    if "path" in pending:
                        names[len(offsets)] = pending["path"]
                    pending = {}
                    headers += h
                    offsets.append(offset)
                    if len(offsets) == chunk:
                        batches.append(_members(headers, offsets, names, sizes))
                        headers, offsets, names, sizes = bytearray(), array("q"), {}, {}
                offset += 512 + ((size + 511) & ~511)
    if offsets:
        batches.append(_members(headers, offsets, names, sizes))
    return pa.Table.from_batches(batches, schema=MEMBERS)


def pax_records(body: bytes) -> dict[str, bytes]:
    """``"<len> key=value\\n"`` records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(body) and body[pos:pos + 1] != b"\0":
        space = body.index(b" ", pos)
        length = int(body[pos:space])
        key, _, value = body[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value
        pos += length
    return out


def _members(headers: bytearray, offsets: array, long_names: dict[int, bytes], long_sizes: dict[int, int]
             ) -> pa.RecordBatch:
    """Regular-file members of a run of headers (copied out, 512 bytes each, at ``offsets`` in the archive)."""
    rows = np.frombuffer(bytes(headers), dtype=np.uint8).reshape(-1, 512)
    at = np.frombuffer(offsets, dtype=np.int64)
    kinds = rows[:, 156]
    if not np.isin(kinds, np.frombuffer(FILE_KINDS + OTHER_KINDS, dtype=np.uint8)).all():
        raise _NeedsTarfile  # a header kind this reader does not know
    wide = rows.astype(np.int64)
    got = wide.sum(axis=1) - wide[:, 148:156].sum(axis=1) + 8 * 32  # the checksum field counts as spaces
    if not np.array_equal(got, octal(rows[:, 148:156])):
        raise _NeedsTarfile  # a damaged (or space-padded) header: let tarfile read it
    files = np.flatnonzero(np.isin(kinds, np.frombuffer(FILE_KINDS, dtype=np.uint8)))
    raw = rows[files, :100].tobytes()
    names = [raw[k:k + 100].split(b"\0", 1)[0] for k in range(0, len(raw), 100)]
    for j in np.flatnonzero(rows[files, 345]).tolist():  # a USTAR name prefix (long paths)
        names[j] = bytes(rows[files[j], 345:500]).split(b"\0", 1)[0] + b"/" + names[j]
    sizes = octal(rows[files, 124:135])
    if long_names or long_sizes:
        for j, k in enumerate(files.tolist()):
            names[j] = long_names.get(k, names[j])
            sizes[j] = long_sizes.get(k, sizes[j])
    return pa.record_batch([pa.array([n.decode("utf-8", "surrogateescape") for n in names], pa.string()),
                            pa.array(at[files] + 512), pa.array(sizes)], schema=MEMBERS)


def octal(fields: np.ndarray) -> np.ndarray:
    """The leading octal digits of each row of fixed-width ASCII fields, as integers."""
    digits = fields.astype(np.int64) - ord("0")
    run = np.cumprod((digits >= 0) & (digits <= 7), axis=1).astype(bool)
    n = run.sum(axis=1, keepdims=True)
    power = np.where(run, n - 1 - np.arange(fields.shape[1]), 0)
    return (np.where(run, digits, 0) * (8 ** power)).sum(axis=1)


@SOURCES.register("tar")
class TarSource(Source):
    kind = "tar"
    Params = TarParams
    params: TarParams

    def check(self) -> None:
        p = self.params.path
        if not p.is_file():
            raise SourceError(f"{p}: source tar archive does not exist")

    def root(self) -> Path:
        return self.params.path.parent

    def content_fingerprint(self) -> str:
        m = list_members(str(self.params.path))
        return archive_fingerprint(self.params.path, iter_rows(m, ["name", "size"]))

    def scan(self, map: Mapper) -> Scan:
        path = self.params.path
        m = list_members(str(path))
        rel = clean_relpath(m["name"].combine_chunks())
        files = pa.repeat(pa.scalar(path.name), len(rel))
        return tree_scan(rel, files, m["offset"].combine_chunks(), m["size"].combine_chunks(), self.params,
                         f"{path}: tar archive")
