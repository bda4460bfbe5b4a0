"""Cheap content fingerprints for artifact ids: independent of where the data lives and of mtimes.

A file counts by its relative path, its size and a hash of its first and last ``BLOCK`` bytes (the whole file
when it is smaller than two blocks, as most thumbnails are). Moving or ``touch``-ing a dataset changes nothing;
adding, removing, renaming, resizing a file or changing its head or tail changes the fingerprint. An edit that
keeps the size and touches only the middle of a larger file goes unnoticed: declare ``version:`` in the source
(or ``--force shard``) for such data.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

BLOCK = 4096


def head_tail(path: str | os.PathLike[str], size: int | None = None) -> str:
    """sha256 (hex, 16 chars) of the first and last ``BLOCK`` bytes of a file."""
    with open(path, "rb") as f:
        if size is None:
            size = os.fstat(f.fileno()).st_size
        data = f.read(2 * BLOCK) if size <= 2 * BLOCK else f.read(BLOCK)
        if size > 2 * BLOCK:
            f.seek(size - BLOCK)
            data += f.read(BLOCK)
    return hashlib.sha256(data).hexdigest()[:16]


def file_line(root: Path, rel: str) -> str:
    """One file's entry: relative path, size, head/tail hash (or ``missing``)."""
    path = root / rel
    try:
        size = path.stat().st_size
        return f"{rel}\0{size}\0{head_tail(path, size)}\n" if path.is_file() else f"{rel}\0unreadable\n"
    except OSError:
        return f"{rel}\0missing\n"


def files_fingerprint(root: Path, rels: Iterable[str]) -> str:
    """Fingerprint of files named relative to ``root`` (in the order given: sort them first)."""
    h = hashlib.sha256()
    for rel in rels:
        h.update(file_line(root, rel).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def archive_fingerprint(path: Path, members: Iterable[tuple[str, int]]) -> str:
    """An archive by its member listing (name, size) and its own head and tail blocks."""
    h = hashlib.sha256()
    for name, size in members:
        h.update(f"{name}\0{size}\n".encode("utf-8", "surrogateescape"))
    h.update(head_tail(path).encode())
    return h.hexdigest()
