"""The probe stage: a linear probe and a kNN classifier on frozen embeddings of a training set (all of a pool's
training rows, or a selection's kept rows), tested on the test split's embeddings. Seconds on a CPU, so dozens of
selections can be ranked before any is trained; see ``stages/evaluation/ranking.py`` for how far to trust it."""
from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.compute as pc

from pipeline.artifacts import PartRecord
from pipeline.atomic import write_json
from pipeline.stage import STAGES, FinalizeContext, InputArtifact, PlanContext, Stage, StageParams, Summary, Task, \
    TaskContext
from stages.embedders.store import load_embeddings
from stages.evaluation.probe import knn_probe, linear_probe
from stages.selections.store import load_selection


class ProbeParams(StageParams):
    methods: list[str] = ["linear", "knn"]
    k: int = 20  # kNN neighbours
    c: float = 1.0  # inverse L2 strength of the linear probe
    max_iter: int = 1000
    train_split: str = "train"
    test_split: str = "test"


def training_rows(emb_path: Any, train: InputArtifact | None, split: str):
    """Embeddings of the training set: the selection's kept uids, or every row of the split."""
    pool = load_embeddings(emb_path, split)
    if train is None or train.manifest.kind != "selection":
        return pool
    keep = set(load_selection(train.path).uids)
    mask = np.fromiter((u in keep for u in pool.uids), bool, len(pool))
    if mask.sum() != len(keep):
        raise ValueError(f"{train.path}: {len(keep) - int(mask.sum())} selected uids have no embedding in "
                         f"{emb_path} (split {split!r}); embed the selection's pool")
    return pool.take(np.flatnonzero(mask))


@STAGES.register()
class ProbeStage(Stage[ProbeParams]):
    name = "probe"
    version = "1"
    Params = ProbeParams
    input_kinds = {"embeddings": ("embeddings",), "train": ("selection", "shards")}
    output_kind = "metrics"

    def plan(self, inputs: dict[str, InputArtifact], params: ProbeParams, ctx: PlanContext) -> list[Task]:
        return [Task(id=m, payload=m) for m in params.methods]

    def run(self, task: Task, params: ProbeParams, ctx: TaskContext) -> dict[str, Any]:
        emb = ctx.inputs["embeddings"].path
        train = training_rows(emb, ctx.inputs.get("train"), params.train_split)
        test = load_embeddings(emb, params.test_split)
        y = np.asarray(train.meta.column("label").to_pylist(), np.int64)
        ty = np.asarray(test.meta.column("label").to_pylist(), np.int64)
        if pc.any(pc.is_null(train.meta["label"])).as_py():
            raise ValueError(f"{emb}: unlabelled training rows; a probe needs labels")
        if task.payload == "linear":
            res = linear_probe(train.vectors, y, test.vectors, ty, c=params.c, max_iter=params.max_iter)
        elif task.payload == "knn":
            res = knn_probe(train.vectors, y, test.vectors, ty, k=params.k)
        else:
            raise ValueError(f"unknown probe method {task.payload!r} (linear, knn)")
        return {"method": task.payload, "top1": res.top1, "n_train": res.n_train, "n_test": res.n_test}

    def finalize(self, parts: list[PartRecord], params: ProbeParams, ctx: FinalizeContext) -> Summary:
        metrics: dict[str, Any] = {f"{p.info['method']}_top1": p.info["top1"] for p in parts}
        metrics.update(n_train=parts[0].info["n_train"], n_test=parts[0].info["n_test"])
        write_json(ctx.path("metrics.json"), metrics)
        return Summary(counts={"runs": len(parts), "train_samples": metrics["n_train"]}, metrics=metrics,
                       files=["metrics.json"])
