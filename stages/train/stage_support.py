"""Shared plumbing of the stages that train networks (validate, teacher, experts): params, data, devices."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch

from pipeline.stage import InputArtifact, StageParams, TaskContext
from stages.train.image_data import ImageSet, load_images
from stages.train.recipes import Recipe, load_recipe
from stages.train.training_sets import TrainSet, load_trainset


class TrainingParams(StageParams):
    recipe: str = "standard-dd"  # a registered recipe or a YAML path
    overrides: dict[str, Any] = {}  # recipe fields to replace, e.g. {epochs: 50, network: resnet18}
    train_split: str = "train"
    test_split: str = "test"
    image_size: int | None = None  # resize on load (needed when images differ in size)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data_mode: Literal["auto", "memory", "stream"] = "auto"  # auto: decode into memory when it fits

    def make_recipe(self) -> Recipe:
        return load_recipe(self.recipe, **self.overrides)


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
    key = f"trainset:{inp.path}:{params.train_split}:{params.image_size}:{params.data_mode}"
    return ctx.cached(key, lambda: load_trainset(inp.path, params.train_split, params.image_size, params.data_mode))


def testset(ctx: TaskContext, inp: InputArtifact, params: TrainingParams) -> ImageSet:
    key = f"testset:{inp.path}:{params.test_split}:{params.image_size}"
    return ctx.cached(key, lambda: load_images(inp.path, params.test_split, size=params.image_size))


def optional_test(ctx: TaskContext, inp: InputArtifact, params: TrainingParams) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The held-out split as tensors when the artifact has one (teachers and experts report test accuracy)."""
    return tensors(testset(ctx, inp, params)) if has_split(inp.path, params.test_split) else None


def tensors(s: ImageSet) -> tuple[torch.Tensor, torch.Tensor]:
    import numpy as np

    return torch.from_numpy(np.ascontiguousarray(s.images)), torch.from_numpy(s.labels)


def has_split(path: Path, split: str) -> bool:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    index = path / "index.parquet"
    if not index.is_file():
        return False
    col = pq.read_table(index, columns=["split"]).column("split")
    return bool(pc.any(pc.equal(col, split)).as_py())
