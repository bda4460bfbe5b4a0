"""The validate stage: train standard networks on an artifact and report test accuracy, mean ± std over seeds.

Whatever the artifact (full shards, a selection, relabelled or distilled set), the same recipe also trains a
random real subset of the same size and class composition, drawn from the pool the set came from: the
control the distillation literature now demands. ``subset:`` instead trains a random class-balanced subset
of the input itself (the IPC / fraction baselines).
"""
from __future__ import annotations

import json
import shutil
import statistics
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import PartRecord
from pipeline.atomic import write_json
from pipeline.stage import STAGES, FinalizeContext, InputArtifact, PlanContext, Stage, Summary, Task, TaskContext
from stages.teacher import load_teacher
from stages.train.trainer import EpochStats, plot_curves, train
from stages.train.training_sets import TRAINING_KINDS, SubsetSpec, TrainSet, balanced_subset, class_counts, load_trainset
from stages.train.stage_support import TrainingParams, device, tensors, testset, trainset


class ValidateParams(TrainingParams):
    seeds: list[int] = [0, 1, 2]
    subset: SubsetSpec | None = None
    baseline: bool = True  # also train the same-size random real subset when the set has a pool
    eval_every: int = 0  # test every N epochs too (curves); 0 = only at the end
    save_models: bool = False


def select(ts: TrainSet, kind: str, params: ValidateParams, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The images and targets one run trains on."""
    if kind == "baseline":
        if ts.pool is None:
            raise ValueError("a random baseline needs the pool the set was drawn from")
        idx = balanced_subset(ts.pool.labels, per_class=class_counts(ts.targets, ts.num_classes), seed=seed)
        return torch.from_numpy(np.ascontiguousarray(ts.pool.images[idx])), torch.from_numpy(ts.pool.labels[idx])
    if params.subset is not None:
        if ts.info.get("mode") == "stream":
            raise ValueError("subset: of a streamed training set is not supported; use data_mode: memory")
        hard = (ts.targets.argmax(1) if ts.targets.is_floating_point() else ts.targets).numpy()
        idx = torch.from_numpy(balanced_subset(hard, params.subset, seed=seed))
        return ts.images[idx], ts.targets[idx]
    return ts.images, ts.targets


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    top1 = [r["test"]["top1"] for r in runs]
    top5 = [r["test"]["top5"] for r in runs]
    return {"top1_mean": statistics.fmean(top1), "top1_std": statistics.pstdev(top1),
            "top5_mean": statistics.fmean(top5), "top5_std": statistics.pstdev(top5),
            "per_seed": {str(r["seed"]): r["test"]["top1"] for r in runs}, "n_train": runs[0]["n_train"],
            "images_per_sec": statistics.fmean(r["images_per_sec"] for r in runs),
            "wall_time_s": statistics.fmean(r["wall_time"] for r in runs)}


@STAGES.register()
class ValidateStage(Stage[ValidateParams]):
    name = "validate"
    version = "1"
    Params = ValidateParams
    # test defaults to train's test split; teacher enables KD
    input_kinds = {"train": TRAINING_KINDS, "test": ("shards",), "teacher": ("model",)}
    output_kind = "metrics"
    resources = {"GPU": 1}

    def plan(self, inputs: dict[str, InputArtifact], params: ValidateParams, ctx: PlanContext) -> list[Task]:
        kinds = ["set"]
        if params.baseline and params.subset is None:
            ts = load_trainset(inputs["train"].path, params.train_split, params.image_size)
            if ts.pool is not None:
                kinds.append("baseline")
        return [Task(id=f"{k}-seed{s}", payload={"kind": k, "seed": s}) for k in kinds for s in params.seeds]

    def run(self, task: Task, params: ValidateParams, ctx: TaskContext) -> dict[str, Any]:
        kind, seed = task.payload["kind"], task.payload["seed"]
        ts = trainset(ctx, ctx.inputs["train"], params)
        test = tensors(testset(ctx, ctx.inputs.get("test", ctx.inputs["train"]), params))
        images, targets = select(ts, kind, params, seed)
        recipe = params.make_recipe()
        kw: dict[str, Any] = {}
        if kind == "set" and ts.lr is not None and "lr" not in params.overrides:
            kw["lr"] = ts.lr  # a learned synthetic lr travels with the set
        if "teacher" in ctx.inputs:
            teacher = load_teacher(ctx.inputs["teacher"].path)
            kw.update(teacher=teacher, mean=teacher.mean, std=teacher.std)  # one normalisation for both
        ckpt = ctx.out_dir / ".ckpt" / task.id
        res = train(images, targets, recipe, num_classes=ts.num_classes, seed=seed, device=device(params.device),
                    test=test, checkpoint_dir=ckpt, eval_every=params.eval_every, **kw)
        record = {"kind": kind, "seed": seed, "n_train": len(ts) if ts.info.get("mode") == "stream" else len(targets), "test": res.test,
                  "images_per_sec": res.images_per_sec, "wall_time": res.wall_time, "recipe": recipe.name,
                  "network": res.network, "curve": [vars(s) for s in res.curve]}
        write_json(ctx.output(f"runs/{task.id}.json"), record)
        if params.save_models:
            with open(ctx.output(f"models/{task.id}.pt"), "wb") as f:
                torch.save({"network": res.network, "state_dict": res.state_dict, "mean": res.mean, "std": res.std}, f)
        shutil.rmtree(ckpt, ignore_errors=True)
        return {k: record[k] for k in ("kind", "seed", "n_train", "test", "images_per_sec", "wall_time")}

    def finalize(self, parts: list[PartRecord], params: ValidateParams, ctx: FinalizeContext) -> Summary:
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for p in parts:
            by_kind.setdefault(p.info["kind"], []).append(p.info)
        recipe = params.make_recipe()
        metrics: dict[str, Any] = {"recipe": recipe.name, "network": recipe.network, "epochs": recipe.epochs,
                                   "subset": params.subset.describe() if params.subset else None}
        metrics.update(summarize(by_kind["set"]))
        if "baseline" in by_kind:
            metrics["random_baseline"] = summarize(by_kind["baseline"])
        write_json(ctx.path("metrics.json"), metrics)
        curves = {}
        for p in parts:
            rec = json.loads((ctx.out_dir / f"runs/{p.task}.json").read_text())
            curves[f"{p.task} ({rec['test']['top1']:.1f}%)"] = SimpleNamespace(curve=[EpochStats(**s) for s in rec["curve"]])
        plot_curves(curves, ctx.path("curves.png"))
        shutil.rmtree(ctx.out_dir / ".ckpt", ignore_errors=True)
        n = metrics["n_train"]
        return Summary(counts={"runs": len(parts), "train_samples": n}, metrics=metrics,
                       files=["metrics.json", "curves.png"])


def format_metrics(m: dict[str, Any]) -> str:
    s = f"{m['top1_mean']:.2f} ± {m['top1_std']:.2f}"
    if "random_baseline" in m:
        b = m["random_baseline"]
        s += f"  (random subset of the same size: {b['top1_mean']:.2f} ± {b['top1_std']:.2f})"
    return s

