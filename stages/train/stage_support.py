"""Shared plumbing of the stages that train networks (validate, teacher, experts): params, identity, data,
model spaces, devices, checkpoints and progress."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import torch

from pipeline.artifacts import Artifact
from pipeline.errors import InputError
from pipeline.stage import InputArtifact, StageParams, TaskContext, execution_only
from stages.train.image_data import ImageSet, decode_rows, load_images, sample_rows
from stages.train.model_space import ChannelNorm, ModelSpace, channel_stats, fit_zca, fixed, load_space, save_space
from stages.train.recipes import Recipe, load_recipe
from stages.train.trainer import EpochStats
from stages.train.training_sets import LabelTargets, TrainSet, load_trainset

STATS_SAMPLE_IMAGES = 10_000  # fallback statistics when a pool's manifest has no image_stats
STATS_SAMPLE_SEED = 0


class TrainingParams(StageParams):
    recipe: str = "standard-dd"  # a registered recipe or a YAML path
    overrides: dict[str, Any] = {}  # recipe fields to change, deep-merged: {schedule: {milestones: [0.3]}}
    train_split: str = "train"
    test_split: str = "test"
    image_size: int | None = None  # resize on load (needed when images differ in size)
    # a labelled set (labels artifact, or an export carrying soft labels): its hard label, its soft rows, or soft
    # when the stored top-k names more than one class. Part of the artifact id: it changes what is trained on.
    label_targets: LabelTargets = "auto"
    label_maps: bool = True  # train on a labels set's localized label maps (LabelPooling) when it carries them
    label_fill: Literal["zero", "neg_inf"] = "zero"  # LabelPooling's non-top-k classes: 0 (ReLabel) or no mass
    device: Literal["auto", "cpu", "cuda"] = execution_only("auto")
    # auto: decode into memory when it fits. Execution-only by decision (stream and memory order batches
    # differently, so single runs differ by noise; the recipe and data are the same).
    data_mode: Literal["auto", "memory", "stream"] = execution_only("auto")

    def make_recipe(self) -> Recipe:
        return load_recipe(self.recipe, **self.overrides)


def recipe_identity(params: TrainingParams) -> dict[str, Any]:
    """The resolved recipe (every field), so editing a recipe YAML re-runs what depends on it."""
    return {"recipe": params.make_recipe().model_dump(mode="json")}


def device(choice: str) -> torch.device:
    """The training device; on a Dask worker, torch also gets as many threads as the worker has (no oversubscription)."""
    try:
        from distributed import get_worker

        torch.set_num_threads(max(1, get_worker().state.nthreads))
    except (ImportError, ValueError, AttributeError):
        pass
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def trainset(ctx: TaskContext, inp: InputArtifact, params: TrainingParams) -> TrainSet:
    """The training set, decoded once per worker (the cache holds it across this worker's tasks)."""
    key = f"trainset:{inp.path}:{params.train_split}:{params.image_size}:{params.data_mode}:{params.label_targets}"
    return ctx.cached(key, lambda: load_set(inp.path, params, ctx.cache_dir))


def load_set(path: Path, params: TrainingParams, cache_dir: Path | None) -> TrainSet:
    """``load_trainset`` with a training stage's params (split, size, data mode, label targets)."""
    return load_trainset(path, params.train_split, params.image_size, params.data_mode, cache_dir,
                         targets=params.label_targets)


def images_of(path: Path) -> Path:
    """The shards artifact holding an artifact's images: itself, or the pool a selection (or another derived
    artifact) records; so a selection's test split is its pool's."""
    if (path / "index.parquet").is_file():
        return path
    from stages.sharding.pool import find_pool

    try:
        return find_pool(path)
    except InputError:
        return path


def testset(ctx: TaskContext, inp: InputArtifact, params: TrainingParams) -> ImageSet:
    key = f"testset:{inp.path}:{params.test_split}:{params.image_size}"
    return ctx.cached(key, lambda: load_images(images_of(inp.path), params.test_split, size=params.image_size,
                                               cache_dir=ctx.cache_dir))


def optional_test(ctx: TaskContext, inp: InputArtifact, params: TrainingParams) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The held-out split as tensors when the artifact has one (teachers and experts report test accuracy)."""
    return tensors(testset(ctx, inp, params)) if has_split(inp.path, params.test_split) else None


def tensors(s: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(np.ascontiguousarray(s.images)), torch.from_numpy(s.labels)


def has_split(path: Path, split: str) -> bool:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    index = images_of(path) / "index.parquet"
    if not index.is_file():
        return False
    col = pq.read_table(index, columns=["split"]).column("split")
    return bool(pc.any(pc.equal(col, split)).as_py())


# --------------------------------------------------------------------------------------------------------------
# Model spaces


def pool_stats(pool: Path, split: str, size: int | None) -> tuple[ChannelNorm, dict[str, Any]]:
    """The pool's per-channel statistics: its manifest's ``image_stats`` when they describe ``split``, else the
    same computed from a seeded random sample of the split (and the metrics say so)."""
    stats = Artifact(pool).manifest().metrics.get("image_stats")
    if isinstance(stats, dict) and stats.get("split") == split and size is None:
        return fixed(stats["mean"], stats["std"]), {"source": "image_stats", "artifact": str(pool),
                                                    **{k: stats.get(k) for k in ("split", "images", "seed")}}
    rows = sample_rows(pool, split, STATS_SAMPLE_IMAGES, STATS_SAMPLE_SEED)
    images = torch.from_numpy(decode_rows(pool, split, rows, size)).permute(0, 3, 1, 2)
    mean, std = channel_stats(images)
    why = "no image_stats in the pool's manifest" if not isinstance(stats, dict) else \
        f"image_stats describe split {stats.get('split')!r}" if stats.get("split") != split else \
        f"images are resized to {size} on load"
    return fixed(mean, std), {"source": "sampled", "reason": why, "artifact": str(pool), "split": split,
                              "images": len(rows), "seed": STATS_SAMPLE_SEED}


def zca_space(pool: Path, split: str, size: int | None, eps: float, cache_dir: Path) -> tuple[ModelSpace, dict[str, Any]]:
    """ZCA fitted on the whole ``split`` of ``pool``, cached under ``cache_dir/zca/`` keyed by the artifact id,
    split, size and eps (never written into the artifact)."""
    artifact_id = Artifact(pool).manifest().artifact_id
    path = Path(cache_dir) / "zca" / f"{artifact_id}-{split}-{size or 'native'}-eps{eps:g}.safetensors"
    info = {"source": "zca", "artifact": str(pool), "split": split, "cache": str(path)}
    if path.is_file():
        return load_space(path), {**info, "cached": True}
    images = load_images(pool, split, size=size, cache_dir=cache_dir).images
    space = fit_zca(torch.from_numpy(images).permute(0, 3, 1, 2), eps,
                    fitted_on={"artifact_id": artifact_id, "split": split, "size": size})
    save_space(path, space)
    return space, {**info, "cached": False}


def resolve_model_space(ts: TrainSet, recipe: Recipe, cache_dir: Path,
                        size: int | None = None) -> tuple[ModelSpace, dict[str, Any]]:
    """The one model space of a run (the set, its baseline and the test split): a float set's recorded space,
    else the recipe's normalisation over the pool (its statistics, fixed constants, or ZCA)."""
    norm = recipe.normalization
    if ts.space is not None:
        info: dict[str, Any] = {"source": "the set's recorded model space"}
        if norm.kind != "pool":
            info["note"] = f"recipe normalization {norm.kind!r} not applied: the set's images already live in its space"
        return ts.space, info
    if norm.kind == "fixed":
        return fixed(norm.mean, norm.std), {"source": "recipe"}  # type: ignore[arg-type]
    if ts.pool_artifact is None:
        raise ValueError("this training set names no pool artifact to take its model space from")
    if norm.kind == "pool":
        return pool_stats(ts.pool_artifact, ts.pool_split, size)
    if ts.info.get("mode") == "stream":
        raise ValueError("ZCA needs the whole training split in memory: use data_mode: memory")
    return zca_space(ts.pool_artifact, ts.pool_split, size, norm.eps, cache_dir)


def model_space(ctx: TaskContext, ts: TrainSet, recipe: Recipe,
                params: TrainingParams) -> tuple[ModelSpace, dict[str, Any]]:
    key = f"space:{ts.pool_artifact}:{ts.pool_split}:{params.image_size}:{json.dumps(recipe.normalization.model_dump())}:{id(ts.space)}"
    return ctx.cached(key, lambda: resolve_model_space(ts, recipe, ctx.cache_dir, params.image_size))


def progress_callback(ctx: TaskContext, total_epochs: int,
                      also: Callable[[int, Any, EpochStats | None], None] | None = None):
    """A trainer callback reporting every epoch to ``ctx.progress`` (loss, train accuracy, test when measured)."""

    def report(epoch: int, model: Any, stats: EpochStats | None) -> None:
        if also is not None:
            also(epoch, model, stats)
        if stats is None:
            return
        metrics = {"loss": round(stats.loss, 5), "train_acc": round(stats.train_acc, 2), "lr": stats.lr}
        if stats.test_top1 is not None:
            metrics["test_top1"] = stats.test_top1
        ctx.progress(epoch, total_epochs, **metrics)

    return report
