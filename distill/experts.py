"""The experts stage: N expert trajectories for MTT/TESLA, one Dask task (and one file) per expert.

Output: ``experts/expert_{i:04d}.pt`` in the ``distillery.expert.v1`` buffer format (distill/buffer.py), readable
with ``ExpertBuffer(artifact / "experts")``, and ``model_space.safetensors``: the model space the experts were
trained in (the pool's statistics, the recipe's constants or the fitted ZCA), which distillation and evaluation
must share. Experts train in parallel across the cluster; the recipe (default ``mtt-expert``) says how.
"""
from __future__ import annotations

import statistics
from typing import Any

from pipeline.artifacts import PartRecord
from pipeline.stage import STAGES, FinalizeContext, InputArtifact, PlanContext, Stage, Summary, Task, TaskContext
from stages.train.model_space import save_space
from stages.train.training_sets import TRAINING_KINDS, load_trainset
from stages.train.stage_support import (TrainingParams, device, model_space, optional_test, progress_callback,
                                        recipe_identity, resolve_model_space, trainset)
from distill.buffer import save_expert
from distill.trajectories import EXPERT_RECIPE, train_expert

SPACE_FILE = "model_space.safetensors"


class ExpertParams(TrainingParams):
    recipe: str = EXPERT_RECIPE
    num_experts: int = 10
    seed: int = 0


@STAGES.register()
class ExpertsStage(Stage[ExpertParams]):
    name = "experts"
    version = "2"  # 2: the recipe (mtt-expert) says how experts train; the model space is recorded
    Params = ExpertParams
    input_kinds = {"data": TRAINING_KINDS}
    output_kind = "experts"
    resources = {"GPU": 1}

    def identity(self, params: ExpertParams) -> dict[str, Any]:
        return recipe_identity(params)

    def plan(self, inputs: dict[str, InputArtifact], params: ExpertParams, ctx: PlanContext) -> list[Task]:
        return [Task(id=f"expert_{i:04d}", payload=i) for i in range(params.num_experts)]

    def run(self, task: Task, params: ExpertParams, ctx: TaskContext) -> dict[str, Any]:
        inp = ctx.inputs["data"]
        ts = trainset(ctx, inp, params)
        test = optional_test(ctx, inp, params)
        recipe = params.make_recipe()
        space, _ = model_space(ctx, ts, recipe, params)
        expert = train_expert(ts.images, ts.targets, num_classes=ts.num_classes, seed=params.seed + task.payload,
                              device=device(params.device), recipe=recipe, space=space, test=test,
                              soft_labels=ts.soft_labels, on_epoch=progress_callback(ctx, recipe.total_epochs))
        save_expert(ctx.output(f"experts/{task.id}.pt"), expert)
        return {"test": expert.meta.get("test"), "wall_time": expert.meta.get("wall_time"), "n_train": len(ts),
                "params": int(expert.params.shape[1]), "model_space": space.describe()}

    def finalize(self, parts: list[PartRecord], params: ExpertParams, ctx: FinalizeContext) -> Summary:
        ts = load_trainset(ctx.inputs["data"].path, params.train_split, params.image_size, params.data_mode,
                           ctx.cache_dir, targets=params.label_targets)
        space, info = resolve_model_space(ts, params.make_recipe(), ctx.cache_dir, params.image_size)
        if space.describe() != parts[0].info["model_space"]:
            raise ValueError("the experts were trained in another model space than the one resolved now")
        save_space(ctx.path(SPACE_FILE), space)
        tops = [p.info["test"]["top1"] for p in parts if p.info.get("test")]
        metrics = {"experts": len(parts), "epochs": params.make_recipe().total_epochs,
                   "params_per_snapshot": parts[0].info["params"], "model_space": space.describe(),
                   "model_space_source": info}
        if tops:
            metrics.update(test_top1_mean=statistics.fmean(tops), test_top1_std=statistics.pstdev(tops))
        return Summary(counts={"runs": len(parts), "train_samples": parts[0].info["n_train"]}, metrics=metrics,
                       files=[SPACE_FILE])
