"""The source contract: a source lists its samples as one columnar table (``REF_SCHEMA``) on the driver
(``scan``, which may fan out with ``map``) and reads their bytes on a worker (``open_reader``).

It never decodes images: verification and rejection belong to the shard stage. Scanning never builds a Python
object per sample for the whole dataset: a 2-million-image source is a few hundred MB of arrow columns.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from pipeline.errors import InputError
from pipeline.registry import Registry

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
SPLIT_NAMES = ("train", "val", "validation", "test")  # folder names every source recognises as splits
Mapper = Callable[[Callable[[Any], Any], Sequence[Any]], list[Any]]

REF_SCHEMA = pa.schema([
    ("uid", pa.string()),  # the sample's identity in its source: kept when the source carries one
    ("source", pa.string()),  # where the sample is in its source (path relative to the source root, posix)
    ("ext", pa.string()),  # extension as named (the shard stage detects the real format)
    ("split", pa.string()),
    ("label", pa.string()),  # class name (or integer as text); null: unlabelled
    ("caption", pa.string()),
    ("extra", pa.string()),  # JSON object of further metadata, or null
    ("file", pa.string()),  # locator: the file holding the bytes, relative to the source root (or absolute)
    ("offset", pa.int64()),  # where the bytes start in ``file`` (archive members); -1: the whole file
    ("size", pa.int64()),  # bytes; -1: unknown (missing file)
])


class SourceError(InputError):
    """The source as a whole is unusable (missing, empty, wrong format): raised before any work starts."""


class SourceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str
    # a user-declared version of the data: when given it is the source's fingerprint and nothing is scanned
    version: str | None = None


@dataclass(frozen=True)
class Scan:
    """What a source holds: one row per sample (``REF_SCHEMA``) and, when the source defines them, its
    class names in label-id order."""

    refs: pa.Table
    classes: list[str] | None = None


class Reader:
    """Reads sample bytes by locator; keeps archive handles open across the samples of one task."""

    def read(self, file: str, offset: int, size: int) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class FileReader(Reader):
    """Whole files (``offset < 0``) or ``size`` bytes at ``offset`` of an archive, relative to ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = str(root).rstrip("/") + "/"
        self._archives: dict[str, Any] = {}

    def read(self, file: str, offset: int, size: int) -> bytes:
        if not file:
            raise FileNotFoundError("no file")
        if offset < 0:
            with open(file if file.startswith("/") else self.root + file, "rb") as f:
                return f.read()
        f = self._archives.get(file)
        if f is None:
            f = self._archives[file] = open(file if file.startswith("/") else self.root + file, "rb")
        f.seek(offset)
        data = f.read(size)
        if len(data) != size:
            raise OSError(f"{file}: member truncated ({len(data)} of {size} bytes)")
        return data

    def close(self) -> None:
        for f in self._archives.values():
            f.close()
        self._archives.clear()


class Source:
    kind: ClassVar[str]
    Params: ClassVar[type[SourceParams]] = SourceParams
    # params that say where the data lives, not what it is: left out of the artifact id (the content
    # fingerprint stands for them), so moving a dataset re-runs nothing
    location_fields: ClassVar[tuple[str, ...]] = ("path",)

    def __init__(self, params: SourceParams) -> None:
        self.params = params

    def check(self) -> None:
        """Raise ``SourceError`` if the source cannot be used at all."""

    def fingerprint(self) -> str:
        """Identity of the source's content for the artifact id: the declared ``version`` when given, else a
        cheap content scan (sizes and head/tail hashes; never absolute paths or mtimes)."""
        if self.params.version is not None:
            return f"version:{self.params.version}"
        return self.content_fingerprint()

    def content_fingerprint(self) -> str:
        return ""

    def identity(self) -> dict[str, Any]:
        """The parameters that shape the outputs: all but the location fields."""
        data = self.params.model_dump(mode="json")
        return {k: v for k, v in data.items() if k not in self.location_fields}

    def scan(self, map: Mapper) -> Scan:
        raise NotImplementedError

    def root(self) -> Path:
        """What relative ``file`` locators are relative to."""
        return Path("/")

    def open_reader(self) -> Reader:
        return FileReader(self.root())


SOURCES: Registry[type[Source]] = Registry("source", entry_point_group="distillery.sources")


def create_source(spec: dict[str, Any] | SourceParams) -> Source:
    return SOURCES.create(spec, "kind", SourceError)
