"""A tiny downstream stage for DAG tests: per-shard label histograms of a shard artifact."""
from __future__ import annotations

import json
from typing import Any

import pyarrow.parquet as pq

from pipeline.stage import STAGES, Stage, StageParams, Summary, Task, execution_only


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


class PhasedParams(StageParams):
    groups: int = 3
    buckets: int | None = None


@STAGES.register("phased-groups")
class PhasedGroups(Stage[PhasedParams]):
    """Three phases, the shapes curation needs: a global fit on a sample, per-shard assignment that writes rows
    partitioned by a key, then one task per key with all of that key's rows."""

    name = "phased-groups"
    Params = PhasedParams
    input_kinds = {"shards": ("shards",)}
    output_kind = "clusters"
    phases = ("fit", "assign", "group")

    @staticmethod
    def shard_tables(shards):
        return [str(p) for p in sorted((shards / "shards").rglob("*.parquet")) if not p.stem.endswith("_rejects")]

    def plan(self, inputs, params, ctx):
        from pipeline.partitions import planned_partitions

        files = self.shard_tables(inputs["shards"].path)
        if ctx.phase == "fit":
            return [Task(id="global", payload={"files": files})]
        if ctx.phase == "assign":
            offset = ctx.previous["fit"][0].info["offset"]
            return [Task(id=f"s{i:03d}", payload={"file": f, "offset": offset}) for i, f in enumerate(files)]
        return [Task(id=f"g{k}", payload={"key": k}, size=n)
                for k, n in planned_partitions(ctx.previous["assign"]).items()]

    def run(self, task, params, ctx):
        import pyarrow as pa

        from pipeline.partitions import read_partition, write_partitions

        if ctx.phase == "fit":
            labels = pq.read_table(task.payload["files"][0], columns=["label"]).column("label").to_pylist()
            offset = min(x for x in labels if x is not None)
            with open(ctx.output("fit.json"), "w") as f:
                json.dump({"offset": offset}, f)
            return {"offset": offset}
        if ctx.phase == "assign":
            t = pq.read_table(task.payload["file"], columns=["uid", "label"])
            groups = [(x - task.payload["offset"]) % params.groups for x in t.column("label").to_pylist()]
            t = t.append_column("group", pa.array(groups, pa.int64()))
            return {"rows": t.num_rows, "partitions": write_partitions(ctx, t, "group", "by_group", params.buckets)}
        t = read_partition(ctx.out_dir, task.payload["key"], "by_group")
        with open(ctx.output(f"groups/{task.id}.json"), "w") as f:
            json.dump(sorted(zip(t.column("uid").to_pylist(), t.column("group").to_pylist())), f)
        return {"rows": t.num_rows}

    def finalize(self, parts, params, ctx):
        rows_in = sum(p.info["rows"] for p in parts if p.phase == "assign")
        rows_out = sum(p.info["rows"] for p in parts if p.phase == "group")
        return Summary(counts={"in": rows_in, "out": rows_out, "rejected": 0})


class FlakyParams(StageParams):
    tasks: int = 6
    bad: list[int] = []  # these tasks raise ValueError (deterministic) while <flag_dir>/fail exists
    transient: list[int] = []  # these raise OSError on their first attempt only
    flag_dir: str = ""


@STAGES.register("flaky")
class Flaky(Stage[FlakyParams]):
    name = "flaky"
    Params = FlakyParams
    input_kinds = {"after": ()}  # any artifact this step must wait for
    optional_inputs = ("after",)
    output_kind = "metrics"

    def plan(self, inputs, params, ctx):
        return [Task(id=f"t{i}", payload=i) for i in range(params.tasks)]

    def run(self, task, params, ctx):
        import os
        from pathlib import Path

        flags = Path(params.flag_dir)
        with open(flags / f"attempt-{task.id}-{os.getpid()}-{os.urandom(4).hex()}", "w"):
            pass
        if task.payload in params.bad and (flags / "fail").exists():
            raise ValueError(f"bad value in task {task.id}")
        if task.payload in params.transient and not (flags / f"once-{task.id}").exists():
            (flags / f"once-{task.id}").write_text("")
            raise OSError(f"transient I/O error in task {task.id}")
        ctx.progress(1, 2, step="half")
        with open(ctx.output(f"{task.id}.txt"), "w") as f:
            f.write(str(task.payload))
        ctx.progress(2, 2, step="done")
        return {"i": task.payload}

    def finalize(self, parts, params, ctx):
        return Summary(counts={"runs": len(parts)})


class ProbeParams(StageParams):
    tasks: int = 6
    sleep: float = 0.3
    note: str = execution_only("")  # changes nothing the stage writes


@STAGES.register("device-probe")
class DeviceProbe(Stage[ProbeParams]):
    """A GPU stage whose tasks report the device they were given and when they ran."""

    name = "device-probe"
    Params = ProbeParams
    output_kind = "metrics"
    resources = {"GPU": 1}

    def plan(self, inputs, params, ctx):
        return [Task(id=f"p{i}") for i in range(params.tasks)]

    def run(self, task, params, ctx):
        import os
        import time

        t0 = time.time()
        time.sleep(params.sleep)
        return {"device": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": t0, "end": time.time()}

    def finalize(self, parts, params, ctx):
        return Summary(counts={"runs": len(parts)}, metrics={"runs": [p.info for p in parts]})
