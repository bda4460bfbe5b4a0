"""The experts stage: N expert trajectories for MTT/TESLA, one Dask task (and one file) per expert.

Output: ``experts/expert_{i:04d}.pt`` in the ``distillery.expert.v1`` buffer format (stages/trajectories.py),
readable with ``ExpertBuffer(artifact / "experts")``. Experts train in parallel across the cluster.
"""
from __future__ import annotations

import statistics
from typing import Any

from pipeline.artifacts import PartRecord
from pipeline.stage import STAGES, FinalizeContext, InputArtifact, PlanContext, Stage, Summary, Task, TaskContext
from stages.train.recipes import AugSpec
from stages.train.training_sets import TRAINING_KINDS
from stages.train.stage_support import TrainingParams, device, optional_test, trainset
from distill.buffer import save_expert
from distill.trajectories import train_expert


class ExpertParams(TrainingParams):
    num_experts: int = 10
    epochs: int = 50
    lr: float = 0.01
    batch_size: int = 256
    network: str = "convnet"
    network_kwargs: dict[str, Any] = {"width": 128, "norm": "instancenorm"}
    augmentation: AugSpec = AugSpec(name="dsa", params={"strategy": "color_crop_cutout_flip_scale_rotate"})
    seed: int = 0


@STAGES.register()
class ExpertsStage(Stage[ExpertParams]):
    name = "experts"
    version = "1"
    Params = ExpertParams
    input_kinds = {"data": TRAINING_KINDS}
    output_kind = "experts"
    resources = {"GPU": 1}

    def plan(self, inputs: dict[str, InputArtifact], params: ExpertParams, ctx: PlanContext) -> list[Task]:
        return [Task(id=f"expert_{i:04d}", payload=i) for i in range(params.num_experts)]

    def run(self, task: Task, params: ExpertParams, ctx: TaskContext) -> dict[str, Any]:
        inp = ctx.inputs["data"]
        ts = trainset(ctx, inp, params)
        test = optional_test(ctx, inp, params)
        expert = train_expert(ts.images, ts.targets, num_classes=ts.num_classes, seed=params.seed + task.payload,
                              device=device(params.device), network=params.network,
                              network_kwargs=params.network_kwargs, epochs=params.epochs, lr=params.lr,
                              batch_size=params.batch_size, augmentation=params.augmentation, test=test)
        save_expert(ctx.output(f"experts/{task.id}.pt"), expert)
        return {"test": expert.meta.get("test"), "wall_time": expert.meta.get("wall_time"), "n_train": len(ts),
                "params": int(expert.params.shape[1])}

    def finalize(self, parts: list[PartRecord], params: ExpertParams, ctx: FinalizeContext) -> Summary:
        tops = [p.info["test"]["top1"] for p in parts if p.info.get("test")]
        metrics = {"experts": len(parts), "epochs": params.epochs, "params_per_snapshot": parts[0].info["params"]}
        if tops:
            metrics.update(test_top1_mean=statistics.fmean(tops), test_top1_std=statistics.pstdev(tops))
        return Summary(counts={"runs": len(parts), "train_samples": parts[0].info["n_train"]}, metrics=metrics)

