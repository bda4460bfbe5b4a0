"""Inputs for the curation stages' tests: embeddings artifacts with known vectors (pixels, planted geometry) written
in the shared format (``write_part``) with a manifest, where a test needs vectors it controls rather than an
embedder's; and CIFAR-10 images with planted near-copies."""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.artifacts import ArtifactManifest, code_version, now_iso
from stages.embedders.store import write_part
from stages.sharding.pool import pool_record


class Ctx:
    """What ``write_part`` needs of a task context: ``output`` writing straight into place."""

    def __init__(self, root: Path):
        self.root = root

    def output(self, rel: str) -> Path:
        p = self.root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


def shard_tables(shards: Path) -> list[pa.Table]:
    """Every shard's parquet of a shards artifact, in shard-number order (one embeddings part each)."""
    files = [p for p in (shards / "shards").rglob("*.parquet") if not p.stem.endswith("_rejects")]
    return [pq.read_table(p) for p in sorted(files, key=lambda p: int(p.stem))]


def write_embeddings(out: Path, parts: Iterable[tuple[int, np.ndarray, pa.Table]], pool: Path) -> Path:
    """An embeddings artifact (parts ``(N, vectors, metadata)``) with a manifest naming its pool; its id is a hash
    of its content, so equal inputs give equal ids (and downstream caching behaves as with a real stage)."""
    digest = hashlib.sha256()
    numbers = []
    for n, vec, meta in parts:
        write_part(Ctx(out), n, vec, meta)
        digest.update((out / f"img_emb/img_emb_{n}.npy").read_bytes())
        numbers.append(n)
    rows = sum(pq.read_metadata(out / f"metadata/metadata_{n}.parquet").num_rows for n in numbers)
    m = ArtifactManifest(artifact_id=digest.hexdigest(), stage="test-embeddings", kind="embeddings", name="embed",
                         stage_version="1", params={}, code_version=code_version(), created=now_iso(),
                         counts={"in": rows, "out": rows, "rejected": 0},
                         metrics={"parts": numbers, "pool": pool_record(pool)})
    (out / "manifest.json").write_text(m.model_dump_json(indent=2))
    return out


def embed_shards(out: Path, shards: Path, features: Callable[[np.ndarray, pa.Table], np.ndarray]) -> Path:
    """One part per shard: ``features(uint8 NHWC images, rows)`` of its decoded images."""
    from stages.train.image_data import decode_rows

    def parts():
        for t in shard_tables(shards):
            rows = t.select(["split", "shard", "offset", "bytes", "key"]).to_pylist()
            images = decode_rows(shards, rows[0]["split"], rows, None)
            yield int(t["shard"][0].as_py()), features(images, t), t

    return write_embeddings(out, parts(), shards)


def _jpeg(img, quality: int) -> bytes:
    import io

    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def near_copies(data: bytes) -> dict[str, bytes]:
    """Three near-duplicates of one JPEG: re-encoded at quality 40, slightly cropped (29x29 of 32x32, shifted,
    resized back) and colour-shifted (saturation x1.3, brightness x1.1)."""
    import io

    from PIL import Image, ImageEnhance

    img = Image.open(io.BytesIO(data)).convert("RGB")
    w, h = img.size
    cropped = img.crop((2, 1, w - 1, h - 2)).resize((w, h), Image.BICUBIC)
    shifted = ImageEnhance.Brightness(ImageEnhance.Color(img).enhance(1.3)).enhance(1.1)
    return {"q40": _jpeg(img, 40), "crop": _jpeg(cropped, 90), "colour": _jpeg(shifted, 90)}


def plant_near_duplicates(tar: Path, root: Path, per_class: int | None, originals: int, seed: int = 0) -> dict[str, str]:
    """``root/train/<class>/*.jpg``: the first ``per_class`` training images of each class of the CIFAR-10 archive
    (all when None) plus ``near_copies`` of ``originals`` of them, chosen with ``seed``. Returns the source path
    (relative to ``root``, as the shard index records it) -> group (the original's path) of every planted file."""
    import tarfile

    kept: list[tuple[str, bytes]] = []
    counts: dict[str, int] = {}
    with tarfile.open(tar) as tf:
        for m in tf:
            parts = m.name.split("/")
            if not m.isfile() or parts[0] != "train" or len(parts) != 3:
                continue
            if per_class is not None and counts.get(parts[1], 0) >= per_class:
                continue
            counts[parts[1]] = counts.get(parts[1], 0) + 1
            kept.append((m.name, tf.extractfile(m).read()))  # type: ignore[union-attr]
    groups: dict[str, str] = {}
    chosen = set(np.random.default_rng(seed).choice(len(kept), originals, replace=False).tolist())
    for i, (name, data) in enumerate(kept):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
        if i in chosen:
            groups[name] = name
            for tag, copy in near_copies(data).items():
                copy_name = name[:-len(".jpg")] + f"_{tag}.jpg"
                (root / copy_name).write_bytes(copy)
                groups[copy_name] = name
    return groups
