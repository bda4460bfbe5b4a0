"""The relabel stage: better supervision for every row of a pool's split, and the label-noise verdict.

    inputs:  data (shards, or a selection: its kept rows) + what the sources read: embeddings, teacher
    params:  sources: [{source: teacher, weight: 0.5}, {source: neighbours, k: 20, weight: 0.5}]   (stages/labeling/)
             topk: 5   multi_threshold: 0.3   method: prune_by_noise_rate   action: relabel   min_confidence: null

The sources' probabilities (weighted average when several) are the soft label (``topk`` most probable classes),
the multi-label set (classes with probability >= ``multi_threshold``, plus the training label) and the suggestion
(argmax). Confident learning (``stages/labeling/confident.py``) flags the rows whose given label is wrong; a
flagged row gets ``action`` (keep | relabel to the suggestion | drop; with ``min_confidence`` a relabel whose
suggestion is less probable than that is a drop instead). Rows a source has no value for are rejects with its
reason.

Output (kind ``labels``, ``stages/labeling/store.py``): ``labels.parquet``, ``rejects.parquet``, ``flags.png``
(the most confident flags). Counts: ``in`` (rows of the split) == ``out`` (rows labelled) + ``rejected``;
``breakdown`` = {keep, relabel, drop} (what ``distillery status`` shows), ``flagged``. Metrics: ``actions``,
``flagged_per_class``, ``noise_rate`` (estimated, from the calibrated confident joint), ``confident_joint``,
``calibrated_joint``, ``thresholds``, the sources, ``num_classes``, ``classes``, ``pool``.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, field_validator

from pipeline.artifacts import PartRecord
from pipeline.errors import InputError
from pipeline.stage import (
    STAGES,
    FinalizeContext,
    InputArtifact,
    PlanContext,
    Stage,
    StageParams,
    Summary,
    Task,
    TaskContext,
    execution_only,
)
from stages.labeling import LabelSource, create_label_source
from stages.labeling.confident import Among, Method, find_label_issues, noise_score
from stages.labeling.label_maps import write_maps
from stages.labeling.store import (
    ACTIONS,
    LABELS_FILE,
    SCHEMA,
    load_labels,
    write_labels,
)
from stages.selections.store import pool_rows
from stages.sharding.pool import find_pool, pool_record
from stages.train.stage_support import device

Action = Literal["keep", "relabel", "drop"]
REJECT_SCHEMA = pa.schema([("key", pa.string()), ("uid", pa.string()), ("split", pa.string()),
                           ("shard", pa.int32()), ("reason", pa.string())])


class LabelMapSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(15, ge=1)
    k: int = Field(5, ge=1)


class RelabelParams(StageParams):
    sources: list[dict[str, Any]] = Field(default_factory=lambda: [{"source": "teacher"}], min_length=1)
    topk: int = Field(5, ge=1)
    multi_threshold: float = Field(0.3, gt=0, le=1)
    method: Method = "prune_by_noise_rate"
    among: Among = "confident"  # several classes above threshold: argmax among them (paper) or overall (cleanlab)
    action: Action = "relabel"  # for flagged rows
    min_confidence: float | None = Field(None, ge=0, le=1)  # relabel only when p(suggested) >= this, else drop
    split: str = "train"
    flags_shown: int = execution_only(32)  # images in flags.png (0: no picture)
    # ReLabel-style localized label maps from the bound teacher (resnet18/airbench; each row by the fold that held
    # it out): {size: S, k: top-k per location}; stored in maps/<split>/<shard>.npz, pooled per crop by the trainer
    label_maps: LabelMapSpec | None = None
    device: Literal["auto", "cpu", "cuda"] = execution_only("auto")  # where the label-map teacher runs

    @field_validator("sources")
    @classmethod
    def _valid(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [create_label_source(s).params.model_dump(mode="json") for s in v]

    def source(self) -> LabelSource:
        """The one source, or the weighted combination of several."""
        if len(self.sources) == 1:
            return create_label_source(self.sources[0])
        return create_label_source({"source": "combine", "sources": self.sources})


def decide(given: np.ndarray, probs: np.ndarray, flagged: np.ndarray, action: Action,
           min_confidence: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(suggested, action per row, training label): flagged rows get ``action``; a relabel whose suggestion is
    less probable than ``min_confidence`` becomes a drop."""
    suggested = probs.argmax(axis=1)
    act = np.where(flagged, action, "keep").astype(object)
    if action == "relabel" and min_confidence is not None:
        unsure = flagged & (probs[np.arange(len(probs)), suggested] < min_confidence)
        act[unsure] = "drop"
    label = np.where(act == "relabel", suggested, given)
    return suggested, act, label


