"""An image-folder tree: ``root/<class>/<file>``, optionally under split folders ``root/<split>/<class>/``."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from stages.sources.base import (
    IMAGE_EXTS, SOURCES, FileReader, Mapper, Reader, SampleRef, Source, SourceError, SourceParams,
    ext_of, stat_fingerprint, tree_refs,
)


class FolderParams(SourceParams):
    kind: Literal["folder"] = "folder"
    path: Path
    splits: Literal["auto", "dirs", "none"] = "auto"
    extensions: tuple[str, ...] = IMAGE_EXTS


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

    def _files(self) -> list[Path]:
        root = self.params.path
        exts = set(self.params.extensions)
        out = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            out.extend(Path(dirpath) / f for f in sorted(filenames)
                       if not f.startswith(".") and ext_of(f) in exts)
        return out

    def fingerprint(self) -> str:
        return stat_fingerprint(self._files())

    def scan(self, map: Mapper) -> list[SampleRef]:
        root = self.params.path
        files = self._files()
        if not files:
            raise SourceError(f"{root}: source folder contains no images ({', '.join(self.params.extensions)})")
        items = []
        for f in files:
            rel = f.relative_to(root).parts
            items.append(("/".join(rel), rel, (str(f),), f.stat().st_size))
        return tree_refs(items, self.params.splits)

    def open_reader(self) -> Reader:
        return FileReader()
