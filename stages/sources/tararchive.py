"""A tar archive of an image-folder tree, read in place by member offset (never extracted to disk)."""
from __future__ import annotations

import tarfile
from pathlib import Path
from typing import Literal

from stages.sources.base import (
    IMAGE_EXTS, SOURCES, Mapper, OffsetReader, Reader, SampleRef, Source, SourceError, SourceParams,
    ext_of, stat_fingerprint, tree_refs,
)


class TarParams(SourceParams):
    kind: Literal["tar"] = "tar"
    path: Path
    splits: Literal["auto", "dirs", "none"] = "auto"
    extensions: tuple[str, ...] = IMAGE_EXTS


def list_members(path: str) -> list[tuple[str, int, int]]:
    """(name, data offset, size) of every regular file member, in archive order.

    Plain USTAR/GNU headers are parsed directly (~10x faster than ``tarfile`` on 60k members); an archive
    with pax or GNU long-name records goes through ``tarfile``.
    """
    try:
        return _scan_headers(path)
    except _NeedsTarfile:
        pass
    try:
        with tarfile.open(path, mode="r:") as tf:
            return [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
    except tarfile.ReadError as e:
        raise SourceError(f"{path}: not an uncompressed tar archive ({e}); decompress it first") from None


class _NeedsTarfile(Exception):
    pass


def _scan_headers(path: str) -> list[tuple[str, int, int]]:
    out = []
    with open(path, "rb") as f:
        offset = 0
        while True:
            f.seek(offset)
            h = f.read(512)
            if len(h) < 512 or h == bytes(512):
                break
            if h[257:262] != b"ustar":
                raise _NeedsTarfile
            if sum(h[:148]) + 256 + sum(h[156:]) != int(h[148:156].split(b"\0")[0].strip() or b"0", 8):
                raise _NeedsTarfile  # bad checksum: let tarfile produce the error
            kind = h[156:157]
            size_field = h[124:136]
            if size_field[0] & 0x80:
                raise _NeedsTarfile  # base-256 size (huge member)
            size = int(size_field.split(b"\0")[0].strip() or b"0", 8)
            if kind in (b"0", b"\0", b"7"):
                name = h[0:100].split(b"\0")[0]
                prefix = h[345:500].split(b"\0")[0]
                if prefix:
                    name = prefix + b"/" + name
                out.append((name.decode("utf-8"), offset + 512, size))
            elif kind not in (b"5", b"1", b"2", b"3", b"4", b"6"):
                raise _NeedsTarfile  # pax / GNU long names
            offset += 512 + size + (-size % 512)
    return out


@SOURCES.register("tar")
class TarSource(Source):
    kind = "tar"
    Params = TarParams
    params: TarParams

    def check(self) -> None:
        p = self.params.path
        if not p.is_file():
            raise SourceError(f"{p}: source tar archive does not exist")

    def fingerprint(self) -> str:
        return stat_fingerprint([self.params.path])

    def scan(self, map: Mapper) -> list[SampleRef]:
        path = str(self.params.path)
        exts = set(self.params.extensions)
        members = [(n.lstrip("./"), o, s) for n, o, s in list_members(path)]
        members = [m for m in members if ext_of(m[0]) in exts and not m[0].rsplit("/", 1)[-1].startswith(".")]
        if not members:
            raise SourceError(f"{path}: tar archive contains no images ({', '.join(sorted(exts))})")
        members.sort(key=lambda m: m[0])
        rels = [m[0].split("/") for m in members]
        # a single wrapping folder (``cifar10/train/...``) is not a class or split
        if len({r[0] for r in rels}) == 1 and all(len(r) > 2 for r in rels) and rels[0][0] not in {"train", "test"}:
            rels = [r[1:] for r in rels]
        items = [(name, rel, (path, offset, size), size) for (name, offset, size), rel in zip(members, rels)]
        return tree_refs(items, self.params.splits)

    def open_reader(self) -> Reader:
        return OffsetReader()
