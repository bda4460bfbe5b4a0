"""The embeddings artifact, in the layout clip-retrieval and NeMo Curator users already read with their own code.

    img_emb/img_emb_{N}.npy        float16 [n, d], L2-normalised rows
    text_emb/text_emb_{N}.npy      float16 [n, d] caption embeddings (open_clip embedders, when captions exist)
    metadata/metadata_{N}.parquet  key, uid, split, shard, label: row i describes row i of the .npy files
    parquet/part_{N}.parquet       key, uid, embedding (list<float32>): the NeMo Curator view

``N`` is the part number, one per input shard (the shard's number), unpadded as clip-retrieval writes it; the
manifest's ``metrics["parts"]`` lists them in order. Readers here always return float32.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import InputError

META_SCHEMA = pa.schema([("key", pa.string()), ("uid", pa.string()), ("split", pa.string()),
                         ("shard", pa.int32()), ("label", pa.int32())])
NEMO_SCHEMA = pa.schema([("key", pa.string()), ("uid", pa.string()), ("embedding", pa.list_(pa.float32()))])


class Outputs(Protocol):  # pipeline.stage.TaskContext
    def output(self, relpath: str) -> Path: ...


def part_files(n: int) -> dict[str, str]:
    return {"img": f"img_emb/img_emb_{n}.npy", "text": f"text_emb/text_emb_{n}.npy",
            "meta": f"metadata/metadata_{n}.parquet", "nemo": f"parquet/part_{n}.parquet"}


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def write_part(ctx: Outputs, n: int, img: np.ndarray, meta: pa.Table, text: np.ndarray | None = None) -> dict[str, Any]:
    """Write one part (normalising the rows, storing float16); returns its summary for the task's info."""
    if len(img) != meta.num_rows or (text is not None and len(text) != meta.num_rows):
        raise ValueError(f"part {n}: {len(img)} image rows, {meta.num_rows} metadata rows"
                         + ("" if text is None else f", {len(text)} text rows"))
    files = part_files(n)
    img16 = l2_normalise(img).astype(np.float16)
    with open(ctx.output(files["img"]), "wb") as f:
        np.save(f, img16, allow_pickle=False)
    if text is not None:
        with open(ctx.output(files["text"]), "wb") as f:
            np.save(f, l2_normalise(text).astype(np.float16), allow_pickle=False)
    meta = meta.select(META_SCHEMA.names).cast(META_SCHEMA)
    pq.write_table(meta, ctx.output(files["meta"]))
    emb = pa.FixedSizeListArray.from_arrays(pa.array(img16.astype(np.float32).ravel()), img16.shape[1]) \
        if len(img16) else pa.array([], pa.list_(pa.float32()))
    nemo = pa.table({"key": meta["key"], "uid": meta["uid"], "embedding": emb.cast(pa.list_(pa.float32()))},
                    schema=NEMO_SCHEMA)
    pq.write_table(nemo, ctx.output(files["nemo"]))
    splits = pc.value_counts(meta["split"]).to_pylist() if meta.num_rows else []
    return {"part": n, "rows": meta.num_rows, "dim": int(img16.shape[1]) if img16.ndim == 2 else 0,
            "text": text is not None, "splits": {s["values"]: s["counts"] for s in splits}}


def parts(artifact: Path) -> list[int]:
    """Part numbers of an embeddings artifact, in order (from its manifest, else from the files)."""
    manifest = artifact / "manifest.json"
    if manifest.is_file():
        listed = json.loads(manifest.read_text()).get("metrics", {}).get("parts")
        if listed is not None:
            return [int(p) for p in listed]
    found = sorted(int(p.stem.rsplit("_", 1)[1]) for p in (artifact / "img_emb").glob("img_emb_*.npy"))
    if not found:
        raise InputError(f"{artifact}: no img_emb/img_emb_*.npy (not an embeddings artifact)")
    return found


def read_part(artifact: Path, n: int, text: bool = False) -> tuple[np.ndarray, pa.Table]:
    files = part_files(n)
    path = artifact / (files["text"] if text else files["img"])
    if not path.is_file():
        raise InputError(f"{path}: missing ({'no caption embeddings in this artifact' if text else 'incomplete artifact'})")
    return np.load(path, allow_pickle=False).astype(np.float32), pq.read_table(artifact / files["meta"])


def iter_parts(artifact: Path, text: bool = False) -> Iterator[tuple[int, np.ndarray, pa.Table]]:
    for n in parts(artifact):
        vec, meta = read_part(artifact, n, text)
        yield n, vec, meta


@dataclass
class Embeddings:
    """Rows of an embeddings artifact in memory: float32 unit vectors and their metadata, row-aligned."""

    vectors: np.ndarray
    meta: pa.Table

    def __len__(self) -> int:
        return len(self.vectors)

    @property
    def uids(self) -> list[str]:
        return self.meta.column("uid").to_pylist()

    def take(self, idx: np.ndarray) -> "Embeddings":
        idx = np.asarray(idx, dtype=np.int64)
        return Embeddings(self.vectors[idx], self.meta.take(pa.array(idx)))


def load_embeddings(artifact: Path, split: str | None = "train", text: bool = False) -> Embeddings:
    """Every row of ``split`` (all splits when None) in part order; for sets that fit in memory."""
    vecs, metas = [], []
    for _, vec, meta in iter_parts(artifact, text):
        if split is not None:
            mask = pc.equal(meta["split"], split).to_numpy(zero_copy_only=False)
            vec, meta = vec[mask], meta.filter(pa.array(mask))
        vecs.append(vec)
        metas.append(meta)
    if not vecs or sum(len(v) for v in vecs) == 0:
        raise InputError(f"{artifact}: no embeddings for split {split!r}")
    return Embeddings(np.concatenate(vecs), pa.concat_tables(metas))
