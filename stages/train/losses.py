"""Training losses for hard labels, stored soft labels and on-the-fly teachers, behind one ``make_loss(spec)``.

Every loss is called as ``loss(logits, target, teacher_logits=None)``: ``target`` is int64 class ids or float rows
of stored soft labels; ``teacher_logits`` come from a teacher run on the same augmented view. How stored soft
labels are read is the *set's* business (``SoftLabels``: logits, or probabilities produced at a stated
temperature ``T_s``), the temperature they are used at is the *recipe's* (``LossSpec.temperature``). Probabilities
made at ``T_s`` and used at ``T`` are re-tempered through their logs, ``softmax(T_s * log p / T)``, which equals
``softmax(z / T)`` for the logits ``z`` that made them; never softmaxed a second time. Losses are float32 even
under bf16 autocast.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from pipeline.registry import Registry

LossFn = Callable[..., Tensor]
LOSSES: Registry[LossFn] = Registry("loss")


class LossSpec(BaseModel):
    """Which loss and its knobs: ``ce`` | ``kd`` | ``mixed`` = (1 - alpha) * CE + alpha * KD."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "ce"
    label_smoothing: float = 0.0  # CE with hard labels only
    temperature: float = Field(4.0, gt=0)  # KD only
    t_squared: bool = True  # KD x T^2 (Hinton: keeps gradient size comparable across temperatures)
    alpha: float = 0.5  # weight of KD in 'mixed'


class SoftLabels(BaseModel):
    """What stored float targets are: ``logits``, or ``probs`` produced at ``temperature`` (TESLA: 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["probs", "logits"] = "probs"
    temperature: float = Field(1.0, gt=0)  # probs only: the temperature they were produced at

    def from_logits(self, logits: Tensor) -> Tensor:
        """Stored targets of this form for a labeller's raw ``logits`` (to label a baseline the same way)."""
        return logits.float() if self.kind == "logits" else F.softmax(logits.float() / self.temperature, -1)


def tempered_log_probs(target: Tensor, form: SoftLabels, temperature: float) -> Tensor:
    """log p_T of stored soft labels at ``temperature`` (zero probabilities give -inf)."""
    target = target.float()
    if form.kind == "logits":
        return F.log_softmax(target / temperature, -1)
    logp = torch.log(target)
    if form.temperature == temperature:
        return logp
    return F.log_softmax(logp * (form.temperature / temperature), -1)


def kd_from_log_probs(student_logits: Tensor, log_pt: Tensor, temperature: float, t_squared: bool = True) -> Tensor:
    """KL(p_t || softmax(s / T)) averaged over the batch, x T^2 when ``t_squared``; 0 log 0 = 0."""
    log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
    pt = log_pt.exp()
    plogp = torch.where(pt > 0, pt * log_pt, torch.zeros_like(pt))
    kl = (plogp - pt * log_ps).sum(-1).mean()
    return kl * (temperature * temperature) if t_squared else kl


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0, *,
            t_squared: bool = True) -> Tensor:
    """Hinton/FKD distillation against teacher logits: [T^2 *] KL(softmax(t/T) || softmax(s/T))."""
    return kd_from_log_probs(student_logits, F.log_softmax(teacher_logits.float() / temperature, -1), temperature,
                             t_squared)


def cross_entropy(logits: Tensor, target: Tensor, label_smoothing: float = 0.0,
                  form: SoftLabels = SoftLabels()) -> Tensor:
    """CE with int targets, or soft CE against stored labels read at temperature 1 (as TESLA evaluates)."""
    if target.is_floating_point():
        target = tempered_log_probs(target, form, 1.0).exp()
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


@LOSSES.register("ce")
def _ce(spec: LossSpec, form: SoftLabels, logits: Tensor, target: Tensor,
        teacher_logits: Tensor | None = None) -> Tensor:
    return cross_entropy(logits, target, spec.label_smoothing, form)


@LOSSES.register("kd")
def _kd(spec: LossSpec, form: SoftLabels, logits: Tensor, target: Tensor,
        teacher_logits: Tensor | None = None) -> Tensor:
    if teacher_logits is not None:
        return kd_loss(logits, teacher_logits, spec.temperature, t_squared=spec.t_squared)
    if target.is_floating_point():
        return kd_from_log_probs(logits, tempered_log_probs(target, form, spec.temperature), spec.temperature,
                                 spec.t_squared)
    raise ValueError("the 'kd' loss needs a teacher or soft-label targets, got int class labels only")


@LOSSES.register("mixed")
def _mixed(spec: LossSpec, form: SoftLabels, logits: Tensor, target: Tensor,
           teacher_logits: Tensor | None = None) -> Tensor:
    return (1 - spec.alpha) * _ce(spec, form, logits, target) + \
        spec.alpha * _kd(spec, form, logits, target, teacher_logits)


def make_loss(spec: LossSpec | dict[str, Any] | str = "ce", soft_labels: SoftLabels | None = None) -> LossFn:
    """``loss(logits, target, teacher_logits=None) -> scalar`` for a spec (or a dict of its fields, or a name);
    ``soft_labels`` says how float targets are stored (default: probabilities at temperature 1)."""
    if isinstance(spec, str):
        spec = LossSpec(name=spec)
    spec = LossSpec.model_validate(spec)
    return functools.partial(LOSSES.get(spec.name), spec, soft_labels or SoftLabels())
