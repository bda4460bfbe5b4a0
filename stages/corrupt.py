"""The corrupt stage: a copy of a pool (shards or a selection's kept rows, re-sharded exactly as ``export`` does)
in which a seeded fraction of one split's labels is flipped symmetrically, each to a uniformly random *other*
class: the label-noise experiment with a known truth (curation.md §7).

Image bytes, keys and uids are unchanged; the label (index ``label``/``label_name``, the ``{key}.cls`` and
``{key}.json`` members) is the noisy one, so every consumer downstream (teacher, embed, relabel, validate) trains
on the noise without knowing. The truth is recorded beside it:

    noise.parquet   key, uid, clean_label, noisy_label, corrupted     (one row per sample of ``split``)
    metrics.noise   rate (asked), corrupted (count), actual_rate, seed, split, per_class (corrupted per clean class),
                    transitions ((C, C) counts clean -> noisy)

Exactly ``round(rate · n)`` of the split's labelled rows are flipped (a seeded permutation picks them, a seeded
offset in 1..C-1 picks the new class), so the rate is exact and the result depends only on the pool's rows, the
rate and the seed.
"""
from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import Field

from pipeline.artifacts import PartRecord
from pipeline.atomic import atomic_path
from pipeline.errors import InputError
from pipeline.stage import STAGES, FinalizeContext, InputArtifact, PlanContext, Summary, Task
from stages.export import ExportParams, ExportStage
from stages.sharding.pool import find_pool

NOISE_FILE = "noise.parquet"
NOISE_SCHEMA = pa.schema([("key", pa.string()), ("uid", pa.string()), ("clean_label", pa.int32()),
                          ("noisy_label", pa.int32()), ("corrupted", pa.bool_())])


class CorruptParams(ExportParams):
    rate: float = Field(..., ge=0, le=1)  # fraction of the split's labelled rows whose label is flipped
    seed: int = 0
    split: str = "train"
    noise: Literal["symmetric"] = "symmetric"


def symmetric_noise(labels: np.ndarray, num_classes: int, rate: float, seed: int) -> np.ndarray:
    """Noisy labels: ``round(rate · n)`` of the labelled entries (label >= 0) moved to a uniformly random other
    class; -1 (unlabelled) entries are never touched."""
    labels = np.asarray(labels, np.int64)
    if num_classes < 2:
        raise InputError("symmetric label noise needs at least two classes")
    eligible = np.flatnonzero(labels >= 0)
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(eligible)[: int(round(rate * len(eligible)))]
    noisy = labels.copy()
    noisy[chosen] = (labels[chosen] + rng.integers(1, num_classes, len(chosen))) % num_classes
    return noisy


def _labels(table: pa.Table) -> np.ndarray:
    return pc.fill_null(table["label"], -1).to_numpy(zero_copy_only=False).astype(np.int64)


@STAGES.register()
class CorruptStage(ExportStage):
    name = "corrupt"
    version = "1"
    Params = CorruptParams  # type: ignore[assignment]
    input_kinds = {"data": ("selection", "shards")}
    output_kind = "shards"

    def plan(self, inputs: dict[str, InputArtifact], params: CorruptParams, ctx: PlanContext  # type: ignore[override]
             ) -> list[Task]:
        """Export's plan (one task per output shard, its rows in ``.plan/refs``), then the split's refs rewritten
        with the noisy labels before any task reads them."""
        tasks = super().plan(inputs, params, ctx)
        mine = [t for t in tasks if t.payload["split"] == params.split]
        if not mine:
            raise InputError(f"{inputs['data'].path}: no rows in split '{params.split}' to corrupt")
        classes = json.loads((ctx.out_dir / "classes.json").read_text())
        refs = [pq.read_table(ctx.out_dir / t.payload["refs"]) for t in mine]
        noisy = symmetric_noise(_labels(pa.concat_tables(refs)), len(classes), params.rate, params.seed)
        start = 0
        for t, table in zip(mine, refs):
            part = noisy[start:start + table.num_rows]
            start += table.num_rows
            label = pa.array(np.where(part >= 0, part, 0), pa.int32(), mask=part < 0)
            names = pa.array([classes[v] if v >= 0 else None for v in part], pa.string())
            table = table.set_column(table.column_names.index("label"), "label", label)
            table = table.set_column(table.column_names.index("label_name"), "label_name", names)
            with atomic_path(ctx.out_dir / t.payload["refs"]) as tmp:
                pq.write_table(table, tmp)
        return tasks

    def finalize(self, parts: list[PartRecord], params: CorruptParams, ctx: FinalizeContext  # type: ignore[override]
                 ) -> Summary:
        """Export's summary + the truth: each row's label in the pool (clean) against the label written (noisy)."""
        summary = super().finalize(parts, params, ctx)
        out = pq.read_table(ctx.out_dir / "index.parquet", columns=["key", "uid", "split", "label"])
        out = out.filter(pc.equal(out["split"], params.split))
        pool = pq.read_table(find_pool(ctx.inputs["data"].path) / "index.parquet", columns=["uid", "label"])
        pos = pc.index_in(out["uid"], value_set=pool["uid"].combine_chunks()).to_numpy(zero_copy_only=False)
        clean = _labels(pool)[pos.astype(np.int64)]
        noisy = _labels(out)
        corrupted = clean != noisy
        table = pa.table({"key": out["key"], "uid": out["uid"],
                          "clean_label": pa.array(clean, pa.int32(), mask=clean < 0),
                          "noisy_label": pa.array(noisy, pa.int32(), mask=noisy < 0),
                          "corrupted": pa.array(corrupted)}, schema=NOISE_SCHEMA)
        with atomic_path(ctx.path(NOISE_FILE)) as tmp:
            pq.write_table(table, tmp)
        c = len(json.loads((ctx.out_dir / "classes.json").read_text()))
        labelled = (clean >= 0) & (noisy >= 0)
        transitions = np.zeros((c, c), np.int64)
        np.add.at(transitions, (clean[labelled], noisy[labelled]), 1)
        summary.metrics["noise"] = {
            "kind": params.noise, "rate": params.rate, "seed": params.seed, "split": params.split,
            "corrupted": int(corrupted.sum()), "labelled": int(labelled.sum()),
            "actual_rate": float(corrupted.sum() / max(labelled.sum(), 1)),
            "per_class": {str(k): int(v) for k, v in enumerate(np.bincount(clean[corrupted], minlength=c))},
            "transitions": transitions.tolist(), "file": NOISE_FILE}
        summary.counts["corrupted"] = int(corrupted.sum())
        summary.files.append(NOISE_FILE)
        return summary
