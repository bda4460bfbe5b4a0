"""Atomic file writes: write to a temporary name in the same directory, then rename.

A reader (or a resumed run) therefore sees either the old file, no file, or the complete new one.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterator


def tmp_name(path: Path) -> Path:
    """A unique temporary sibling of ``path`` (same filesystem, so rename is atomic)."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    """Stable, readable JSON (sorted keys) so identical content gives identical bytes."""
    return json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n"


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    write_text(path, dumps_json(obj))


def _json_default(o: Any) -> Any:
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "model_dump"):
        return o.model_dump(mode="json")
    if hasattr(o, "tolist"):  # numpy scalars and arrays
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def canonical_hash(obj: Any) -> str:
    """sha256 of the canonical JSON form of ``obj``: the basis of artifact ids."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def symlink(link: str | os.PathLike[str], target: str) -> None:
    """Point ``link`` at ``target`` (relative to the link's folder), switched atomically: a reader sees the old or
    the new target, never no link."""
    link = Path(link)
    tmp = link.parent / f".{link.name}.link-{uuid.uuid4().hex[:12]}"
    os.symlink(target, tmp)
    os.replace(tmp, link)
