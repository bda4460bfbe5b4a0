"""Teachers: trained checkpoints for the ``checkpoint:`` embedder, relabelling, CDA's squeeze step and KD.

With ``folds: K`` (K >= 2) the stage trains K models on K folds, so every training sample gets predictions
from a model that never saw it (``oof_predictions.parquet``): what label-noise detection needs.

Checkpoint format ``distillery.teacher.v1`` (``teachers/fold_{k}.pt``): network (create_network kwargs),
state_dict, normalisation mean/std, classes, recipe, seed, held-out uids, test accuracy.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from pipeline.artifacts import PartRecord
from pipeline.atomic import atomic_path
from pipeline.stage import STAGES, FinalizeContext, InputArtifact, PlanContext, Stage, Summary, Task, TaskContext
from stages.train.networks import create_network
from stages.train.trainer import train
from stages.train.training_sets import TRAINING_KINDS
from stages.train.stage_support import TrainingParams, device, optional_test, trainset

TEACHER_FORMAT = "distillery.teacher.v1"


class TeacherParams(TrainingParams):
    recipe: str = "fast"
    seed: int = 0
    folds: int = 1  # >= 2: out-of-fold teachers


def fold_of(n: int, folds: int, seed: int) -> np.ndarray:
    """Fold id of each of ``n`` samples: a seeded permutation dealt round-robin (sizes differ by at most 1)."""
    perm = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[perm] = np.arange(n) % folds
    return out


def save_teacher(path: Path, payload: dict[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save({"format": TEACHER_FORMAT, **payload}, tmp)


class Teacher(nn.Module):
    """A trained network that takes uint8-range images normalised by its own statistics."""

    def __init__(self, net: nn.Module, mean: tuple[float, ...], std: tuple[float, ...], meta: dict[str, Any]):
        super().__init__()
        self.net = net
        self.mean, self.std, self.meta = mean, std, meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def load_teacher(artifact: str | Path, fold: int = 0) -> Teacher:
    path = Path(artifact) / "teachers" / f"fold_{fold}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no teacher checkpoint (is {artifact} a teacher artifact?)")
    ck = torch.load(path, map_location="cpu", weights_only=False)
    if ck.get("format") != TEACHER_FORMAT:
        raise ValueError(f"{path}: not a {TEACHER_FORMAT} checkpoint")
    net = create_network(**ck["network"])
    net.load_state_dict(ck["state_dict"])
    return Teacher(net.eval(), tuple(ck["mean"]), tuple(ck["std"]), {k: ck[k] for k in ("classes", "recipe", "seed")})


@STAGES.register()
class TeacherStage(Stage[TeacherParams]):
    name = "teacher"
    version = "1"
    Params = TeacherParams
    input_kinds = {"data": TRAINING_KINDS}
    output_kind = "model"
    resources = {"GPU": 1}

    def plan(self, inputs: dict[str, InputArtifact], params: TeacherParams, ctx: PlanContext) -> list[Task]:
        return [Task(id=f"fold_{k}", payload=k) for k in range(max(params.folds, 1))]

    def run(self, task: Task, params: TeacherParams, ctx: TaskContext) -> dict[str, Any]:
        inp = ctx.inputs["data"]
        ts = trainset(ctx, inp, params)
        k, folds = task.payload, max(params.folds, 1)
        streamed = ts.info.get("mode") == "stream"
        if streamed and folds > 1:
            raise ValueError("out-of-fold teachers need the training set in memory: data_mode: memory")
        fold = fold_of(len(ts), folds, params.seed) if folds > 1 else np.full(len(ts), -1)
        train_idx = torch.from_numpy(np.flatnonzero(fold != k))
        held = np.flatnonzero(fold == k)
        test = optional_test(ctx, inp, params)
        recipe = params.make_recipe()
        dev = device(params.device)
        images, targets = (ts.images, ts.targets) if streamed else (ts.images[train_idx], ts.targets[train_idx])
        res = train(images, targets, recipe, num_classes=ts.num_classes,
                    seed=params.seed + k, device=dev, test=test,
                    checkpoint_dir=ctx.out_dir / ".ckpt" / task.id)
        info: dict[str, Any] = {"fold": k, "n_train": len(train_idx), "test": res.test,
                                "images_per_sec": res.images_per_sec, "wall_time": res.wall_time}
        if len(held):
            probs = predict(res.model(), ts.images[torch.from_numpy(held)], res.mean, res.std, dev)
            with open(ctx.output(f"oof/fold_{k}.npz"), "wb") as f:
                np.savez(f, index=held, probs=probs)
            info["oof_top1"] = float((probs.argmax(1) == ts.targets[torch.from_numpy(held)].numpy()).mean() * 100)
        save_teacher(ctx.output(f"teachers/fold_{k}.pt"), {
            "network": res.network, "state_dict": res.state_dict, "mean": res.mean, "std": res.std,
            "classes": ts.classes, "recipe": recipe.model_dump(mode="json"), "seed": params.seed + k,
            "held_out": [ts.uids[i] for i in held] if ts.uids else [], "test": res.test})
        return info

    def finalize(self, parts: list[PartRecord], params: TeacherParams, ctx: FinalizeContext) -> Summary:
        files: list[str] = []
        metrics: dict[str, Any] = {"folds": [p.info for p in parts]}
        tops = [p.info["test"]["top1"] for p in parts if p.info.get("test")]
        if tops:
            metrics["test_top1_mean"] = float(np.mean(tops))
        if params.folds > 1:
            from stages.train.training_sets import load_trainset

            ts = load_trainset(ctx.inputs["data"].path, params.train_split, params.image_size)
            probs = np.zeros((len(ts), ts.num_classes), dtype=np.float32)
            for p in parts:
                with np.load(ctx.out_dir / f"oof/{p.task}.npz") as z:
                    probs[z["index"]] = z["probs"]
            labels = ts.targets.numpy()
            table = pa.table({"uid": ts.uids, "label": labels, "pred": probs.argmax(1),
                              "probs": list(probs)})
            with atomic_path(ctx.path("oof_predictions.parquet")) as tmp:
                pq.write_table(table, tmp)
            files.append("oof_predictions.parquet")
            metrics["oof_top1"] = float((probs.argmax(1) == labels).mean() * 100)
        with atomic_path(ctx.path("metrics.json")) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2, sort_keys=True))
        files.append("metrics.json")
        n = sum(p.info["n_train"] for p in parts)
        return Summary(counts={"runs": len(parts), "train_samples": n}, metrics=metrics, files=files)


@torch.no_grad()
def predict(model: nn.Module, images: torch.Tensor, mean: Any, std: Any, dev: torch.device,
            batch: int = 1024) -> np.ndarray:
    """Softmax probabilities of uint8 images (NHWC or NCHW) under the model's normalisation."""
    from stages.train.trainer import Normalizer, to_nchw

    model = model.to(dev).eval()
    norm = Normalizer(mean, std, dev)
    x = to_nchw(images)
    out = [torch.softmax(model(norm(x[i:i + batch].to(dev))).float(), 1).cpu() for i in range(0, len(x), batch)]
    return torch.cat(out).numpy()

