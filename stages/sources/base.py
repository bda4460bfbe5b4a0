"""Source adapters turn raw inputs into an ordered list of ``SampleRef`` and read their bytes on workers.

A source lists samples on the driver (``scan``, which may fan out with ``map``) and reads bytes on a worker
(``open_reader``). It never decodes images: verification and rejection belong to the shard stage.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, Sequence

from pydantic import BaseModel, ConfigDict

from pipeline.errors import InputError
from pipeline.registry import Registry

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SPLIT_NAMES = ("train", "val", "validation", "valid", "test")
Mapper = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]


class SourceError(InputError):
    """The source as a whole is unusable (missing, empty, wrong format): raised before any work starts."""


@dataclass(frozen=True)
class SampleRef:
    """One input sample. ``ident`` is its stable identity within the source (relative path or member name)."""

    ident: str
    ext: str
    locator: tuple[Any, ...]
    split: str = "train"
    label: str | int | None = None
    caption: str | None = None
    size: int = -1
    extra: dict[str, Any] | None = field(default=None, hash=False, compare=False)


class SourceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str


class Reader:
    """Reads bytes for refs; subclasses keep file handles open across the refs of one task."""

    def read(self, ref: SampleRef) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class FileReader(Reader):
    def read(self, ref: SampleRef) -> bytes:
        with open(ref.locator[0], "rb") as f:
            return f.read()


class OffsetReader(Reader):
    """Reads ``(archive, offset, size)`` locators: members of uncompressed tars, without extracting."""

    def __init__(self) -> None:
        self._files: dict[str, Any] = {}

    def read(self, ref: SampleRef) -> bytes:
        path, offset, size = ref.locator[:3]
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = open(path, "rb")
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{path}: member {ref.ident} truncated ({len(data)} of {size} bytes)")
        return data

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


class Source:
    kind: ClassVar[str]
    Params: ClassVar[type[SourceParams]] = SourceParams

    def __init__(self, params: SourceParams) -> None:
        self.params = params

    def check(self) -> None:
        """Raise ``SourceError`` if the source cannot be used at all."""

    def fingerprint(self) -> str:
        """Cheap identity of the source's current content (sizes and mtimes), for artifact ids."""
        return ""

    def scan(self, map: Mapper) -> list[SampleRef]:
        raise NotImplementedError

    def classes(self) -> list[str] | None:
        """Class names in label-id order, when the source defines them."""
        return None

    def open_reader(self) -> Reader:
        return FileReader()


SOURCES: Registry[type[Source]] = Registry("source", entry_point_group="distillery.sources")


def make_source(spec: dict[str, Any] | SourceParams) -> Source:
    if isinstance(spec, SourceParams):
        spec = spec.model_dump()
    if "kind" not in spec:
        raise SourceError(f"source needs a 'kind' (one of: {', '.join(SOURCES.names())})")
    cls = SOURCES.get(spec["kind"])
    return cls(cls.Params.model_validate(spec))


def stat_fingerprint(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def ext_of(name: str) -> str:
    return name.rsplit(".", 1)[-1].lower() if "." in os.path.basename(name) else ""


def split_and_label(parts: Sequence[str], use_splits: bool) -> tuple[str, str | None]:
    """``train/cat/x.jpg`` -> ("train", "cat"); ``cat/x.jpg`` -> ("train", "cat"); ``x.jpg`` -> ("train", None)."""
    split = "train"
    if use_splits and len(parts) > 1:
        split, parts = parts[0], parts[1:]
    label = parts[0] if len(parts) > 1 else None
    return split, label


def detect_splits(top_level: set[str], mode: str) -> bool:
    if mode == "none":
        return False
    if mode == "dirs":
        return True
    return bool(top_level) and top_level <= set(SPLIT_NAMES)


def tree_refs(items: Sequence[tuple[str, Sequence[str], tuple[Any, ...], int]], splits_mode: str) -> list[SampleRef]:
    """Refs for a class-folder tree given ``(ident, relative path parts, locator, size)`` per file.

    Split folders are recognised when every file sits below one (``train/cat/x.jpg``) and ``splits_mode``
    allows it; the class is the first folder below the split.
    """
    rels = [it[1] for it in items]
    use_splits = detect_splits({r[0] for r in rels if len(r) > 2}, splits_mode) and all(len(r) > 1 for r in rels)
    refs = []
    for ident, rel, locator, size in items:
        split, label = split_and_label(rel, use_splits)
        refs.append(SampleRef(ident=ident, ext=ext_of(rel[-1]), locator=locator, split=split, label=label, size=size))
    return refs
