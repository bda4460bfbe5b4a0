"""The embed stage: a shards artifact -> an embeddings artifact (clip-retrieval layout + NeMo Curator view).

One task per shard (all splits unless ``splits`` names some). The embedder (``stages.embedders``: model and its
preprocessing together) loads once per worker; DataLoader workers read and decode the shard's images by tar
offset while the model runs (a background thread where the process cannot fork); bf16 autocast by default.
Part ``N`` is shard ``N``: ``img_emb/img_emb_{N}.npy`` rows align with ``metadata/metadata_{N}.parquet`` and
with the shard's own rows in order, minus rejects (images that fail to decode; ``rejects.parquet`` says why).
Captions, when the shards have them and the embedder has a text tower, go to ``text_emb/text_emb_{N}.npy``
(a zero row for an image without a caption).

Identity: the embedder's identity (member, architecture, tag; a local file by its sha256, never its path), the
precision (bf16 and fp32 give different numbers) and the shards. ``batch_size``, ``loader_workers`` and ``device``
are execution-only: they change speed, and at most the last bits of a row (kernel choice), never its meaning.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pydantic import field_validator

from pipeline.artifacts import PartRecord
from pipeline.atomic import atomic_path
from pipeline.errors import InputError
from pipeline.stage import (
    STAGES, FinalizeContext, InputArtifact, PlanContext, Stage, StageParams, Summary, Task, TaskContext,
    execution_only,
)
from stages.embedders import Embedder, EmbedderError, create_embedder, resolve_embedder
from stages.embedders.batches import ShardImages, shard_batches
from stages.embedders.checkpoint import Checkpoint
from stages.embedders.store import META_SCHEMA, part_files, write_part
from stages.sharding.pool import pool_record
from stages.train.stage_support import device

REJECT_SCHEMA = pa.schema([("key", pa.string()), ("uid", pa.string()), ("split", pa.string()),
                           ("shard", pa.int32()), ("reason", pa.string())])
SAME_MODEL = ("member", "architecture", "weights_sha256", "dim", "image_size", "mean", "std", "preprocess")
ROW_COLUMNS = ["key", "uid", "split", "shard", "label", "offset", "bytes", "caption"]


class EmbedParams(StageParams):
    # Where the weights live is execution-only: ``EmbedStage.identity`` carries what they are (member, architecture,
    # tag) and ``fingerprint`` the content of local files, so moving a checkpoint re-runs nothing and editing one
    # re-runs the stage. Presets (bare names) resolve to their spec.
    embedder: str = execution_only(..., description="open_clip:<arch>[:<tag|file>] | timm:<model>[:pretrained|:<file>] "
                                                    "| checkpoint:[<teacher artifact>][#fold] | <preset>")
    splits: list[str] | None = None  # None: every split of the shards
    text: bool | None = None  # caption embeddings; None: when the shards have captions and the embedder a text tower
    precision: Literal["bf16", "fp32"] = "bf16"  # autocast dtype for matmuls/convolutions (changes the numbers)
    batch_size: int = execution_only(256)
    loader_workers: int = execution_only(8)  # decode processes per task, at most one per CPU (0: a thread)
    device: str = execution_only("auto")

    @field_validator("embedder")
    @classmethod
    def _spec(cls, v: str) -> str:
        """Parse now (unknown prefixes fail at manifest load) and make local paths absolute for the workers."""
        member = resolve_embedder(v)
        return v if member.spec.preset else member.normalised_text()

    @field_validator("batch_size")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v


def full_spec(spec: str, inputs: dict[str, InputArtifact]) -> str:
    """The spec to load: ``checkpoint:`` without a path takes the bound ``teacher`` input; a bound teacher is
    used by that form only (never silently ignored)."""
    member = resolve_embedder(spec)
    bound = isinstance(member, Checkpoint) and member.bound
    teacher = inputs.get("teacher")
    if bound and teacher is None:
        raise InputError(f"embedder '{spec}': no teacher artifact: give its path, or bind the embed stage's "
                         "'teacher' input (inputs: {shards: ..., teacher: ...})")
    if teacher is not None and not bound:
        raise InputError(f"embedder '{spec}': a 'teacher' input is bound, which only 'checkpoint:' (without a "
                         "path) uses")
    return member.with_artifact(str(teacher.path)) if bound else spec  # type: ignore[union-attr]


def load_embedder(spec: str, dev: torch.device) -> Embedder:
    return create_embedder(spec).to(dev)


@STAGES.register()
class EmbedStage(Stage[EmbedParams]):
    name = "embed"
    version = "1"
    Params = EmbedParams
    input_kinds = {"shards": ("shards",), "teacher": ("model",)}  # teacher: for 'checkpoint:' without a path
    output_kind = "embeddings"
    resources = {"GPU": 1}

    def validate(self, params: EmbedParams) -> None:
        member = resolve_embedder(params.embedder)
        member.check()
        if params.text and not member.has_text:
            raise EmbedderError(f"embedder '{params.embedder}': text: true, but {member.spec.member} embedders have "
                                "no text tower")

    def identity(self, params: EmbedParams) -> dict[str, Any]:
        return {"embedder": resolve_embedder(params.embedder).identity()}

    def fingerprint(self, params: EmbedParams) -> str:
        return resolve_embedder(params.embedder).fingerprint()

    # -- driver --------------------------------------------------------------------------------------
    def plan(self, inputs: dict[str, InputArtifact], params: EmbedParams, ctx: PlanContext) -> list[Task]:
        full_spec(params.embedder, inputs)  # a bound teacher input and the spec agree
        shards = inputs["shards"].path
        index = pq.read_table(shards / "index.parquet", columns=["split", "shard", "caption"])
        have = list(dict.fromkeys(index["split"].to_pylist()))
        wanted = params.splits or have
        missing = [s for s in wanted if s not in have]
        if missing:
            raise InputError(f"{shards}: no split(s) {', '.join(missing)} (have: {', '.join(have) or 'none'})")
        index = index.filter(pc.is_in(index["split"], value_set=pa.array(wanted)))
        captioned = int(pc.sum(pc.invert(pc.is_null(index["caption"]))).as_py() or 0)
        has_text = resolve_embedder(params.embedder).has_text
        text = params.text if params.text is not None else bool(captioned and has_text)
        if text and not captioned:
            raise InputError(f"{shards}: text: true, but no sample in split(s) {', '.join(wanted)} has a caption")
        tasks = []
        for row in index.group_by(["shard", "split"]).aggregate([("shard", "count")]).sort_by("shard").to_pylist():
            shard, split, n = int(row["shard"]), row["split"], int(row["shard_count"])
            tasks.append(Task(id=f"{shard:05d}", size=n, payload={"shard": shard, "split": split, "rows": n,
                                                                   "text": text}))
        return tasks

    # -- worker --------------------------------------------------------------------------------------
    def run(self, task: Task, params: EmbedParams, ctx: TaskContext) -> dict[str, Any]:
        p = task.payload
        shard, split = p["shard"], p["split"]
        stem = ctx.inputs["shards"].path / "shards" / split / f"{shard:05d}"
        rows = pq.read_table(f"{stem}.parquet", columns=ROW_COLUMNS)
        dev = device(params.device)
        spec = full_spec(params.embedder, ctx.inputs)
        emb = ctx.cached(f"embedder|{spec}|{dev}", lambda: load_embedder(spec, dev))
        t0 = time.perf_counter()
        vectors, ok, rejects = self._images(emb, rows, f"{stem}.tar", params, dev, ctx)
        seconds = time.perf_counter() - t0
        kept = rows.filter(pa.array(ok))
        text = None
        if p["text"]:
            text = self._captions(emb, kept["caption"].to_pylist(), params)
        meta = kept.select(META_SCHEMA.names)
        info = write_part(ctx, shard, vectors[ok], meta, text)
        bad = rows.filter(pa.array(~ok))
        reasons = dict(rejects)
        table = pa.table({"key": bad["key"], "uid": bad["uid"], "split": bad["split"], "shard": bad["shard"],
                          "reason": pa.array([reasons[i] for i in np.flatnonzero(~ok)], pa.string())},
                         schema=REJECT_SCHEMA)
        pq.write_table(table, ctx.output(f"rejects/rejects_{shard}.parquet"))
        counts = Counter(r.split(":")[0] for r in reasons.values())
        return {**info, "shard": shard, "split": split, "in": rows.num_rows, "out": int(ok.sum()),
                "rejected": len(reasons), "reasons": dict(sorted(counts.items())), "embedder": emb.info,
                "device": str(dev), "embed_seconds": round(seconds, 4),
                "images_per_sec": round(rows.num_rows / seconds, 1) if seconds > 0 else None}

    @staticmethod
    def _images(emb: Embedder, rows: pa.Table, tar: str, params: EmbedParams, dev: torch.device,
                ctx: TaskContext) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
        n = rows.num_rows
        ds = ShardImages(tar, rows["offset"].to_numpy(), rows["bytes"].to_numpy(), emb.pixels, params.batch_size)
        vectors = np.zeros((n, emb.dim), dtype=np.float32)
        ok = np.zeros(n, dtype=bool)
        rejects: list[tuple[int, str]] = []
        pending: list[tuple[np.ndarray, torch.Tensor]] = []  # features stay on the device until the shard is done
        done, t0 = 0, time.perf_counter()
        for batch in shard_batches(ds, params.loader_workers, pin_memory=dev.type == "cuda"):
            rejects += batch.rejects
            if batch.pixels is not None:
                pending.append((batch.rows, emb.features(batch.pixels, params.precision)))
                ok[batch.rows] = True
            done += len(batch.rows) + len(batch.rejects)
            ctx.progress(done, n, images_per_sec=round(done / max(time.perf_counter() - t0, 1e-9), 1))
        if pending:
            rows_done = np.concatenate([r for r, _ in pending])
            vectors[rows_done] = torch.cat([f for _, f in pending]).cpu().numpy()
        return vectors, ok, rejects

    @staticmethod
    def _captions(emb: Embedder, captions: list[str | None], params: EmbedParams) -> np.ndarray:
        """Caption embeddings row-aligned with the kept images; a zero row where an image has no caption."""
        out = np.zeros((len(captions), emb.dim), dtype=np.float32)
        have = [i for i, c in enumerate(captions) if c is not None]
        if have:
            out[have] = emb.embed_texts([captions[i] for i in have], params.precision, params.batch_size)
        return out

    # -- driver --------------------------------------------------------------------------------------
    def finalize(self, parts: list[PartRecord], params: EmbedParams, ctx: FinalizeContext) -> Summary:
        infos = sorted((p.info for p in parts), key=lambda i: i["part"])
        check_same_model(infos, params.embedder)
        embedder = infos[0]["embedder"] if infos else {}
        with atomic_path(ctx.path("rejects.parquet")) as tmp:
            tables = [pq.read_table(ctx.out_dir / f"rejects/rejects_{i['part']}.parquet") for i in infos]
            pq.write_table(pa.concat_tables(tables) if tables else REJECT_SCHEMA.empty_table(), tmp)
        splits: dict[str, dict[str, int]] = {}
        reasons: Counter[str] = Counter()
        for i in infos:
            s = splits.setdefault(i["split"], {"in": 0, "out": 0, "rejected": 0, "parts": 0})
            for k in ("in", "out", "rejected"):
                s[k] += i[k]
            s["parts"] += 1
            reasons.update(i["reasons"])
        n_in, n_out = sum(i["in"] for i in infos), sum(i["out"] for i in infos)
        seconds = sum(i["embed_seconds"] for i in infos)
        text = any(i["text"] for i in infos)
        pool = pool_record(ctx.inputs["shards"].path)
        counts = {"in": n_in, "out": n_out, "rejected": n_in - n_out, "rejected_by_reason": dict(sorted(reasons.items())),
                  "splits": splits, "parts": len(infos)}
        metrics = {
            "parts": [i["part"] for i in infos], "pool": pool, "embedder": embedder, "dim": embedder.get("dim"),
            "dtype": "float16", "normalisation": "l2", "text": text, "precision": params.precision,
            "images_per_sec_per_task": round(n_in / seconds, 1) if seconds > 0 else None,
            "read_with": read_with(ctx.out_dir, infos, text),
        }
        return Summary(counts=counts, metrics=metrics, files=["rejects.parquet"])


def check_same_model(infos: list[dict[str, Any]], spec: str) -> None:
    """Every part must come from the same model: workers that loaded different weights (a hub tag that moved, a
    file replaced mid-run) would mix two embedding spaces. Where the file was read from may differ (a resumed run
    after moving the checkpoint)."""
    described = {json.dumps({k: i["embedder"].get(k) for k in SAME_MODEL}, sort_keys=True) for i in infos}
    if len(described) > 1:
        shas = sorted({str(i["embedder"].get("weights_sha256"))[:12] for i in infos})
        raise InputError(f"embedder '{spec}': parts were made by different models (weights {', '.join(shas)}); "
                         "re-run with --force embed")


def read_with(out: Path, infos: list[dict[str, Any]], text: bool) -> dict[str, dict[str, Any]]:
    """How to read this artifact with the tools users already have (shown by ``distillery show``)."""
    n = sum(i["out"] for i in infos)
    first = part_files(infos[0]["part"]) if infos else part_files(0)
    where = out.resolve()
    readers = {
        "img_emb (clip-retrieval, autofaiss)": {
            "pattern": "img_emb", "samples": n,
            "python": f'np.load("{where / first["img"]}")  # rows align with {first["meta"]}; '
                      f'clip-retrieval index --embeddings_folder {where}'},
        "parquet (NeMo Curator: key, uid, embedding)": {
            "pattern": "parquet", "samples": n,
            "python": f'pd.read_parquet("{where / "parquet"}")  # id_field="uid", embedding_field="embedding"'},
        "all (distillery)": {
            "pattern": ".", "samples": n,
            "python": f'stages.embedders.store.load_embeddings("{where}", split="train")'},
    }
    if text:
        readers["text_emb (clip-retrieval)"] = {"pattern": "text_emb", "samples": n,
                                                "python": f'np.load("{where / first["text"]}")'}
    return readers
