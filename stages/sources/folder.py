"""An image-folder tree: ``root/<class>/<file>``, optionally under split folders ``root/<split>/<class>/``
(the layout rules are in ``stages.sources.tree``)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator, Literal

import pyarrow as pa
import pyarrow.compute as pc

from stages.sources.base import SOURCES, Mapper, Scan, Source, SourceError
from stages.sources.columns import ColumnBuffer, ext_array, iter_rows
from stages.sources.fingerprints import files_fingerprint
from stages.sources.tree import TreeParams, tree_scan

LISTING = pa.schema([("rel", pa.string()), ("size", pa.int64())])


class FolderParams(TreeParams):
    kind: Literal["folder"] = "folder"


def walk(root: Path) -> Iterator[tuple[str, int]]:
    """(posix path relative to ``root``, size) of every file below it, skipping hidden files and folders.

    Symlinked folders are followed (split folders often are links), each real folder once (no cycles).
    """
    stack = [""]
    seen = {(root.stat().st_dev, root.stat().st_ino)}
    while stack:
        rel_dir = stack.pop()
        try:
            entries = sorted(os.scandir(root / rel_dir), key=lambda e: e.name)
        except OSError:
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            try:
                if e.is_dir():
                    st = e.stat()
                    if (st.st_dev, st.st_ino) not in seen:
                        seen.add((st.st_dev, st.st_ino))
                        stack.append(rel)
                elif e.is_file():
                    yield rel, e.stat().st_size
            except OSError:  # a dangling link: nothing to list
                continue


@SOURCES.register("folder")
class FolderSource(Source):
    kind = "folder"
    Params = FolderParams
    params: FolderParams

    def check(self) -> None:
        p = self.params.path
        if not p.exists():
            raise SourceError(f"{p}: source folder does not exist")
        if not p.is_dir():
            raise SourceError(f"{p}: source 'folder' needs a directory")

    def root(self) -> Path:
        return self.params.path

    def listing(self) -> pa.Table:
        buf = ColumnBuffer(LISTING)
        buf.extend(walk(self.params.path))
        return buf.table()

    def content_fingerprint(self) -> str:
        rels = self.listing()["rel"]
        images = pa.table({"rel": rels.filter(pc.is_in(ext_array(rels), value_set=pa.array(self.params.extensions)))})
        ordered = images.sort_by("rel")
        return files_fingerprint(self.params.path, (r for (r,) in iter_rows(ordered, ["rel"])))

    def scan(self, map: Mapper) -> Scan:
        files = self.listing()
        rel = files["rel"].combine_chunks()
        offsets = pa.repeat(pa.scalar(-1, pa.int64()), len(rel))
        return tree_scan(rel, rel, offsets, files["size"].combine_chunks(), self.params, f"{self.params.path}: source folder")
