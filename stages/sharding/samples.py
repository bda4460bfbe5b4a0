"""What one shard task does to each sample, as a chain of small generators (webdataset style):

    refs -> skip_duplicates -> read -> verify -> write -> measure

Each step takes and yields ``Sample``s and is testable on a plain list. A step never raises for a sample: any
exception becomes that sample's reject reason and later steps pass it through, so ``in == out + rejected``.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from stages.imaging.decode import decode
from stages.imaging.tar_writer import TarShardWriter
from stages.imaging.verify import Decoded, ImageError, ImageOptions, process
from stages.sources.base import Reader


@dataclass(slots=True)
class Sample:
    ref: dict[str, Any]  # one row of the plan's refs chunk
    data: bytes | None = None  # the source bytes
    source_sha256: str | None = None
    image: Decoded | None = None
    row: dict[str, Any] | None = None  # the index row, once written
    reject: str | None = None


def each(samples: Iterable[Sample], fn: Callable[[Sample], None], failure: str) -> Iterator[Sample]:
    """Apply ``fn`` to every sample not yet rejected; an exception rejects that sample with its reason."""
    for s in samples:
        if s.reject is None:
            try:
                fn(s)
            except ImageError as e:
                s.reject = str(e)
            except MemoryError:
                s.reject = "image too large: out of memory"
            except Exception as e:  # noqa: BLE001 - one bad sample never fails the stage
                s.reject = f"{failure}: {type(e).__name__}: {e}"
        yield s


def skip_duplicates(samples: Iterable[Sample]) -> Iterator[Sample]:
    """Reject the samples the plan found to be exact copies of a kept one."""
    def check(s: Sample) -> None:
        if s.ref.get("dup_of_uid"):
            s.source_sha256 = s.ref["source_sha256"]
            s.reject = "duplicate"

    return each(samples, check, "duplicate check failed")


def read(samples: Iterable[Sample], reader: Reader) -> Iterator[Sample]:
    def one(s: Sample) -> None:
        r = s.ref
        try:
            s.data = reader.read(r["file"], r["offset"], r["size"])
        except FileNotFoundError:
            s.reject = f"missing file: {r['file'] or r['source']}"
            return
        except OSError as e:
            s.reject = f"unreadable: {e}"
            return
        s.source_sha256 = hashlib.sha256(s.data).hexdigest()

    return each(samples, one, "unreadable")


def verify(samples: Iterable[Sample], opts: ImageOptions) -> Iterator[Sample]:
    def one(s: Sample) -> None:
        s.image = process(s.data or b"", opts)

    return each(samples, one, "undecodable image")


class ShardWriter:
    """Writes accepted samples as ``{key}.{ext}`` (+ ``.cls``, ``.txt``, ``.json``) and makes their index rows."""

    def __init__(self, tar: TarShardWriter, shard: int, split: str, key_digits: int) -> None:
        self.tar, self.shard, self.split = tar, shard, split
        self.prefix, self.kd = f"{shard:05d}", key_digits
        self.written = 0

    def __call__(self, samples: Iterable[Sample]) -> Iterator[Sample]:
        return each(samples, self.write, "write failed")

    def write(self, s: Sample) -> None:
        r, img = s.ref, s.image
        if img is None:
            raise ImageError("undecodable image: nothing decoded")
        key = f"{self.prefix}{self.written:0{self.kd}d}"
        sha = s.source_sha256 if img.data is s.data else hashlib.sha256(img.data).hexdigest()
        label = r["label_id"]
        row = {
            "key": key, "uid": r["uid"], "split": self.split, "shard": self.shard, "label": label,
            "label_name": r["label"] if label is not None else None, "caption": r["caption"],
            "width": img.width, "height": img.height, "bytes": len(img.data), "sha256": sha,
            "source_sha256": s.source_sha256, "ext": img.ext, "source": r["source"],
            "original_width": img.original_width, "original_height": img.original_height,
            "original_bytes": len(s.data or b""), "original_mode": img.original_mode,
            "orientation": img.orientation, "normalised": img.normalised, "extra": r["extra"],
        }
        members = {img.ext: img.data}
        if label is not None:
            members["cls"] = str(label).encode()
        if r["caption"] is not None:
            members["txt"] = r["caption"].encode("utf-8")
        members["json"] = meta_json(row).encode("utf-8")
        row["offset"] = self.tar.write_sample(key, members)
        self.written += 1
        s.row = row


_q = json.encoder.encode_basestring_ascii  # type: ignore[attr-defined]  # the C string escaper json.dumps uses


def meta_json(row: dict[str, Any]) -> str:
    """The ``{key}.json`` member: the sample's identity, label and size (the rest is in the index) and its extra
    metadata; what re-sharding reads back. Exactly ``json.dumps`` of those fields, built from a template (a
    third of the cost, per sample)."""
    parts = [f'"key": "{row["key"]}", "uid": {_q(row["uid"])}, "source": {_q(row["source"])}, '
             f'"split": {_q(row["split"])}']
    if row["label"] is not None:
        parts.append(f'"label": {int(row["label"])}, "label_name": {_q(row["label_name"])}')
    if row["caption"] is not None:
        parts.append(f'"caption": {_q(row["caption"])}')
    parts.append(f'"width": {int(row["width"])}, "height": {int(row["height"])}, "sha256": "{row["sha256"]}"')
    if row["normalised"] is not None:
        parts.append(f'"normalised": {_q(row["normalised"])}')
    if row["extra"]:
        parts.append(f'"extra": {row["extra"]}')  # already a JSON object (sources write it with json.dumps)
    return "{" + ", ".join(parts) + "}"


class ChannelStats:
    """Per-channel histograms of 8-bit values (exact): means and variances over pixels follow from them.

    Images are binned in batches (one ``bincount`` per ~1M pixels), not one numpy call per image.
    """

    BATCH_PIXELS = 1 << 20

    def __init__(self) -> None:
        self.images = 0
        self.skipped = 0  # picked but not decodable by the shared decode (should stay 0)
        self.hist = np.zeros(3 * 256, dtype=np.int64)
        self._pending: list[np.ndarray] = []
        self._pending_pixels = 0

    def add(self, rgb: np.ndarray) -> None:
        self.images += 1
        self._pending.append(rgb.reshape(-1, 3))
        self._pending_pixels += self._pending[-1].shape[0]
        if self._pending_pixels >= self.BATCH_PIXELS:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            flat = np.concatenate(self._pending)
            for c in range(3):
                self.hist[256 * c:256 * (c + 1)] += np.bincount(flat[:, c], minlength=256)
            self._pending, self._pending_pixels = [], 0

    def result(self) -> dict[str, Any]:
        """Exact integer sums: ``{"images", "skipped", "pixels", "sum": [r, g, b], "sumsq": [r, g, b]}``."""
        self._flush()
        h = self.hist.reshape(3, 256)
        v = np.arange(256, dtype=np.int64)
        return {"images": self.images, "skipped": self.skipped, "pixels": int(h[0].sum()),
                "sum": [int(x) for x in h @ v], "sumsq": [int(x) for x in h @ (v * v)]}


def measure(samples: Iterable[Sample], stats: ChannelStats) -> Iterator[Sample]:
    """Add the stored image of every written sample the plan picked for the statistics (the shared decode)."""
    def one(s: Sample) -> None:
        if s.ref.get("stats") and s.row is not None and s.image is not None:
            stats.add(decode(s.image.data, None))

    for s in samples:  # a failure here is not the sample's fault: it is written already, and counted
        if s.reject is None:
            try:
                one(s)
            except Exception:  # noqa: BLE001
                stats.skipped += 1
        yield s
