"""The validate stage: train standard networks on an artifact and report test accuracy, mean ± std over seeds.

Whatever the artifact (full shards, a selection, relabelled or distilled set), the same recipe also trains a
random real subset of the same size and class composition, drawn from the pool the set came from: the
control the distillation literature now demands. A soft-label set's baseline gets the same labelling (the
teacher that made the labels, named by the set or bound as ``teacher``), or no baseline and the reason.
``subset:`` instead trains a random class-balanced subset of the input itself (the IPC / fraction baselines).

Every run of an artifact (all seeds, the set and its baseline, the test split) sees one model space, recorded
in the metrics.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from pipeline.artifacts import PartRecord
from pipeline.atomic import write_json
from pipeline.stage import (STAGES, FinalizeContext, InputArtifact, PlanContext, Stage, Summary, Task, TaskContext,
                            execution_only)
from stages.teacher import Teacher, load_teacher
from stages.train.losses import SoftLabels
from stages.train.trainer import EpochStats, plot_curves, to_nchw, train
from stages.train.training_sets import TRAINING_KINDS, SubsetSpec, TrainSet, balanced_subset, class_counts
from stages.train.stage_support import (TrainingParams, device, load_set, model_space, progress_callback,
                                        recipe_identity, tensors, testset, trainset)


class ValidateParams(TrainingParams):
    seeds: list[int] | None = None  # None: the recipe's eval_seeds networks (standard-dd: 5), seeds 0..n-1
    subset: SubsetSpec | None = None
    baseline: bool = True  # also train the same-size random real subset when the set has a pool
    eval_every: int = execution_only(0)  # test every N epochs too (curves); 0 = only at the end
    save_models: bool = execution_only(False)

    def resolved_seeds(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else list(range(self.make_recipe().eval_seeds))


def baseline_decision(ts: TrainSet, params: ValidateParams, has_teacher: bool) -> tuple[bool, str]:
    """Whether a same-size random real baseline is trained, and why (recorded in the metrics either way)."""
    if params.subset is not None:
        return False, "subset: the run itself is a random subset"
    if not params.baseline:
        return False, "baseline: false"
    if ts.pool is None:
        return False, ts.info.get("no_pool", "the set is the pool itself (no pool to draw a subset from)")
    set_chw = tuple(to_nchw(ts.images[:1]).shape[1:])
    pool_chw = (ts.pool.images.shape[3], *ts.pool.images.shape[1:3])
    if set_chw != pool_chw:
        return False, f"the pool's images are {pool_chw} (C, H, W), the set's {set_chw}"
    if ts.pool_targets is not None:
        return True, ("same size and class composition, drawn from the labelled pool and labelled by the same "
                      f"labels artifact ({ts.info.get('targets', 'hard')} targets"
                      + (", soft targets instead of label maps" if ts.label_maps is not None and params.label_maps else "") + ")")
    if ts.targets.is_floating_point() and not has_teacher and (ts.labeller is None or not ts.labeller.is_dir()):
        return False, ("soft labels without their labeller: the set names no teacher artifact (or it is gone) and "
                       "no teacher input is bound, so the baseline cannot be labelled the same way")
    return True, "same size and class composition, drawn from the pool" + \
        (", labelled by the same teacher" if ts.targets.is_floating_point() else "")


def labeller_of(ts: TrainSet, ctx: TaskContext) -> Teacher | None:
    """The teacher that labels a soft-label set's baseline: the set's own labeller, else the bound teacher."""
    if ts.labeller is not None and ts.labeller.is_dir():
        return ctx.cached(f"teacher:{ts.labeller}", lambda: load_teacher(ts.labeller))
    if "teacher" in ctx.inputs:
        return ctx.cached(f"teacher:{ctx.inputs['teacher'].path}", lambda: load_teacher(ctx.inputs["teacher"].path))
    return None


def select(ts: TrainSet, kind: str, params: ValidateParams, seed: int,
           labeller: Teacher | None = None, dev: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The images and targets one run trains on (a soft-label baseline is labelled by ``labeller``)."""
    if kind == "baseline":
        if ts.pool is None:
            raise ValueError("a random baseline needs the pool the set was drawn from")
        idx = balanced_subset(ts.pool.labels, per_class=class_counts(ts.targets, ts.num_classes), seed=seed)
        images = torch.from_numpy(np.ascontiguousarray(ts.pool.images[idx]))
        if ts.pool_targets is not None:  # the set's own labelling covers its pool (a labels artifact)
            return images, ts.pool_targets[torch.from_numpy(idx)]
        if not ts.targets.is_floating_point():
            return images, torch.from_numpy(ts.pool.labels[idx])
        if labeller is None:
            raise ValueError("a soft-label set's baseline needs the teacher that labelled the set")
        return images, (ts.soft_labels or SoftLabels()).from_logits(labeller.logits(images, dev))
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
            "wall_time_s": statistics.fmean(r["wall_time"] for r in runs), **summarize_real(runs)}


