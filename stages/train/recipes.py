"""Training recipes as data: a validated ``Recipe`` model, YAML files in ``stages/recipes/`` and a registry.

A recipe says *how* to train (network, optimiser, schedule, augmentation, loss, precision); the trainer says *on
what*. Shipped recipes: ``standard-dd`` (MTT-family evaluation protocol), ``standard-resnet`` (ResNet-18, cosine)
and ``fast`` (airbench94-like). Other packages can register a YAML path or a ``Recipe`` under a new name.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.registry import Registry
from stages.train.augment import make_augmentation
from stages.train.losses import LossSpec, make_loss

RECIPE_DIR = Path(__file__).with_name("recipes")
RECIPES: Registry[Path | "Recipe"] = Registry("recipe")


class ScheduleSpec(BaseModel):
    """Learning-rate factor per optimiser step (multiplies ``Recipe.lr``).

    * ``constant``; ``step``: x ``gamma`` from epoch index ``int(m * epochs) + 1`` for each milestone fraction
      ``m`` (MTT evaluation: x0.1 at ``epochs // 2 + 1``); ``cosine`` to ``end``; ``linear`` decay to ``end``.
    * ``warmup`` > 0 (fraction of all steps) first ramps linearly from ``start`` to 1: with ``linear`` this is
      airbench's triangular one-cycle schedule.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["constant", "step", "cosine", "linear"] = "constant"
    warmup: float = Field(0.0, ge=0.0, lt=1.0)
    start: float = 0.0
    end: float = 0.0
    milestones: tuple[float, ...] = (0.5,)
    gamma: float = 0.1


def lr_factor(schedule: ScheduleSpec, step: int, steps_per_epoch: int, epochs: int) -> float:
    """Pure function of the step, so a resumed run needs only the step counter to continue the schedule."""
    total = steps_per_epoch * epochs
    warm = int(schedule.warmup * total)
    if step < warm:
        return schedule.start + (1.0 - schedule.start) * step / warm
    if schedule.name == "step":
        epoch = step // steps_per_epoch
        return schedule.gamma ** sum(epoch >= int(m * epochs) + 1 for m in schedule.milestones)
    progress = (step - warm) / max(1, total - warm)
    if schedule.name == "cosine":
        return schedule.end + (1.0 - schedule.end) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule.name == "linear":
        return 1.0 + (schedule.end - 1.0) * progress
    return 1.0


class AugSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "none"  # a member of stages.train.augment.AUGMENTATIONS
    params: dict[str, Any] = Field(default_factory=dict)


class Recipe(BaseModel):
    """Everything the reference trainer needs besides the data. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "custom"
    description: str = ""
    network: str  # a member of stages.train.networks.NETWORKS or 'timm:<model>'
    network_kwargs: dict[str, Any] = Field(default_factory=dict)
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0)
    drop_last: bool = False  # keep False for tiny synthetic sets
    optimizer: Literal["sgd", "nesterov", "adamw"] = "sgd"
    lr: float = Field(gt=0)
    momentum: float = 0.9  # SGD momentum; AdamW beta1
    weight_decay: float = 0.0
    norm_lr_scale: float = 1.0  # lr x this for normalisation-layer params, wd / this (airbench's bias_scaler)
    schedule: ScheduleSpec = ScheduleSpec()
    augmentation: AugSpec = AugSpec()
    loss: LossSpec = LossSpec()
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast, CUDA only
    channels_last: bool = False  # NHWC memory format (faster for BatchNorm conv nets on CPU and GPU)
    eval_batch_size: int = Field(1024, gt=0)

    @model_validator(mode="after")
    def _buildable(self) -> "Recipe":
        make_augmentation(self.augmentation.name, self.augmentation.params)  # fail at load, not mid-training
        make_loss(self.loss)
        return self

    @property
    def label_smoothing(self) -> float:
        return self.loss.label_smoothing

    def with_overrides(self, **changes: Any) -> "Recipe":
        """A validated copy with top-level fields replaced (nested specs may be given as dicts)."""
        return Recipe.model_validate({**self.model_dump(), **changes})


class RecipeError(ValueError):
    """A recipe file that cannot be read or validated; the message names the file."""


def _read(path: Path) -> Recipe:
    try:
        data = yaml.safe_load(path.read_text())
        return Recipe.model_validate(data)
    except (OSError, yaml.YAMLError, ValidationError) as e:
        raise RecipeError(f"{path}: invalid recipe: {e}") from e


def load_recipe(name_or_path: str | os.PathLike[str], **overrides: Any) -> Recipe:
    """A registered recipe by name, or a YAML file by path, with optional top-level overrides."""
    key = os.fspath(name_or_path)
    if key in RECIPES:
        entry = RECIPES.get(key)
        recipe = entry if isinstance(entry, Recipe) else _read(Path(entry))
    elif Path(key).suffix in (".yaml", ".yml") or Path(key).exists():
        recipe = _read(Path(key))
    else:
        RECIPES.get(key)  # raises, listing the available names
        raise AssertionError("unreachable")
    return recipe.with_overrides(**overrides) if overrides else recipe


for _path in sorted(RECIPE_DIR.glob("*.yaml")):
    RECIPES.add(_path.stem, _path)
