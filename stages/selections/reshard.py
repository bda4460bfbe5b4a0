"""Applying a selection: the pool's chosen rows written into new WebDataset shards (DataComp's resharder, as small
generators over the rows of one output shard):

    rows -> read (pool tar at the row's offset) -> verify (sha256 of the stored bytes) -> write (new tar)

A sample keeps its ``uid`` and its ``key`` (so it still joins every table about the pool: embeddings, clusters,
selections), its image bytes, label, caption and JSON metadata; only ``shard`` and ``offset`` are new. A row that
cannot be read back intact becomes a reject row with its reason, never a failed task.

**Extra members.** ``MEMBER_HOOKS`` maps an artifact kind to a factory ``(artifact path) -> hook``; a hook maps
an index row to extra members ``{"soft.npy": bytes, ...}`` written after the sample's own. A hook may set the
row's ``label`` (the ``.cls`` member and the new index row then carry it) and may raise ``Rejected(reason)`` to
leave the sample out as a reject with that reason. ``stages.labeling.export_members`` registers the ``labels``
hook (soft / multi labels as ``{key}.soft.npy`` and ``{key}.labels.json``); export binds it as its ``labels``
input.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator

from pipeline.registry import Registry
from stages.imaging.tar_writer import TarShardWriter
from stages.sharding.samples import meta_json

MemberHook = Callable[[dict[str, Any]], dict[str, bytes]]
MEMBER_HOOKS: Registry[Callable[[Path], MemberHook]] = Registry("export member hook",
                                                                entry_point_group="distillery.export_members")
OWN_MEMBERS = ("jpg", "png", "webp", "cls", "txt", "json")


class Rejected(Exception):
    """Raised by a member hook: the sample is left out, a reject with this reason."""


@dataclass(slots=True)
class Item:
    row: dict[str, Any]  # the pool's index row (SHARD_SCHEMA)
    data: bytes | None = None
    out: dict[str, Any] | None = None  # the new index row once written
    reject: str | None = None


class PoolReader:
    """Reads stored image bytes from a pool's tars by offset, keeping one handle per tar open."""

    def __init__(self, pool: Path) -> None:
        self.pool = pool
        self._files: dict[tuple[str, int], BinaryIO] = {}

    def read(self, split: str, shard: int, offset: int, size: int) -> bytes:
        f = self._files.get((split, shard))
        if f is None:
            f = self._files[(split, shard)] = open(self.pool / "shards" / split / f"{shard:05d}.tar", "rb")
        f.seek(offset)
        return f.read(size)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "PoolReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def read(items: Iterable[Item], reader: PoolReader) -> Iterator[Item]:
    for it in items:
        r = it.row
        try:
            it.data = reader.read(r["split"], r["shard"], r["offset"], r["bytes"])
            if len(it.data) != r["bytes"]:
                it.reject = f"truncated image: {len(it.data)} of {r['bytes']} bytes in the pool's tar"
        except OSError as e:
            it.reject = f"unreadable: {e}"
        yield it


def verify(items: Iterable[Item]) -> Iterator[Item]:
    """The bytes are the ones the pool stored (a changed or damaged tar is caught, never copied)."""
    for it in items:
        want = it.row.get("sha256")
        if it.reject is None and want and hashlib.sha256(it.data or b"").hexdigest() != want:
            it.reject = "corrupt: sha256 differs from the pool's index"
        yield it


class Writer:
    """Writes each sample as ``{key}.{ext}`` (+ ``.cls``, ``.txt``, ``.json``, + hook members) into one new tar."""

    def __init__(self, tar: TarShardWriter, shard: int, hooks: list[MemberHook] = ()) -> None:  # type: ignore[assignment]
        self.tar, self.shard, self.hooks = tar, shard, list(hooks)

    def __call__(self, items: Iterable[Item]) -> Iterator[Item]:
        for it in items:
            if it.reject is None:
                try:
                    self.write(it)
                except Rejected as e:
                    it.reject = str(e)
                except Exception as e:  # noqa: BLE001 - one bad sample never fails the task
                    it.reject = f"write failed: {type(e).__name__}: {e}"
            yield it

    def write(self, it: Item) -> None:
        r = dict(it.row)
        r["shard"] = self.shard
        extra: dict[str, bytes] = {}
        for hook in self.hooks:  # first: a hook may set the label the sample's own members carry
            for ext, data in hook(r).items():
                if ext in extra or ext in OWN_MEMBERS or ext == r["ext"]:
                    raise ValueError(f"member hook wrote '{ext}', which the sample already has")
                extra[ext] = data
        members: dict[str, bytes] = {r["ext"]: it.data or b""}
        if r["label"] is not None:
            members["cls"] = str(r["label"]).encode()
        if r["caption"] is not None:
            members["txt"] = r["caption"].encode("utf-8")
        members["json"] = meta_json(r).encode("utf-8")
        members.update(extra)
        r["offset"] = self.tar.write_sample(r["key"], members)
        it.out = r


def reject_row(it: Item, shard: int) -> dict[str, Any]:
    r = it.row
    return {"source": r.get("source"), "file": f"shards/{r['split']}/{r['shard']:05d}.tar", "uid": r["uid"],
            "split": r["split"], "shard": shard, "reason": it.reject, "sha256": r.get("sha256"),
            "duplicate_of": None, "duplicate_of_source": None}