def summarize_real(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """ReaL top-1 mean ± std beside top-1, with how many test rows it covers, when the runs measured it."""
    real = [r["real"] for r in runs if r.get("real") and r["real"]["real_top1"] is not None]
    if not real:
        return {}
    vals = [r["real_top1"] for r in real]
    return {"real_top1_mean": statistics.fmean(vals), "real_top1_std": statistics.pstdev(vals),
            "real": {k: real[0][k] for k in ("evaluated", "excluded_empty", "excluded_unlabelled")},
            "real_per_seed": {str(r["seed"]): r["real"]["real_top1"] for r in runs if r.get("real")}}


@STAGES.register()
class ValidateStage(Stage[ValidateParams]):
    name = "validate"
    version = "2"  # 2: pool/recipe model space, MTT-exact standard-dd, soft-label baselines
    Params = ValidateParams
    # test defaults to train's test split; teacher enables KD
    # test_labels: label sets of the test split (a labels artifact's ``multi``): ReaL top-1 beside top-1
    input_kinds = {"train": TRAINING_KINDS, "test": ("shards",), "teacher": ("model",), "test_labels": ("labels",)}
    output_kind = "metrics"
    resources = {"GPU": 1}

    def identity(self, params: ValidateParams) -> dict[str, Any]:
        return {**recipe_identity(params), "seeds": params.resolved_seeds()}

    def plan(self, inputs: dict[str, InputArtifact], params: ValidateParams, ctx: PlanContext) -> list[Task]:
        kinds = ["set"]
        ts = load_set(inputs["train"].path, params, ctx.cache_dir)
        if baseline_decision(ts, params, "teacher" in inputs)[0]:
            kinds.append("baseline")
        return [Task(id=f"{k}-seed{s}", payload={"kind": k, "seed": s})
                for k in kinds for s in params.resolved_seeds()]

    def run(self, task: Task, params: ValidateParams, ctx: TaskContext) -> dict[str, Any]:
        kind, seed = task.payload["kind"], task.payload["seed"]
        dev = device(params.device)
        ts = trainset(ctx, ctx.inputs["train"], params)
        test_images = testset(ctx, ctx.inputs.get("test", ctx.inputs["train"]), params)
        test = tensors(test_images)
        recipe = params.make_recipe()
        space, space_info = model_space(ctx, ts, recipe, params)
        labeller = labeller_of(ts, ctx) if kind == "baseline" and ts.targets.is_floating_point() else None
        images, targets = select(ts, kind, params, seed, labeller, dev)
        kw: dict[str, Any] = {}
        if kind == "set" and ts.lr is not None and "lr" not in params.overrides:
            kw["lr"] = ts.lr  # a learned synthetic lr travels with the set
        if kind == "set" and params.subset is None and params.label_maps and ts.label_maps is not None:
            kw.update(label_maps=ts.label_maps, label_fill=params.label_fill)  # ReLabel: LabelPooling per view
        if "teacher" in ctx.inputs:  # on-the-fly KD: the teacher sees the student's views through its own space
            teacher = ctx.cached(f"teacher:{ctx.inputs['teacher'].path}",
                                 lambda: load_teacher(ctx.inputs["teacher"].path))
            kw["teacher"] = teacher.seeing(space)
        res = train(images, targets, recipe, num_classes=ts.num_classes, seed=seed, device=dev, test=test,
                    space=space, soft_labels=ts.soft_labels, checkpoint_dir=ctx.checkpoint_dir,
                    eval_every=params.eval_every, callback=progress_callback(ctx, recipe.total_epochs), **kw)
        n_train = len(ts) if ts.info.get("mode") == "stream" else len(targets)
        record = {"kind": kind, "seed": seed, "n_train": n_train, "test": res.test,
                  "images_per_sec": res.images_per_sec, "wall_time": res.wall_time, "recipe": recipe.name,
                  "network": res.network, "model_space": space.describe(), "model_space_source": space_info,
                  "data_mode": ts.info.get("mode"), "curve": [vars(s) for s in res.curve],
                  "targets": "label maps" if "label_maps" in kw else ts.info.get("targets")}
        if "test_labels" in ctx.inputs:  # ReaL-style: the prediction counts when it is in the image's label set
            from stages.labeling.multilabel import label_sets_of, predict, real_accuracy

            sets, labelled = label_sets_of(ctx.inputs["test_labels"].path, params.test_split, test_images.uids,
                                             ts.num_classes)
            record["real"] = real_accuracy(predict(res.model(), test[0], space, dev, recipe.eval_batch_size),
                                           sets, labelled)
        write_json(ctx.output(f"runs/{task.id}.json"), record)
        if params.save_models:
            with open(ctx.output(f"models/{task.id}.pt"), "wb") as f:
                torch.save({"network": res.network, "state_dict": res.state_dict,
                            "model_space": space.describe(), "space_tensors": space.tensors()}, f)
        return {k: record[k] for k in ("kind", "seed", "n_train", "test", "images_per_sec", "wall_time",
                                       "model_space", "model_space_source", "data_mode", "targets", "real")
                if k in record}

    def finalize(self, parts: list[PartRecord], params: ValidateParams, ctx: FinalizeContext) -> Summary:
        by_kind: dict[str, list[dict[str, Any]]] = {}
        for p in parts:
            by_kind.setdefault(p.info["kind"], []).append(p.info)
        spaces = {json.dumps(p.info["model_space"], sort_keys=True) for p in parts}
        if len(spaces) != 1:
            raise ValueError(f"runs of one validation saw different model spaces: {sorted(spaces)}")
        recipe = params.make_recipe()
        ts = load_set(ctx.inputs["train"].path, params, ctx.cache_dir)
        trained, reason = baseline_decision(ts, params, "teacher" in ctx.inputs)
        metrics: dict[str, Any] = {"recipe": recipe.name, "network": recipe.network, "epochs": recipe.epochs,
                                   "epochs_run": recipe.total_epochs, "mtt_exact": recipe.mtt_exact,
                                   "seeds": params.resolved_seeds(),
                                   "subset": params.subset.describe() if params.subset else None,
                                   "model_space": parts[0].info["model_space"],
                                   "model_space_source": parts[0].info["model_space_source"],
                                   "data_mode": parts[0].info.get("data_mode"),
                                   "targets": {k: v[0].get("targets") for k, v in by_kind.items()},
                                   "baseline": {"trained": "baseline" in by_kind, "reason": reason}}
        metrics.update(summarize(by_kind["set"]))
        if "baseline" in by_kind:
            metrics["random_baseline"] = summarize(by_kind["baseline"])
        elif trained:
            metrics["baseline"]["reason"] = "planned but no baseline runs committed"
        write_json(ctx.path("metrics.json"), metrics)
        curves = {}
        for p in parts:
            rec = json.loads((Path(ctx.out_dir) / f"runs/{p.task}.json").read_text())
            curves[f"{p.task} ({rec['test']['top1']:.1f}%)"] = SimpleNamespace(curve=[EpochStats(**s) for s in rec["curve"]])
        plot_curves(curves, ctx.path("curves.png"))
        n = metrics["n_train"]
        return Summary(counts={"runs": len(parts), "train_samples": n}, metrics=metrics,
                       files=["metrics.json", "curves.png"])


def format_metrics(m: dict[str, Any]) -> str:
    s = f"{m['top1_mean']:.2f} ± {m['top1_std']:.2f}"
    if "random_baseline" in m:
        b = m["random_baseline"]
        s += f"  (random subset of the same size: {b['top1_mean']:.2f} ± {b['top1_std']:.2f})"
    return s
