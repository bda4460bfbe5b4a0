"""MTT: Matching Training Trajectories (Cazenavette et al., CVPR 2022), on the matching core.

Each iteration samples an expert and a start epoch t < ``max_start_epoch``, unrolls ``syn_steps`` student steps on
the synthetic set from expert[t] with the learnable step size α, and minimises the normalised distance to
expert[t + ``expert_epochs``] (distill/matching.py). Pixels and α are trained by SGD with momentum 0.5.
Departures from the released code, each a pitfall it has (distillation.md §2.6): α is kept positive by projecting
it onto [``min_lr``, ∞) after every step (the code lets it go negative and diverge); a non-finite loss or gradient
skips the update instead of writing NaN into the pixels (and fails after ``max_bad_steps`` in a row); a buffer
whose experts are too short for ``max_start_epoch + expert_epochs`` is refused (issue #4), as is a buffer trained
in another model space than the one the preset expects (issue #11).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch

from distill.matching import GRADIENT_MODES, plan_inner_steps
from distill.methods.base import DISTILL_METHODS, DistillContext, DistillMethod, MethodParams, MethodState, SetOutput
from stages.train.augment import DSAParams
from stages.train.networks import create_network


class MTTParams(MethodParams):
    syn_steps: int = 20  # N: student steps per iteration
    expert_epochs: int = 2  # M: the target is the expert M epochs after the start
    max_start_epoch: int = 20  # start epochs are drawn from 0 .. max_start_epoch - 1
    batch_syn: int | None = None  # images per student step (None: the whole set, MTT's default)
    lr_img: float = 1000.0
    lr_lr: float = 1e-5
    lr_teacher: float | None = None  # the initial α; None: the experts' own lr
    momentum: float = 0.5
    dsa: bool = True  # the DSA draws of the expert recipe's defaults, a fresh draw per student step
    gradient: str = "unrolled"  # a distill.matching.GRADIENT_MODES name
    min_lr: float = 1e-6  # α is projected onto [min_lr, ∞) after every step
    max_bad_steps: int = 10  # consecutive non-finite iterations before the run fails
    expected_space: Literal["zca", "normalize"] | None = None  # the model space the preset was published in


@DISTILL_METHODS.register()
class MTT(DistillMethod[MTTParams]):
    name = "mtt"
    Params = MTTParams
    needs = frozenset({"experts"})
    presets_file = Path(__file__).with_name("presets") / "mtt.yaml"

    def check(self, params: MTTParams, ctx: DistillContext) -> None:
        buf = ctx.experts
        if buf is None:
            raise ValueError("mtt needs an experts input (a buffer of expert trajectories)")
        need = params.max_start_epoch - 1 + params.expert_epochs
        if need > buf.epochs:
            raise ValueError(f"max_start_epoch {params.max_start_epoch} and expert_epochs {params.expert_epochs} "
                             f"reach epoch {need}, but the experts hold {buf.epochs} epochs (MTT issue #4: "
                             f"max_start_epoch must be at most epochs - expert_epochs + 1)")
        if buf.num_classes != ctx.num_classes:
            raise ValueError(f"the experts classify {buf.num_classes} classes, the data has {ctx.num_classes}")
        buf.check_space(ctx.space)
        if params.expected_space is not None and ctx.space.kind != params.expected_space:
            raise ValueError(f"this preset was published in a {params.expected_space!r} model space but the experts "
                             f"were trained in {ctx.space.kind!r}; train experts with that normalization or set "
                             f"expected_space: null to run anyway")
        if params.gradient not in GRADIENT_MODES:
            GRADIENT_MODES.get(params.gradient)  # raises, listing the modes

    def start(self, params: MTTParams, ctx: DistillContext) -> MethodState:
        buf = ctx.experts
        self._net = create_network(buf.network, buf.num_classes, **buf.network_kwargs).to(ctx.device)
        images = ctx.init_images.detach().clone().to(ctx.device).requires_grad_(True)
        lr = torch.tensor(float(params.lr_teacher if params.lr_teacher is not None else buf.lr),
                          device=ctx.device).requires_grad_(True)
        opts = {"images": torch.optim.SGD([images], lr=params.lr_img, momentum=params.momentum),
                "lr": torch.optim.SGD([lr], lr=params.lr_lr, momentum=params.momentum)}
        gen = torch.Generator().manual_seed(ctx.seed)
        return MethodState({"images": images, "lr": lr}, opts, gen, {"bad_in_a_row": 0, "skipped": 0})

    def step(self, state: MethodState, params: MTTParams, ctx: DistillContext, iteration: int) -> dict[str, float]:
        buf, gen = ctx.experts, state.generator
        images, lr = state.tensors["images"], state.tensors["lr"]
        expert = int(torch.randint(len(buf), (1,), generator=gen))
        start_epoch = int(torch.randint(params.max_start_epoch, (1,), generator=gen))
        start, target = (t.to(ctx.device) for t in buf.pair(expert, start_epoch, start_epoch + params.expert_epochs))
        plan = plan_inner_steps(len(images), params.syn_steps, params.batch_syn, image_shape=tuple(images.shape[1:]),
                                dsa=DSAParams() if params.dsa else None, generator=gen)
        res = GRADIENT_MODES.get(params.gradient)(self._net, images, ctx.init_labels.to(ctx.device), lr, start,
                                                  target, plan)
        finite = all(bool(torch.isfinite(t).all()) for t in (res.grad_images, res.grad_lr) if t is not None)
        if not (finite and torch.isfinite(torch.tensor(res.loss))):
            state.extra["bad_in_a_row"] += 1
            state.extra["skipped"] += 1
            if state.extra["bad_in_a_row"] >= params.max_bad_steps:
                raise FloatingPointError(f"mtt: {params.max_bad_steps} iterations in a row gave a non-finite loss "
                                         f"or gradient (lr_img {params.lr_img} too high? bad experts?)")
            return {"loss": float("nan"), "lr": float(lr.detach()), "skipped": 1.0}
        state.extra["bad_in_a_row"] = 0
        for name, t, g in (("images", images, res.grad_images), ("lr", lr, res.grad_lr)):
            state.optimizers[name].zero_grad(set_to_none=True)
            t.grad = g
            state.optimizers[name].step()
        with torch.no_grad():
            lr.clamp_(min=params.min_lr)
        return {"loss": res.loss, "lr": float(lr.detach()), "expert": float(expert), "start_epoch": float(start_epoch)}

    def result(self, state: MethodState, params: MTTParams, ctx: DistillContext) -> SetOutput:
        return SetOutput(state.tensors["images"].detach().cpu().float(), ctx.init_labels.cpu(),
                         self.learned_lr(state), {"kind": "hard"})
