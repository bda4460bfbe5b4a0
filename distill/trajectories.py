"""Expert trajectories for trajectory matching (MTT, FTD, TESLA, FYI-MTT): the buffer protocol and its training.

Each expert is trained from a seeded random init by the reference trainer under the ``mtt-expert`` recipe (or
another); its flat parameters are recorded at init and after every epoch and written in the buffer format of
``distill/buffer.py``, with the model space it was trained in (distillation must use the same one).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from distill.buffer import Expert, ExpertBuffer, ExpertFormatError, expert_path, load_expert, save_expert
from stages.train.networks import flat_params
from stages.train.recipes import Recipe, load_recipe
from stages.train.trainer import train

EXPERT_RECIPE = "mtt-expert"


def expert_recipe(**overrides: Any) -> Recipe:
    """The buffer protocol of MTT/TESLA (``mtt-expert``): SGD, constant lr, momentum 0, weight decay 0, DSA, CE."""
    return load_recipe(EXPERT_RECIPE, **overrides)


def train_expert(images: Tensor, labels: Tensor, *, num_classes: int, seed: int = 0,
                 device: str | torch.device = "cpu", recipe: Recipe | None = None,
                 on_epoch: Callable[[int, nn.Module, Any], None] | None = None, **train_kwargs: Any) -> Expert:
    """Train one expert from a seeded random init and record its flat parameters at init and every epoch.

    ``train_kwargs`` go to ``trainer.train`` (space, test, ...); ``on_epoch`` also sees every epoch (progress);
    checkpointing is per expert file instead.
    """
    recipe = recipe or expert_recipe()
    snapshots: list[Tensor] = []

    def record(epoch: int, model: nn.Module, stats: Any) -> None:
        snapshots.append(flat_params(model).float().cpu())
        if on_epoch is not None:
            on_epoch(epoch, model, stats)

    result = train(images, labels, recipe, num_classes=num_classes, seed=seed, device=device, callback=record,
                   **train_kwargs)
    kwargs = {k: v for k, v in result.network.items() if k not in ("name", "num_classes")}
    meta = {"seed": seed, "batch_size": recipe.batch_size, "augmentation": recipe.augmentation.model_dump(mode="json"),
            "recipe": recipe.model_dump(mode="json"),
            "model_space": result.space.describe() if result.space is not None else None,
            "test": result.test, "wall_time": result.wall_time}
    return Expert(recipe.network, kwargs, num_classes, recipe.total_epochs, float(recipe.lr), torch.stack(snapshots),
                  meta)


def build_expert_buffer(directory: str | Path, images: Tensor, labels: Tensor, *, num_experts: int,
                        num_classes: int, seed: int = 0, **expert_kwargs: Any) -> ExpertBuffer:
    """Train experts ``0..num_experts-1`` (seed ``seed + i``) into ``directory``; valid files are kept, so a
    killed build resumes at the first missing or broken expert."""
    for i in range(num_experts):
        path = expert_path(directory, i)
        if path.exists():
            try:
                load_expert(path)
                continue
            except ExpertFormatError:
                pass  # retrain a broken file
        save_expert(path, train_expert(images, labels, num_classes=num_classes, seed=seed + i, **expert_kwargs))
    return ExpertBuffer(directory)