def top_k(probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices, probabilities) of the k most probable classes per row, descending (ties by class index)."""
    k = min(k, probs.shape[1])
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(probs, idx, axis=1)


def multi_labels(probs: np.ndarray, label: np.ndarray, threshold: float) -> list[list[int]]:
    """Per row the classes with probability >= threshold, most probable first, always including ``label``."""
    out = []
    for p, y in zip(probs, label):
        chosen = [int(c) for c in np.argsort(-p, kind="stable") if p[c] >= threshold]
        out.append(chosen if y in chosen else [int(y), *chosen])
    return out


def _lists(values: np.ndarray, dtype: pa.DataType) -> pa.Array:
    n, k = values.shape
    return pa.ListArray.from_arrays(pa.array(np.arange(0, n * k + 1, k, dtype=np.int32)),
                                    pa.array(values.ravel(), dtype))


def label_table(rows: pa.Table, probs: np.ndarray, params: RelabelParams) -> tuple[pa.Table, dict[str, Any]]:
    """``labels.parquet`` rows for ``rows`` (key, uid, split, shard, label) and their (n, C) probabilities, and the
    confident-learning numbers."""
    probs = probs / probs.sum(axis=1, keepdims=True)
    given = rows.column("label").to_numpy(zero_copy_only=False).astype(np.int64)
    issues = find_label_issues(given, probs, params.method, params.among)
    suggested, act, label = decide(given, probs, issues.flagged, params.action, params.min_confidence)
    idx, prob = top_k(probs, params.topk)
    c = probs.shape[1]
    table = pa.table({
        "key": rows["key"], "uid": rows["uid"], "split": rows["split"], "shard": rows["shard"],
        "given": pa.array(given, pa.int32()), "label": pa.array(label, pa.int32()),
        "topk_index": _lists(idx, pa.int16()), "topk_prob": _lists(prob, pa.float32()),
        "multi": pa.array(multi_labels(probs, label, params.multi_threshold), pa.list_(pa.int16())),
        "noise_score": pa.array(noise_score(given, probs), pa.float32()),
        "flagged": pa.array(issues.flagged), "suggested": pa.array(suggested, pa.int32()),
        "action": pa.array(act.tolist(), pa.string())}, schema=SCHEMA)
    info = {"flagged": int(issues.flagged.sum()), "noise_rate": issues.noise_rate,
            "flagged_per_class": {str(k): int(v) for k, v in
                                  enumerate(np.bincount(given[issues.flagged], minlength=c))},
            "actions": {a: int((act == a).sum()) for a in ACTIONS},
            "thresholds": issues.thresholds.round(6).tolist(), "confident_joint": issues.joint.tolist(),
            "calibrated_joint": issues.calibrated.tolist(),
            "agreement": float((suggested == given).mean()) if len(given) else None}
    return table, info


@STAGES.register()
class RelabelStage(Stage[RelabelParams]):
    name = "relabel"
    version = "1"
    Params = RelabelParams
    input_kinds = {"data": ("shards", "selection"), "embeddings": ("embeddings",), "teacher": ("model",)}
    optional_inputs = ("embeddings", "teacher")  # the sources say which they read
    output_kind = "labels"

    def plan(self, inputs: dict[str, InputArtifact], params: RelabelParams, ctx: PlanContext) -> list[Task]:
        params.source().check({n: a.path for n, a in inputs.items()})
        if params.label_maps is not None and "teacher" not in inputs:
            raise InputError("relabel: label_maps need a teacher input (a resnet18 or airbench teacher artifact; "
                             "trained with folds: K, every row is mapped by a model that never saw it)")
        return [Task(id="label", payload={})]

    def run(self, task: Task, params: RelabelParams, ctx: TaskContext) -> dict[str, Any]:
        paths = {n: a.path for n, a in ctx.inputs.items()}
        data = paths["data"]
        classes = json.loads((find_pool(data) / "classes.json").read_text())
        rows = pool_rows(data, params.split, columns=["key", "uid", "split", "shard", "label"])
        if rows.num_rows == 0:
            raise InputError(f"{data}: no rows in split '{params.split}' to label")
        source = params.source()
        unlabelled = pc.is_null(rows["label"]).to_numpy(zero_copy_only=False)
        probs = np.full((rows.num_rows, len(classes)), np.nan)
        if (~unlabelled).any():
            probs[~unlabelled] = source.probs(rows.filter(pa.array(~unlabelled)), paths, classes)
        missing = np.isnan(probs).any(axis=1) & ~unlabelled
        good = ~unlabelled & ~missing
        if not good.any():
            raise InputError(f"relabel: no row of '{params.split}' could be labelled ({source.missing_reason})")
        table, info = label_table(rows.filter(pa.array(good)), probs[good], params)
        write_labels(ctx.output(LABELS_FILE), table)
        if params.label_maps is not None:
            located = pool_rows(data, params.split, columns=["key", "uid", "split", "shard", "offset", "bytes"])
            info["label_maps"] = write_maps(paths["teacher"], find_pool(data), located.filter(pa.array(good)),
                                            ctx.output, size=params.label_maps.size, k=params.label_maps.k,
                                            device=device(params.device))
        reason = np.where(unlabelled, "no given label", source.missing_reason)
        bad = rows.filter(pa.array(~good))
        pq.write_table(pa.table({"key": bad["key"], "uid": bad["uid"], "split": bad["split"], "shard": bad["shard"],
                                 "reason": pa.array(reason[~good].tolist(), pa.string())}, schema=REJECT_SCHEMA),
                       ctx.output("rejects.parquet"))
        by_reason = dict(Counter(reason[~good].tolist()))
        return {**info, "in": rows.num_rows, "out": int(good.sum()), "rejected": int((~good).sum()),
                "rejected_by_reason": by_reason, "pool": pool_record(data), "num_classes": len(classes),
                "classes": classes}

    def finalize(self, parts: list[PartRecord], params: RelabelParams, ctx: FinalizeContext) -> Summary:
        info = dict(parts[0].info)
        files: list[str] = []
        if params.flags_shown > 0:
            files.append(self._flags_png(ctx.out_dir, Path(info["pool"]["path"]), info["classes"], params))
        counts = {k: info.pop(k) for k in ("in", "out", "rejected", "rejected_by_reason")}
        counts.update(breakdown=info["actions"], flagged=info["flagged"])
        metrics = {**info, "sources": params.source().describe(), "method": params.method, "action": params.action,
                   "split": params.split, "topk": params.topk, "multi_threshold": params.multi_threshold,
                   "min_confidence": params.min_confidence}
        return Summary(counts=counts, metrics=metrics, files=["rejects.parquet", *files])

    @staticmethod
    def _flags_png(out: Path, pool: Path, classes: list[str], params: RelabelParams) -> str:
        from stages.labeling.plots import flags_grid

        t = load_labels(out, columns=["uid", "given", "suggested", "noise_score", "action", "flagged"])
        t = t.filter(t["flagged"])
        order = np.argsort(-t.column("noise_score").to_numpy(zero_copy_only=False), kind="stable")
        flags_grid(pool, t.take(pa.array(order[:params.flags_shown])), classes, out / "flags.png")
        return "flags.png"
