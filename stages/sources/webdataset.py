"""Existing WebDataset tars (re-sharding): samples are grouped by key; ``.cls``/``.txt``/``.json`` come along.

A sample's ``uid`` and ``source`` in its ``.json`` (what our own shards write) are kept, so re-sharding keeps
every sample's identity; otherwise the uid derives from ``<tar path relative to the tars' folder>/<key>``.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa

from stages.sources.base import IMAGE_EXTS, REF_SCHEMA, SOURCES, Mapper, Scan, Source, SourceError, SourceParams
from stages.sources.columns import ColumnBuffer, iter_rows, make_uid
from stages.sources.fingerprints import archive_fingerprint
from stages.sources.tararchive import list_members

# keys our own shard writer puts in .json; re-sharding recomputes them (``extra`` is merged back)
OWN_KEYS = {"key", "uid", "sha256", "source_sha256", "width", "height", "label", "label_name", "caption", "split",
            "source", "ext", "original_width", "original_height", "original_bytes", "original_mode", "orientation",
            "normalised", "extra", "bytes", "offset"}


class WebDatasetParams(SourceParams):
    kind: Literal["webdataset"] = "webdataset"
    path: str  # a folder of .tar files, a glob, or a brace pattern like shards/{00000..00009}.tar
    split: str = "train"  # for samples whose .json names none


def expand(pattern: str) -> list[Path]:
    import braceexpand

    p = Path(pattern)
    if p.is_dir():
        return sorted(p.glob("*.tar"))
    out: list[Path] = []
    for part in braceexpand.braceexpand(pattern):
        out.extend(Path(x) for x in sorted(glob.glob(part)))
    return out


def scan_tar(args: tuple[str, str, str]) -> pa.Table:
    """Refs of one WebDataset tar (``REF_SCHEMA``); runs on a worker. The key is the name up to its first dot."""
    path, rel, default_split = args
    members = list_members(path)
    samples: dict[str, dict[str, Any]] = {}
    with open(path, "rb") as f:
        for name, offset, size in iter_rows(members, ["name", "offset", "size"]):
            base = name.rsplit("/", 1)[-1]
            if "." not in base or base.startswith("."):
                continue
            stem, ext = base.split(".", 1)
            s = samples.setdefault(name[: len(name) - len(base)] + stem, {})
            ext = ext.lower()
            if ext in IMAGE_EXTS and "image" not in s:
                s["image"] = (ext, offset, size)
            elif ext in ("cls", "txt", "json"):
                f.seek(offset)
                s[ext] = f.read(size).decode("utf-8", errors="replace")
    buf = ColumnBuffer(REF_SCHEMA)
    for key, s in samples.items():
        buf.add(*sample_ref(key, s, rel, default_split))
    return buf.table()


def sample_ref(key: str, s: dict[str, Any], rel: str, default_split: str) -> tuple[Any, ...]:
    """One ``REF_SCHEMA`` row from a sample's members (image locator, .cls, .txt, .json)."""
    meta = _json(s.get("json"))
    ident = f"{rel}/{key}"
    label = meta.get("label_name")
    if label is None and s.get("cls", "").strip().lstrip("-").isdigit():
        label = str(int(s["cls"].strip()))
    extra = {k: v for k, v in meta.items() if k not in OWN_KEYS}
    if isinstance(meta.get("extra"), dict):
        extra = {**meta["extra"], **extra}
    ext, offset, size = s.get("image", ("", -1, -1))
    caption = s.get("txt", meta.get("caption"))
    return (str(meta.get("uid") or make_uid(ident)), str(meta.get("source") or ident), ext,
            str(meta.get("split") or default_split), None if label is None else str(label),
            None if caption is None else str(caption),
            json.dumps(extra, sort_keys=True) if extra else None, rel if offset >= 0 else "", offset, size)


@SOURCES.register("webdataset")
class WebDatasetSource(Source):
    kind = "webdataset"
    Params = WebDatasetParams
    params: WebDatasetParams

    def _tars(self) -> list[Path]:
        return expand(self.params.path)

    def check(self) -> None:
        if not self._tars():
            raise SourceError(f"{self.params.path}: no WebDataset .tar files found")

    def root(self) -> Path:
        tars = self._tars()
        return Path(os.path.commonpath([str(t.parent) for t in tars])) if tars else Path(self.params.path)

    def _rels(self) -> list[tuple[Path, str]]:
        root = self.root()
        return [(t, t.relative_to(root).as_posix()) for t in self._tars()]

    def content_fingerprint(self) -> str:
        parts = []
        for tar, rel in self._rels():
            m = list_members(str(tar))
            parts.append(f"{rel}:{archive_fingerprint(tar, iter_rows(m, ['name', 'size']))}")
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    def scan(self, map: Mapper) -> Scan:
        tables = map(scan_tar, [(str(t), rel, self.params.split) for t, rel in self._rels()])
        refs = pa.concat_tables(tables) if tables else REF_SCHEMA.empty_table()
        if refs.num_rows == 0:
            raise SourceError(f"{self.params.path}: WebDataset tars contain no samples")
        return Scan(refs)


def _json(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        v = json.loads(text)
        return v if isinstance(v, dict) else {}
    except ValueError:
        return {}
