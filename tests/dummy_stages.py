"""A tiny downstream stage for DAG tests: per-shard label histograms of a shard artifact."""
from __future__ import annotations

import json
from typing import Any

import pyarrow.parquet as pq

from pipeline.stage import STAGES, Stage, StageParams, Summary, Task


class CountParams(StageParams):
    scale: int = 1


@STAGES.register("count-labels")
class CountLabels(Stage):
    name = "count-labels"
    Params = CountParams
    input_kinds = {"shards": ("shards",)}
    output_kind = "metrics"

    def plan(self, inputs, params, ctx):
        shards = inputs["shards"].path
        return [Task(id=p.stem, payload=str(p)) for p in sorted((shards / "shards").rglob("*.parquet"))
                if not p.stem.endswith("_rejects")]

    def run(self, task: Task, params: CountParams, ctx) -> dict[str, Any]:
        labels = pq.read_table(task.payload, columns=["label"]).column("label").to_pylist()
        hist: dict[str, int] = {}
        for x in labels:
            hist[str(x)] = hist.get(str(x), 0) + params.scale
        with open(ctx.output(f"{task.id}.json"), "w") as f:
            json.dump(hist, f, sort_keys=True)
        return {"n": len(labels)}

    def finalize(self, parts, params, ctx) -> Summary:
        n = sum(p.info["n"] for p in parts)
        return Summary(counts={"in": n, "out": n, "rejected": 0})


class NoParams(StageParams):
    tasks: int = 8


@STAGES.register("model-per-worker")
class ModelPerWorker(Stage):
    """Loads a 'model' through ctx.cached and reports which instance each task saw; asks for a GPU."""

    name = "model-per-worker"
    Params = NoParams
    output_kind = "metrics"
    resources = {"GPU": 1}

    def plan(self, inputs, params, ctx):
        return [Task(id=f"{i:03d}") for i in range(params.tasks)]

    def run(self, task, params, ctx):
        import os
        import uuid

        model_id = ctx.cached("model", lambda: f"{os.getpid()}-{uuid.uuid4().hex}")
        with open(ctx.output(f"{task.id}.txt"), "w") as f:
            f.write(model_id)
        return {"model": model_id}

    def finalize(self, parts, params, ctx):
        return Summary(counts={"in": len(parts), "out": len(parts), "rejected": 0},
                       metrics={"models": sorted({p.info["model"] for p in parts})})
