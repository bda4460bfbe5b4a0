"""The prune stage: keep a target-size subset of a pool's split by one method (random, ssp, dbp, clip-score, margin;
``stages/pruning/``), optionally *within a prior selection*, so a chain (dedup -> CLIP score -> DBP, as published)
is a DAG of steps, each a selection artifact.

    params:  method: dbp  fraction: 0.5 (or count: 20000)  temperature: 0.1 ...   (method options sit flat)
    inputs:  clusters / embeddings / teacher (what the method reads), selection (prune only within its kept rows),
             shards (the pool, when no other input records it)

Output (kind ``selection``): ``selection.npy`` (DataComp's sorted u8,u8 uid subset), ``kept.parquet`` (+ score,
cluster, distance), ``dropped.parquet`` (reason, dropped_by; a chain's earlier drops are carried along),
``per_cluster.parquet`` (cluster-aware methods: size, kept, and for dbp d_intra, d_inter, complexity, probability,
quota), and plots: ``clusters.png``, ``scores.png``, ``samples.png``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from pydantic import Field, field_validator, model_validator

from pipeline.artifacts import PartRecord
from pipeline.errors import InputError
from pipeline.stage import (STAGES, FinalizeContext, InputArtifact, PlanContext, Stage, StageParams, Summary, Task,
                            TaskContext, execution_only)
from stages.pruning import Target, create_pruner
from stages.pruning.step import resolve_pool, run_step, step_rows
from stages.selections.store import load_selection, pool_rows, write_selection_outputs


class PruneParams(StageParams):
    # the method and its options, e.g. {method: dbp, temperature: 0.1}; in a manifest the options may sit flat
    # beside ``method: dbp`` (they are gathered here and validated by the method's strict Params)
    method: dict[str, Any] = {"method": "random"}
    fraction: float | None = Field(None, gt=0, le=1)  # of the candidate rows
    count: int | None = Field(None, ge=0)  # exact size
    split: str = "train"  # the split pruned; a prior selection's other splits pass through unchanged
    seed: int = 0
    plots: bool = execution_only(True)

    @model_validator(mode="before")
    @classmethod
    def _gather(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        method = data.get("method", "random")
        spec = {"method": method} if isinstance(method, str) else dict(method)
        for key in [k for k in data if k not in cls.model_fields]:
            spec[key] = data.pop(key)
        data["method"] = spec
        return data

    @field_validator("method")
    @classmethod
    def _valid_method(cls, v: dict[str, Any]) -> dict[str, Any]:
        return create_pruner(v).params.model_dump(mode="json")

    @model_validator(mode="after")
    def _target(self) -> "PruneParams":
        given = [k for k in ("fraction", "count") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError("give fraction or count, not both")
        if create_pruner(self.method).wants_target():
            if not given:
                raise ValueError(f"method '{self.method['method']}' needs a target size: fraction or count")
        elif given:
            raise ValueError(f"{given[0]} and a threshold both set the size: give one")
        return self


@STAGES.register()
class PruneStage(Stage[PruneParams]):
    name = "prune"
    version = "1"
    Params = PruneParams
    input_kinds = {"clusters": ("clusters",), "embeddings": ("embeddings",), "teacher": ("model",),
                   "selection": ("selection",), "shards": ("shards",), "exclude": ("selection", "shards")}
    # the method says which it reads; ``exclude``: rows (by uid, any pool) that are never candidates, e.g. the
    # complement of a held-out pool: {method: random, fraction: 1.0, inputs: {shards: shard, exclude: pool}}
    optional_inputs = ("clusters", "embeddings", "teacher", "selection", "shards", "exclude")
    output_kind = "selection"

    def plan(self, inputs: dict[str, InputArtifact], params: PruneParams, ctx: PlanContext) -> list[Task]:
        pruner = create_pruner(params.method)
        missing = [n for n in pruner.needs if n not in inputs]
        if missing:
            raise InputError(f"prune: method '{pruner.name}' needs the input(s) {', '.join(missing)} "
                             f"(inputs: {{{', '.join(f'{m}: <step>' for m in missing)}}})")
        resolve_pool({n: a.path for n, a in inputs.items()})
        return [Task(id="select", payload={})]

    def run(self, task: Task, params: PruneParams, ctx: TaskContext) -> dict[str, Any]:
        from stages.sharding.pool import pool_record

        paths = {n: a.path for n, a in ctx.inputs.items()}
        pool = resolve_pool(paths)
        prior = prior_stage = None
        if "selection" in paths:
            prior = load_selection(paths["selection"])
            prior_stage = ctx.inputs["selection"].manifest.stage
        rows, passed, carried = step_rows(pool, params.split, prior, prior_stage or "", paths.get("clusters"))
        pruner = create_pruner(params.method)
        exclude = None
        if "exclude" in paths:
            exclude = pool_rows(paths["exclude"], None, ["uid"])["uid"].combine_chunks()
        res = run_step(pruner, rows, paths, Target(params.fraction, params.count), params.seed, passed, carried,
                       exclude)
        write_selection_outputs(ctx, res.kept, res.dropped)
        if res.clusters is not None:
            pq.write_table(res.clusters, ctx.output("per_cluster.parquet"))
        return {"counts": res.counts, "metrics": res.metrics, "pool": pool_record(pool),
                "per_cluster": res.clusters is not None, "scored": "score" in res.kept.column_names}

    def finalize(self, parts: list[PartRecord], params: PruneParams, ctx: FinalizeContext) -> Summary:
        info = parts[0].info
        out = ctx.out_dir
        files: list[str] = []
        if params.plots:
            files = self._plots(info, params, out, Path(info["pool"]["path"]))
        target = Target(params.fraction, params.count)
        metrics = {"pool": info["pool"], "method": params.method, "target": target.describe(),
                   "split": params.split, "seed": params.seed, **info["metrics"],
                   "subset": {"file": "selection.npy", "format": "DataComp u8,u8 (sorted uids)",
                              "uids": info["counts"]["selection"]},
                   "use_with": use_with(out, Path(info["pool"]["path"]), params.split)}
        return Summary(counts=info["counts"], metrics=metrics, files=files)

    @staticmethod
    def _plots(info: dict[str, Any], params: PruneParams, out: Path, pool: Path) -> list[str]:
        import pyarrow.compute as pc

        from stages.pruning import plots

        kept = pq.read_table(out / "kept.parquet")
        kept = kept.filter(pc.equal(kept["split"], params.split))
        dropped = pq.read_table(out / "dropped.parquet")
        dropped = dropped.filter(pc.equal(dropped["dropped_by"], f"prune:{params.method['method']}"))
        files = []
        if info["per_cluster"]:
            plots.plot_clusters(pq.read_table(out / "per_cluster.parquet"), out / "clusters.png")
            files.append("clusters.png")
        if info["scored"]:
            plots.plot_scores(kept, dropped, out / "scores.png", f"score ({params.method['method']})")
            files.append("scores.png")
        if kept.num_rows and dropped.num_rows:
            plots.sample_grid(pool, kept, dropped, out / "samples.png")
            files.append("samples.png")
        return files


def use_with(artifact: Path, pool: Path, split: str) -> dict[str, str]:
    """How to consume the selection with other tools: DataComp's resharder on the pool's shards of ``split`` (their
    numbers are contiguous), our loaders, and export."""
    import pyarrow.compute as pc

    shards = pq.read_table(pool / "index.parquet", columns=["split", "shard"])
    shards = pc.unique(shards.filter(pc.equal(shards["split"], split))["shard"]).to_numpy()
    first, n = (int(shards.min()), len(shards)) if len(shards) else (0, 0)
    return {"datacomp_resharder": f"python resharder.py -i {pool}/shards/{split} -o OUT -s {artifact}/selection.npy "
                                  f"--shard-format '{{:05d}}.tar' --shard-stats-format '{{:05d}}_stats.json' "
                                  f"--first-shard {first} -n {n}",
            "python": f"from stages.train.loaders import webdataset; webdataset('{artifact}', '{split}')",
            "export": "a step {stage: export, inputs: {data: <this step>}} writes the selection as new shards"}
