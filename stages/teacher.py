"""Teachers: trained checkpoints for the ``checkpoint:`` embedder, relabelling, CDA's squeeze step and KD.

With ``folds: K`` (K >= 2) the stage trains K models on K folds, so every training sample gets predictions
from a model that never saw it (``oof_predictions.parquet``): what label-noise detection needs.
Every teacher lists the rows it trained on (``trained_on.parquet``: uid, sha256), so a teacher trained on other
data can label a pool after showing it never saw any of the pool's images (``stages/labeling/teacher.py``).

Checkpoint format ``distillery.teacher.v2`` (``teachers/fold_{k}.pt``), loadable with ``torch.load(...,
weights_only=True)`` (tensors, strings, numbers, lists and dicts only): network (create_network kwargs),
state_dict, model_space (its description) + space_tensors (ZCA's transform), classes, recipe, seed, held-out uids,
test accuracy.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import nn

from pipeline.artifacts import PartRecord
from pipeline.atomic import atomic_path
from pipeline.stage import STAGES, FinalizeContext, InputArtifact, PlanContext, Stage, Summary, Task, TaskContext
from stages.train.model_space import ModelSpace, bridge, space_from
from stages.train.networks import create_network
from stages.train.trainer import Encoder, to_nchw, train
from stages.train.training_sets import TRAINING_KINDS, load_trainset
from stages.train.stage_support import (TrainingParams, device, model_space, optional_test, progress_callback,
                                        recipe_identity, trainset)

TEACHER_FORMAT = "distillery.teacher.v2"
TRAINED_ON_FILE = "trained_on.parquet"


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


def trained_on_table(data: Path, uids: list[str]) -> pa.Table:
    """uid and content sha256 of the rows a teacher trained on (sha256 null where the pool records none, or the
    training set has no pool: a synthetic set has no uids at all and gives an empty table)."""
    from pipeline.errors import InputError
    from stages.sharding.pool import find_pool

    uid = pa.array(uids, pa.string())
    sha = pa.nulls(len(uids), pa.string())
    try:
        index = pq.read_table(find_pool(data) / "index.parquet", columns=["uid", "sha256"])
    except (InputError, KeyError, OSError, pa.ArrowInvalid):  # no pool, or one without content hashes
        index = None
    if index is not None and len(uids):
        pos = pc.index_in(uid, value_set=index["uid"].combine_chunks())
        sha = pc.take(index["sha256"].combine_chunks().cast(pa.string()), pos)
    return pa.table({"uid": uid, "sha256": sha})


def save_teacher(path: Path, payload: dict[str, Any], space: ModelSpace) -> None:
    body = {"format": TEACHER_FORMAT, **payload, "model_space": space.describe(),
            "space_tensors": {k: v.detach().cpu() for k, v in space.tensors().items()}}
    with atomic_path(path) as tmp:
        torch.save(body, tmp)


class Teacher(nn.Module):
    """A trained network; ``forward`` takes images in the teacher's own model space ``space``."""

    def __init__(self, net: nn.Module, space: ModelSpace, meta: dict[str, Any]):
        super().__init__()
        self.net = net
        self.space, self.meta = space, meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def seeing(self, space: ModelSpace) -> nn.Module:
        """This teacher taking inputs in another model space (a student's), mapped through [0, 1] pixels."""
        to_mine = bridge(space, self.space)
        return self if to_mine is None else _Bridged(self, to_mine, space, self.space)

    @torch.no_grad()
    def logits(self, images: torch.Tensor, dev: torch.device | str = "cpu", batch: int = 1024) -> torch.Tensor:
        """Raw logits of uint8 images (NHWC or NCHW), in eval mode, without augmentation."""
        self.to(dev).eval()
        enc = Encoder(self.space, torch.device(dev))
        x = to_nchw(images)
        return torch.cat([self(enc(x[i:i + batch].to(dev))).float().cpu() for i in range(0, len(x), batch)])


class _Bridged(nn.Module):
    def __init__(self, teacher: Teacher, to_teacher: Any, src: ModelSpace, dst: ModelSpace) -> None:
        super().__init__()
        self.teacher, self.to_teacher, self.src, self.dst = teacher, to_teacher, src, dst

    def to(self, *args: Any, **kw: Any) -> "_Bridged":  # type: ignore[override]
        self.teacher.to(*args, **kw)
        dev = next(self.teacher.parameters()).device
        self.src, self.dst = self.src.to(dev), self.dst.to(dev)
        self.to_teacher = bridge(self.src, self.dst)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.teacher(self.to_teacher(x))


