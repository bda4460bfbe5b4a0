"""Existing WebDataset tars (re-sharding): samples are grouped by key; ``.cls``/``.txt``/``.json`` come along."""
from __future__ import annotations

import glob
import json
from pathlib import Path
from typing import Any, Literal

from stages.sources.base import (
    IMAGE_EXTS, SOURCES, Mapper, OffsetReader, Reader, SampleRef, Source, SourceError, SourceParams,
    stat_fingerprint,
)
from stages.sources.tararchive import list_members


class WebDatasetParams(SourceParams):
    kind: Literal["webdataset"] = "webdataset"
    path: str  # a folder of .tar files, a glob, or a brace pattern like shards/{00000..00009}.tar
    split: str = "train"


def expand(pattern: str) -> list[Path]:
    import braceexpand

    p = Path(pattern)
    if p.is_dir():
        return sorted(p.glob("*.tar"))
    out: list[Path] = []
    for part in braceexpand.braceexpand(pattern):
        out.extend(Path(x) for x in sorted(glob.glob(part)))
    return out


def scan_tar(path: str) -> list[dict[str, Any]]:
    """One record per sample key of a WebDataset tar (the key is the name up to its first dot)."""
    samples: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    with open(path, "rb") as f:
        for name, offset, size in list_members(path):
            base = name.rsplit("/", 1)[-1]
            if "." not in base:
                continue
            key, ext = name[: len(name) - len(base)] + base.split(".", 1)[0], base.split(".", 1)[1].lower()
            if key not in samples:
                samples[key] = {"key": key}
                order.append(key)
            s = samples[key]
            if ext in IMAGE_EXTS and "image" not in s:
                s["image"] = (ext, offset, size)
            elif ext in ("cls", "txt", "json"):
                f.seek(offset)
                s[ext] = f.read(size).decode("utf-8", errors="replace")
    return [samples[k] for k in order]


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

    def fingerprint(self) -> str:
        return stat_fingerprint(self._tars())

    def scan(self, map: Mapper) -> list[SampleRef]:
        tars = [str(t) for t in self._tars()]
        refs = []
        for tar, samples in zip(tars, map(scan_tar, tars)):
            for s in samples:
                meta = _json(s.get("json"))
                label: int | str | None = None
                if s.get("cls", "").strip().lstrip("-").isdigit():
                    label = int(s["cls"].strip())
                name = meta.get("label_name")
                ext, offset, size = s.get("image", ("jpg", 0, -1))
                refs.append(SampleRef(
                    ident=f"{Path(tar).name}/{s['key']}", ext=ext, locator=(tar, offset, size),
                    split=meta.get("split", self.params.split), label=name if name is not None else label,
                    caption=s.get("txt"), size=size,
                    extra={k: v for k, v in meta.items() if k not in _OWN_KEYS} or None,
                ))
        if not refs:
            raise SourceError(f"{self.params.path}: WebDataset tars contain no samples")
        return refs

    def open_reader(self) -> Reader:
        return MissingAwareOffsetReader()


# keys our own shard writer puts in .json; re-sharding recomputes them
_OWN_KEYS = {"key", "uid", "sha256", "width", "height", "label", "label_name", "caption", "split", "source",
             "original_width", "original_height", "original_bytes", "original_sha256", "extra"}


class MissingAwareOffsetReader(OffsetReader):
    def read(self, ref: SampleRef) -> bytes:
        if ref.locator[2] < 0:
            raise FileNotFoundError(f"{ref.locator[0]}: sample {ref.ident} has no image member")
        return super().read(ref)


def _json(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    try:
        v = json.loads(text)
        return v if isinstance(v, dict) else {}
    except ValueError:
        return {}
