"""Training recipes as data: a validated ``Recipe`` model, YAML files in ``stages/train/recipes/`` and a registry.

A recipe says *how* to train (network, optimiser, schedule, augmentation, loss, precision, the model space the
images are mapped into, how many evaluation networks a result averages); the trainer says *on what*. Shipped
recipes: ``standard-dd`` (MTT-family evaluation protocol), ``standard-dd-zca`` (the same in ZCA space),
``datadam`` (DataDAM's evaluation), ``mtt-expert`` (the expert-buffer protocol), ``standard-resnet`` (ResNet-18,
cosine) and ``fast`` (airbench94-like). Other packages can register a YAML path or a ``Recipe`` under a new name.

Overrides deep-merge: ``{schedule: {milestones: [0.3]}}`` changes that one field. A nested spec whose ``name`` or
``kind`` changes (another augmentation, loss, schedule or normalisation) is replaced whole, since its parameters
belong to the old member.
Dotted keys (``schedule.milestones``) are the same as nesting.
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
      ``m`` (with ``Recipe.mtt_exact``: from ``int(m * epochs) + 2``, see ``epoch_plan``); ``cosine`` to ``end``;
      ``linear`` decay to ``end``.
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


class NormSpec(BaseModel):
    """The model space uint8 images are mapped into (the same for the set, its baseline and the test split).

    * ``pool``: per-channel mean/std of the pool's training split (the shard manifest's ``image_stats``);
    * ``fixed``: the given ``mean``/``std`` (e.g. the MTT family's CIFAR-10 constants);
    * ``zca``: ZCA whitening of [0, 1] pixels fitted on the whole training split (kornia's
      ``ZCAWhitening(eps, compute_inv=True)``, as the MTT/TESLA code), no mean/std step.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["pool", "fixed", "zca"] = "pool"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    eps: float = Field(0.1, gt=0)  # zca only

    @model_validator(mode="after")
    def _consistent(self) -> "NormSpec":
        if (self.kind == "fixed") != (self.mean is not None and self.std is not None):
            raise ValueError("normalization: 'fixed' needs mean and std; other kinds take neither")
        if self.kind == "fixed" and (len(self.mean) != len(self.std) or min(self.std) <= 0):  # type: ignore[arg-type]
            raise ValueError("normalization: mean and std need one positive std per channel")
        return self


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
    # The DC/DSA/MTT/DataDAM ``evaluate_synset`` loop: epochs + 1 epochs; after epoch index int(m * epochs) + 1
    # the lr is multiplied by gamma and the optimiser is created afresh (momentum reset). Needs a step schedule.
    mtt_exact: bool = False
    augmentation: AugSpec = AugSpec()
    loss: LossSpec = LossSpec()
    normalization: NormSpec = NormSpec()
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 autocast, CUDA only
    channels_last: bool = False  # NHWC memory format (faster for BatchNorm conv nets on CPU and GPU)
    eval_batch_size: int = Field(1024, gt=0)
    eval_seeds: int = Field(3, gt=0)  # evaluation networks per result when the caller names no seeds

    @model_validator(mode="after")
    def _buildable(self) -> "Recipe":
        make_augmentation(self.augmentation.name, self.augmentation.params)  # fail at load, not mid-training
        make_loss(self.loss)
        if self.mtt_exact and (self.schedule.name != "step" or self.schedule.warmup):
            raise ValueError("mtt_exact needs a step schedule without warmup (the evaluate_synset loop)")
        return self

    @property
    def label_smoothing(self) -> float:
        return self.loss.label_smoothing

    @property
    def total_epochs(self) -> int:
        """Epochs actually run: MTT's loop runs ``range(epochs + 1)``."""
        return self.epochs + 1 if self.mtt_exact else self.epochs

    def with_overrides(self, **changes: Any) -> "Recipe":
        """A validated copy with ``changes`` deep-merged in (see the module docstring)."""
        return Recipe.model_validate(deep_merge(self.model_dump(), expand_dotted(changes)))


def expand_dotted(changes: dict[str, Any]) -> dict[str, Any]:
    """``{"schedule.milestones": [0.3]}`` -> ``{"schedule": {"milestones": [0.3]}}`` (merged with nesting)."""
    out: dict[str, Any] = {}
    for key, value in changes.items():
        *parents, leaf = key.split(".")
        nested = {leaf: value}
        for p in reversed(parents):
            nested = {p: nested}
        out = deep_merge(out, nested)
    return out


DISCRIMINATORS = ("name", "kind")  # a nested spec whose member changes is replaced, not merged


def deep_merge(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``changes`` merged in recursively; a nested dict whose ``name``/``kind`` changes is replaced."""
    out = dict(base)
    for key, value in changes.items():
        old = out.get(key)
        renamed = isinstance(value, dict) and isinstance(old, dict) and \
            any(k in value and old.get(k) != value[k] for k in DISCRIMINATORS)
        if isinstance(value, dict) and isinstance(old, dict) and not renamed:
            out[key] = deep_merge(old, value)
        else:
            out[key] = value
    return out


def epoch_plan(recipe: Recipe) -> list[tuple[float, bool]]:
    """Per epoch: (lr factor, whether the optimiser is created afresh before it) in ``mtt_exact`` mode.

    MTT/DC ``evaluate_synset``: ``for ep in range(E + 1)``: train; ``if ep in [E // 2 + 1]``: lr *= 0.1 and a new
    SGD optimiser. So epochs ``0 .. E//2+1`` run at lr and ``E//2+2 .. E`` at lr x 0.1 with fresh momentum.
    """
    s = recipe.schedule
    decays = sorted(int(m * recipe.epochs) + 2 for m in s.milestones)
    return [(s.gamma ** sum(e >= d for d in decays), e in decays) for e in range(recipe.total_epochs)]


class RecipeError(ValueError):
    """A recipe file that cannot be read or validated; the message names the file."""


def _read(path: Path) -> Recipe:
    try:
        data = yaml.safe_load(path.read_text())
        return Recipe.model_validate(data)
    except (OSError, yaml.YAMLError, ValidationError) as e:
        raise RecipeError(f"{path}: invalid recipe: {e}") from e


def load_recipe(name_or_path: str | os.PathLike[str], **overrides: Any) -> Recipe:
    """A registered recipe by name, or a YAML file by path, with optional (deep-merged) overrides."""
    key = os.fspath(name_or_path)
    if key in RECIPES:
        entry = RECIPES.get(key)
        recipe = entry if isinstance(entry, Recipe) else _read(Path(entry))
    elif Path(key).suffix in (".yaml", ".yml") or Path(key).exists():
        recipe = _read(Path(key))
    else:
        RECIPES.get(key)  # raises, listing the available names
        raise RecipeError(f"unknown recipe {key!r}")
    if not overrides:
        return recipe
    try:
        return recipe.with_overrides(**overrides)
    except ValidationError as e:
        raise RecipeError(f"{key}: invalid overrides {overrides}: {e}") from e


for _path in sorted(RECIPE_DIR.glob("*.yaml")):
    RECIPES.add(_path.stem, _path)