def load_teacher(artifact: str | Path, fold: int = 0) -> Teacher:
    """A teacher checkpoint, read with ``weights_only=True``: loading never runs code from the file."""
    path = Path(artifact) / "teachers" / f"fold_{fold}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no teacher checkpoint (is {artifact} a teacher artifact?)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a pickle that needs code, or a truncated file
        raise ValueError(f"{path}: not loadable as weights only ({type(e).__name__}: {e})") from e
    if not isinstance(ck, dict) or ck.get("format") != TEACHER_FORMAT:
        raise ValueError(f"{path}: not a {TEACHER_FORMAT} checkpoint")
    net = create_network(**ck["network"])
    net.load_state_dict(ck["state_dict"])
    space = space_from(ck["model_space"], ck.get("space_tensors"))
    return Teacher(net.eval(), space, {k: ck[k] for k in ("classes", "recipe", "seed")})


@STAGES.register()
class TeacherStage(Stage[TeacherParams]):
    name = "teacher"
    version = "3"  # 2: pool-statistics model space, weights-only checkpoints (format v2); 3: trained_on.parquet
    Params = TeacherParams
    input_kinds = {"data": TRAINING_KINDS}
    output_kind = "model"
    resources = {"GPU": 1}

    def identity(self, params: TeacherParams) -> dict[str, Any]:
        return recipe_identity(params)

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
        space, space_info = model_space(ctx, ts, recipe, params)
        dev = device(params.device)
        images, targets = (ts.images, ts.targets) if streamed else (ts.images[train_idx], ts.targets[train_idx])
        res = train(images, targets, recipe, num_classes=ts.num_classes, seed=params.seed + k, device=dev, test=test,
                    space=space, soft_labels=ts.soft_labels, checkpoint_dir=ctx.checkpoint_dir,
                    callback=progress_callback(ctx, recipe.total_epochs))
        if k == 0:  # the union of every fold's training rows is the whole training set
            pq.write_table(trained_on_table(inp.path, list(ts.uids or [])), ctx.output(TRAINED_ON_FILE))
        info: dict[str, Any] = {"fold": k, "n_train": len(train_idx), "test": res.test,
                                "images_per_sec": res.images_per_sec, "wall_time": res.wall_time,
                                "model_space": space.describe(), "model_space_source": space_info}
        teacher = Teacher(res.model(), space, {})
        if len(held):
            probs = torch.softmax(teacher.logits(ts.images[torch.from_numpy(held)], dev), 1).numpy()
            with open(ctx.output(f"oof/fold_{k}.npz"), "wb") as f:
                np.savez(f, index=held, probs=probs)
            hard = ts.targets[torch.from_numpy(held)]
            hard = hard.argmax(1) if hard.is_floating_point() else hard
            info["oof_top1"] = float((probs.argmax(1) == hard.numpy()).mean() * 100)
        save_teacher(ctx.output(f"teachers/fold_{k}.pt"), {
            "network": res.network, "state_dict": res.state_dict, "classes": ts.classes,
            "recipe": recipe.model_dump(mode="json"), "seed": params.seed + k,
            "held_out": [ts.uids[i] for i in held] if ts.uids else [], "test": res.test}, space)
        return info

    def finalize(self, parts: list[PartRecord], params: TeacherParams, ctx: FinalizeContext) -> Summary:
        files: list[str] = []
        metrics: dict[str, Any] = {"folds": [p.info for p in parts], "model_space": parts[0].info["model_space"],
                                   "model_space_source": parts[0].info["model_space_source"]}
        tops = [p.info["test"]["top1"] for p in parts if p.info.get("test")]
        if tops:
            metrics["test_top1_mean"] = float(np.mean(tops))
        if params.folds > 1:
            ts = load_trainset(ctx.inputs["data"].path, params.train_split, params.image_size,
                               cache_dir=ctx.cache_dir, targets=params.label_targets)
            probs = np.zeros((len(ts), ts.num_classes), dtype=np.float32)
            for p in parts:
                with np.load(ctx.out_dir / f"oof/{p.task}.npz", allow_pickle=False) as z:
                    probs[z["index"]] = z["probs"]
            labels = ts.targets.argmax(1).numpy() if ts.targets.is_floating_point() else ts.targets.numpy()
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
