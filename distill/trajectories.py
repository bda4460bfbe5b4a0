"""Expert trajectories for trajectory matching (MTT, FTD, TESLA, FYI-MTT): the buffer protocol and its training.

Each expert is trained from a seeded random init by the reference trainer; its flat parameters are recorded at
init and after every epoch and written in the buffer format of ``distill/buffer.py``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.buffer import Expert, ExpertBuffer, ExpertFormatError, expert_path, load_expert, save_expert
from stages.train.losses import LossSpec
from stages.train.networks import flat_params
from stages.train.recipes import AugSpec, Recipe, ScheduleSpec
from stages.train.trainer import train


def expert_recipe(network: str = "convnet", network_kwargs: dict[str, Any] | None = None, *, epochs: int = 50,
                  lr: float = 0.01, batch_size: int = 256, augmentation: AugSpec | None = None) -> Recipe:
    """The buffer protocol of MTT/TESLA: SGD, constant lr, momentum 0, weight decay 0, DSA, CE."""
    return Recipe(name="expert", network=network, network_kwargs=network_kwargs or {}, epochs=epochs,
                  batch_size=batch_size, optimizer="sgd", lr=lr, momentum=0.0, weight_decay=0.0,
                  schedule=ScheduleSpec(name="constant"), augmentation=augmentation or AugSpec(name="dsa"),
                  loss=LossSpec(name="ce"))


def train_expert(images: Tensor, labels: Tensor, *, num_classes: int, seed: int = 0,
                 device: str | torch.device = "cpu", network: str = "convnet",
                 network_kwargs: dict[str, Any] | None = None, epochs: int = 50, lr: float = 0.01,
                 batch_size: int = 256, augmentation: AugSpec | None = None, **train_kwargs: Any) -> Expert:
    """Train one expert from a seeded random init and record its flat parameters at init and every epoch.

    ``train_kwargs`` go to ``trainer.train`` (mean/std, test, ...); checkpointing is per expert file instead.
    """
    recipe = expert_recipe(network, network_kwargs, epochs=epochs, lr=lr, batch_size=batch_size,
                           augmentation=augmentation)
    snapshots: list[Tensor] = []

    def record(epoch: int, model: nn.Module, _: Any) -> None:
        snapshots.append(flat_params(model).float().cpu())

    result = train(images, labels, recipe, num_classes=num_classes, seed=seed, device=device, callback=record,
                   **train_kwargs)
    kwargs = {k: v for k, v in result.network.items() if k not in ("name", "num_classes")}
    meta = {"seed": seed, "batch_size": batch_size, "augmentation": recipe.augmentation.model_dump(mode="json"),
            "mean": result.mean, "std": result.std, "test": result.test, "wall_time": result.wall_time}
    return Expert(network, kwargs, num_classes, epochs, float(lr), torch.stack(snapshots), meta)


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
