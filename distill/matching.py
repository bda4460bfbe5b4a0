"""The trajectory-matching core every trajectory method (MTT, FTD, TESLA, FYI-MTT) stands on.

One *matching problem* is: start a student at an expert's parameters θ₀ = expert[t], take N SGD steps on the
synthetic set with the learnable step size α, and compare where it lands with the expert M epochs later:

    L = ‖θ_N − θ*‖² / ‖θ₀ − θ*‖²,   θ_{i+1} = θ_i − α ∇_θ CE(f(θ_i, A_i(x[B_i])), y[B_i])

Every random choice of one iteration (which images go into step i's batch B_i, which DSA draw A_i they get) is
drawn up front into a :class:`MatchingPlan`, so the loss is a deterministic function of (x, α): gradients can be
checked against finite differences, and a gradient mode that recomputes steps replays exactly the same ones.
How the gradient of L is computed is a *gradient mode* (``GRADIENT_MODES``): ``unrolled`` back-propagates
through the whole graph (MTT; memory grows with N). Other modes (first-order, exact constant-memory) register here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.registry import Registry
from stages.train.augment import DSAParams, DSAPlan, apply_dsa, plan_dsa
from stages.train.networks import functional_forward


@dataclass(frozen=True)
class InnerStep:
    """Step i of the student's inner loop: which synthetic rows it trains on and their augmentation draw."""

    rows: Tensor  # int64 indices into the synthetic set
    augment: DSAPlan | None  # None: no augmentation


@dataclass(frozen=True)
class MatchingPlan:
    steps: tuple[InnerStep, ...]

    def __len__(self) -> int:
        return len(self.steps)


def plan_inner_steps(n_images: int, steps: int, batch: int | None, *, image_shape: tuple[int, ...],
                     dsa: DSAParams | None, generator: torch.Generator) -> MatchingPlan:
    """The rows and DSA draws of N inner steps: the synthetic set in a fresh random permutation, cut into chunks
    of ``batch`` (None: the whole set every step, as MTT's default ``batch_syn``), a new permutation when one
    runs out (MTT's ``indices_chunks``)."""
    batch = n_images if batch is None else min(batch, n_images)
    pending: list[Tensor] = []
    out = []
    for _ in range(steps):
        if not pending:
            pending = list(torch.randperm(n_images, generator=generator).split(batch))
            pending = [c for c in pending if len(c) == batch] or pending  # a short tail chunk is dropped
        rows = pending.pop(0)
        draw = plan_dsa(dsa, (len(rows), *image_shape), generator) if dsa is not None and dsa.families else None
        out.append(InnerStep(rows, draw))
    return MatchingPlan(tuple(out))


def inner_loss(net: nn.Module, theta: Tensor, x: Tensor, y: Tensor, step: InnerStep) -> Tensor:
    """The student's training loss at step i (cross-entropy on hard labels, soft cross-entropy on float ones)."""
    xb = x[step.rows]
    if step.augment is not None:
        xb = apply_dsa(xb, step.augment)
    logits = functional_forward(net, theta, xb)
    yb = y[step.rows]
    if yb.is_floating_point():
        return -(yb * F.log_softmax(logits, 1)).sum(1).mean()
    return F.cross_entropy(logits, yb)


def distance_ratio(theta_n: Tensor, start: Tensor, target: Tensor) -> Tensor:
    """MTT's normalised parameter distance ‖θ_N − θ*‖² / ‖θ₀ − θ*‖² (the code's division by P cancels)."""
    return (theta_n - target).pow(2).sum() / (start - target).pow(2).sum()


def unroll(net: nn.Module, x: Tensor, y: Tensor, lr: Tensor, start: Tensor, plan: MatchingPlan, *,
           create_graph: bool = True) -> Tensor:
    """θ_N after the plan's steps from ``start``, keeping the graph through every step (x and lr stay in it)."""
    theta = start.detach().clone().requires_grad_(True)
    for step in plan.steps:
        g, = torch.autograd.grad(inner_loss(net, theta, x, y, step), theta, create_graph=create_graph)
        theta = theta - lr * g
    return theta


@dataclass
class MatchResult:
    loss: float  # the distance ratio L
    start_distance: float  # ‖θ₀ − θ*‖²
    grad_images: Tensor
    grad_lr: Tensor | None


def unrolled_gradient(net: nn.Module, x: Tensor, y: Tensor, lr: Tensor, start: Tensor, target: Tensor,
                      plan: MatchingPlan) -> MatchResult:
    """∂L/∂x and ∂L/∂α by back-propagation through the whole unrolled graph: exact, memory O(N) (MTT)."""
    xs = x.detach().requires_grad_(True)
    lr_ = lr.detach().requires_grad_(lr.requires_grad)
    theta_n = unroll(net, xs, y, lr_, start, plan)
    loss = distance_ratio(theta_n, start, target)
    wrt = [xs, lr_] if lr_.requires_grad else [xs]
    grads = torch.autograd.grad(loss, wrt)
    return MatchResult(float(loss.detach()), float((start - target).pow(2).sum()), grads[0],
                       grads[1] if len(grads) > 1 else None)


GradientMode = Callable[[nn.Module, Tensor, Tensor, Tensor, Tensor, Tensor, MatchingPlan], MatchResult]
GRADIENT_MODES: Registry[GradientMode] = Registry("gradient mode")
GRADIENT_MODES.register("unrolled")(unrolled_gradient)
