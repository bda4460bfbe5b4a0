"""Training losses for hard labels, stored soft labels and on-the-fly teachers, behind one ``make_loss(spec)``.

Every loss is called as ``loss(logits, target, teacher_logits=None)``: ``target`` is int64 class ids or float
probability rows (TESLA / FKD-style stored labels); ``teacher_logits`` come from a teacher run on the same
augmented view. Losses are computed in float32 even under bf16 autocast.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from pipeline.registry import Registry

LossFn = Callable[..., Tensor]
LOSSES: Registry[LossFn] = Registry("loss")


class LossSpec(BaseModel):
    """Which loss and its knobs: ``ce`` | ``kd`` | ``mixed`` = (1 - alpha) * CE + alpha * KD."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "ce"
    label_smoothing: float = 0.0  # CE only
    temperature: float = 4.0  # KD only
    alpha: float = 0.5  # weight of KD in 'mixed'


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """CE with int targets or probability rows (then it is soft-label CE, as TESLA evaluates)."""
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def kd_loss(student_logits: Tensor, teacher: Tensor, temperature: float = 4.0, *,
            teacher_is_prob: bool = False) -> Tensor:
    """Hinton/FKD distillation: T^2 * KL(softmax(t/T) || softmax(s/T)), averaged over the batch.

    The T^2 factor keeps gradient magnitudes comparable across temperatures. With ``teacher_is_prob`` the
    teacher rows are already probabilities (stored labels) and are used as given.
    """
    t = temperature
    log_ps = F.log_softmax(student_logits.float() / t, dim=-1)
    if teacher_is_prob:
        pt = teacher.float()
        plogp = torch.special.xlogy(pt, pt)  # 0 log 0 = 0 for sparse stored labels
    else:
        log_pt = F.log_softmax(teacher.float() / t, dim=-1)
        pt = log_pt.exp()
        plogp = pt * log_pt
    return (plogp - pt * log_ps).sum(-1).mean() * (t * t)


@LOSSES.register("ce")
def _ce(spec: LossSpec, logits: Tensor, target: Tensor, teacher_logits: Tensor | None = None) -> Tensor:
    return cross_entropy(logits, target, spec.label_smoothing)


@LOSSES.register("kd")
def _kd(spec: LossSpec, logits: Tensor, target: Tensor, teacher_logits: Tensor | None = None) -> Tensor:
    if teacher_logits is not None:
        return kd_loss(logits, teacher_logits, spec.temperature)
    if target.is_floating_point():
        return kd_loss(logits, target, spec.temperature, teacher_is_prob=True)
    raise ValueError("the 'kd' loss needs a teacher or probability targets, got int class labels only")


@LOSSES.register("mixed")
def _mixed(spec: LossSpec, logits: Tensor, target: Tensor, teacher_logits: Tensor | None = None) -> Tensor:
    return (1 - spec.alpha) * _ce(spec, logits, target) + spec.alpha * _kd(spec, logits, target, teacher_logits)


def make_loss(spec: LossSpec | dict[str, Any] | str = "ce") -> LossFn:
    """``loss(logits, target, teacher_logits=None) -> scalar`` for a spec, a dict of its fields or a name."""
    if isinstance(spec, str):
        spec = LossSpec(name=spec)
    spec = LossSpec.model_validate(spec)
    return functools.partial(LOSSES.get(spec.name), spec)
