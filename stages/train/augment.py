"""Batch augmentations on device tensors (N, C, H, W), all differentiable w.r.t. the images.

* ``dsa``: Differentiable Siamese Augmentation (Zhao & Bilen), the augmentation of the DC/DSA/DM/MTT family, with
  the DSA code's defaults. Distillation back-propagates through it into the synthetic pixels, so every op is a
  differentiable tensor op (no PIL, no in-place writes on the input).
* ``crop_flip``: the cheap random-crop (reflect or zero padding) + horizontal flip that fast CIFAR trainers run on
  the GPU batch.

Randomness comes only from the ``torch.Generator`` passed in (global RNG when ``None``, as MTT's unseeded inner
loop). "Siamese" = two calls with identically seeded generators apply identical transforms, e.g. to a real and a
synthetic batch. Random parameters are drawn on the generator's device, so a CPU generator gives the same
augmentation on CPU and GPU.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Literal, Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, field_validator
from torch import Tensor

from pipeline.registry import Registry


class Augment(Protocol):
    def __call__(self, x: Tensor, *, generator: torch.Generator | None = None) -> Tensor: ...


AUGMENTATIONS: Registry[Callable[..., Augment]] = Registry("augmentation")


class _Draw:
    """Per-sample random draws for one batch; ``shared`` draws once and broadcasts (DSA's seeded batch mode)."""

    def __init__(self, batch: int, device: torch.device, generator: torch.Generator | None,
                 shared: bool = False) -> None:
        self.n, self.g, self.out, self.batch = (1 if shared else batch), generator, device, batch
        self.dev = generator.device if generator is not None else device

    def _fit(self, t: Tensor) -> Tensor:
        return t.to(self.out).expand(self.batch)

    def uniform(self) -> Tensor:
        return self._fit(torch.rand(self.n, generator=self.g, device=self.dev))

    def randint(self, low: int, high: int) -> Tensor:
        return self._fit(torch.randint(low, high, (self.n,), generator=self.g, device=self.dev))


# --------------------------------------------------------------------------------------------------------------
# Shared primitives


def translate(x: Tensor, dy: Tensor, dx: Tensor, pad: int, mode: Literal["zeros", "reflect"] = "zeros") -> Tensor:
    """Shift each image by integer (dy, dx) with |d| <= pad, filling from zero or reflect padding.

    Equals a random crop of the padded image; done as two gathers so it is differentiable and needs no loop.
    """
    if pad <= 0:
        return x
    b, c, h, w = x.shape
    xp = F.pad(x, (pad,) * 4, mode="constant" if mode == "zeros" else "reflect")
    rows = (torch.arange(h, device=x.device) + pad + dy[:, None]).clamp(0, h + 2 * pad - 1)
    cols = (torch.arange(w, device=x.device) + pad + dx[:, None]).clamp(0, w + 2 * pad - 1)
    xp = xp.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * pad))
    return xp.gather(3, cols[:, None, None, :].expand(b, c, h, w))


def random_flip(x: Tensor, prob: float, draw: _Draw) -> Tensor:
    """Horizontal flip of each image with probability ``prob``."""
    return torch.where((draw.uniform() < prob).view(-1, 1, 1, 1), x.flip(3), x)


def _affine(x: Tensor, a: Tensor, b: Tensor, c: Tensor, d: Tensor) -> Tensor:
    """Warp by the per-sample 2x2 matrix [[a, b], [c, d]] (no translation), bilinear, as DSA (align_corners)."""
    zero = torch.zeros_like(a)
    theta = torch.stack([torch.stack([a, b, zero], 1), torch.stack([c, d, zero], 1)], 1).to(x.dtype)
    grid = F.affine_grid(theta, list(x.shape), align_corners=True)
    return F.grid_sample(x, grid, align_corners=True)


# --------------------------------------------------------------------------------------------------------------
# DSA


class DSAParams(BaseModel):
    """DSA settings; defaults are the DC/DSA/MTT code's ``ParamDiffAug``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    strategy: str = "color_crop_cutout_flip_scale_rotate"
    mode: Literal["S", "M"] = "S"  # S: one family per call (same for the batch); M: every family in order
    prob_flip: float = 0.5
    ratio_scale: float = 1.2
    ratio_rotate: float = 15.0  # degrees
    ratio_crop_pad: float = 0.125
    ratio_cutout: float = 0.5
    brightness: float = 1.0
    saturation: float = 2.0
    contrast: float = 0.5
    shared: bool = False  # one parameter draw for the whole batch (the DSA code's seeded "batch mode")
    flip_first: bool = False  # FYI's variant of mode S: always random-flip, then one of the other families

    @field_validator("strategy")
    @classmethod
    def _known(cls, v: str) -> str:
        bad = [f for f in _families(v) if f not in DSA_FAMILIES]
        if bad:
            raise ValueError(f"unknown DSA families {bad}; known: {sorted(DSA_FAMILIES)}")
        return v

    @property
    def families(self) -> list[str]:
        return _families(self.strategy)


def _families(strategy: str) -> list[str]:
    return [] if strategy.lower() in ("", "none") else strategy.split("_")


# Each DSA op is a pair: ``draw(params, draw, image_shape) -> {name: per-sample tensor}`` and a pure
# ``apply(x, **drawn)``, so a test (or a siamese caller) can fix the draws and check the transform by hand.
Drawn = dict[str, Any]


def apply_brightness(x: Tensor, shift: Tensor) -> Tensor:
    return x + shift.view(-1, 1, 1, 1).to(x.dtype)


def apply_saturation(x: Tensor, factor: Tensor) -> Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * factor.view(-1, 1, 1, 1).to(x.dtype) + mean


def apply_contrast(x: Tensor, factor: Tensor) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * factor.view(-1, 1, 1, 1).to(x.dtype) + mean


def apply_crop(x: Tensor, dy: Tensor, dx: Tensor, pad: int) -> Tensor:
    """out[i, j] = x[i + dy, j + dx], zero outside (DSA's rand_crop: nearest-pixel shift, zero fill)."""
    return translate(x, dy, dx, pad, "zeros")


def apply_cutout(x: Tensor, top: Tensor, left: Tensor, height: int, width: int) -> Tensor:
    """Zero the ``height x width`` square at (``top``, ``left``) (may start outside; clipped at the border)."""
    h, w = x.shape[2:]
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_y = (ys >= top[:, None]) & (ys < top[:, None] + height)
    in_x = (xs >= left[:, None]) & (xs < left[:, None] + width)
    keep = ~(in_y[:, :, None] & in_x[:, None, :])
    return x * keep[:, None].to(x.dtype)


def apply_flip(x: Tensor, flip: Tensor) -> Tensor:
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


def apply_scale(x: Tensor, sx: Tensor, sy: Tensor) -> Tensor:
    zero = torch.zeros_like(sx)
    return _affine(x, sx, zero, zero, sy)


def apply_rotate(x: Tensor, angle: Tensor) -> Tensor:
    """Rotate by ``angle`` radians: theta = [[cos, -sin], [sin, cos]] as DSA's rand_rotate."""
    cos, sin = torch.cos(angle), torch.sin(angle)
    return _affine(x, cos, -sin, sin, cos)


def _draw_brightness(p: DSAParams, d: _Draw, shape: tuple[int, ...]) -> Drawn:
    return {"shift": (d.uniform() - 0.5) * p.brightness}


def _draw_saturation(p: DSAParams, d: _Draw, shape: tuple[int, ...]) -> Drawn:
    return {"factor": d.uniform() * p.saturation}


def _draw_contrast(p: DSAParams, d: _Draw, shape: tuple[int, ...]) -> Drawn:
    return {"factor": d.uniform() + p.contrast}


def _draw_crop(p: DSAParams, d: _Draw, shape: tuple[int, ...]) -> Drawn:
    sy, sx = (int(s * p.ratio_crop_pad + 0.5) for s in shape[2:])
    return {"dy": d.randint(-sy, sy + 1), "dx": d.randint(-sx, sx + 1), "pad": max(sy, sx)}


def _draw_cutout(p: DSAParams, d: _Draw, shape: tuple[int, ...]) -> Drawn:
    h, w = shape[2:]
    ch, cw = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
    return {"top": d.randint(0, h + (1 - ch % 2)) - ch // 2, "left": d.randint(0, w + (1 - cw % 2)) - cw // 2,
            "height": ch, "width": cw}


def _draw_flip(p: DSAParams, d: _Draw, shape: tuple[int, ...]) -> Drawn:
    return {"flip": d.uniform() < p.prob_flip}


def _draw_scale(p: DSAParams, d: _Draw, shape: tuple[int, ...]) -> Drawn:
    r = p.ratio_scale
    return {"sx": d.uniform() * (r - 1.0 / r) + 1.0 / r, "sy": d.uniform() * (r - 1.0 / r) + 1.0 / r}


def _draw_rotate(p: DSAParams, d: _Draw, shape: tuple[int, ...]) -> Drawn:
    return {"angle": (d.uniform() - 0.5) * 2 * p.ratio_rotate / 180 * math.pi}


DrawFn = Callable[[DSAParams, _Draw, tuple[int, ...]], Drawn]
DSA_OPS: dict[str, tuple[DrawFn, Callable[..., Tensor]]] = {
    "brightness": (_draw_brightness, apply_brightness),
    "saturation": (_draw_saturation, apply_saturation),
    "contrast": (_draw_contrast, apply_contrast),
    "crop": (_draw_crop, apply_crop),
    "cutout": (_draw_cutout, apply_cutout),
    "flip": (_draw_flip, apply_flip),
    "scale": (_draw_scale, apply_scale),
    "rotate": (_draw_rotate, apply_rotate),
}
# a family is the ops it applies, in order (DSA's AUGMENT_FNS)
DSA_FAMILIES: dict[str, tuple[str, ...]] = {
    "color": ("brightness", "saturation", "contrast"),
    "crop": ("crop",),
    "cutout": ("cutout",),
    "flip": ("flip",),
    "scale": ("scale",),
    "rotate": ("rotate",),
}

DSAPlan = list[tuple[str, Drawn]]  # (op name, its draws) in application order


def plan_dsa(params: DSAParams, shape: tuple[int, ...], generator: torch.Generator | None = None,
             device: torch.device | str = "cpu") -> DSAPlan:
    """Every random choice of one DSA call for a batch of ``shape``. In mode 'S' the family is picked *before*
    any per-sample draw, so identically seeded calls pick the same family whatever their batch sizes (siamese
    real vs synthetic batches); with ``shared`` they also draw the same parameters."""
    families = params.families
    draw = _Draw(shape[0], torch.device(device), generator, params.shared)
    plan: DSAPlan = []
    chosen = families
    if params.mode == "S":
        if params.flip_first and "flip" in families:
            plan.append(("flip", _draw_flip(params, draw, shape)))
            families = [f for f in families if f != "flip"]
        chosen = []
        if families:
            pick = torch.randint(len(families), (1,), generator=generator, device=draw.dev)
            chosen = [families[int(pick)]]
    for family in chosen:
        for op in DSA_FAMILIES[family]:
            plan.append((op, DSA_OPS[op][0](params, draw, shape)))
    return plan


def apply_dsa(x: Tensor, plan: DSAPlan) -> Tensor:
    for op, drawn in plan:
        x = DSA_OPS[op][1](x, **drawn)
    return x.contiguous()


def dsa(x: Tensor, params: DSAParams = DSAParams(), generator: torch.Generator | None = None) -> Tensor:
    """Apply DSA to a float batch (N, C, H, W). Mode 'S' picks one family per call, 'M' applies all."""
    if not params.families:
        return x
    return apply_dsa(x, plan_dsa(params, tuple(x.shape), generator, x.device))


# --------------------------------------------------------------------------------------------------------------
# Fast-recipe augmentation


class CropFlipParams(BaseModel):
    """Random translation by up to ``pad`` pixels (= pad-then-crop) and a p=0.5 horizontal flip."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pad: int = 4
    padding_mode: Literal["reflect", "zeros"] = "reflect"
    flip: bool = True


def _crop_flip_draws(x: Tensor, params: CropFlipParams,
                     generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
    draw = _Draw(x.shape[0], x.device, generator)
    dy, dx = draw.randint(-params.pad, params.pad + 1), draw.randint(-params.pad, params.pad + 1)
    flip = draw.uniform() < 0.5 if params.flip else torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    return dy, dx, flip


def crop_flip(x: Tensor, params: CropFlipParams = CropFlipParams(), generator: torch.Generator | None = None) -> Tensor:
    dy, dx, flip = _crop_flip_draws(x, params, generator)
    x = translate(x, dy, dx, params.pad, params.padding_mode)
    return apply_flip(x, flip) if params.flip else x


def crop_flip_boxes(x: Tensor, params: CropFlipParams = CropFlipParams(),
                    generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``crop_flip`` (the same draws: an identically seeded generator gives the same views) that also says what it
    did, for LabelPooling: per sample the crop box ``(x1, y1, x2, y2)`` in [0, 1] of the image, clipped to the image
    (the padding shows no content of its own), and the flip. Crop-then-flip is written in ``label_pool``'s
    flip-then-crop convention: a flipped view's box is the mirrored box, ``flips`` True."""
    dy, dx, flip = _crop_flip_draws(x, params, generator)
    out = translate(x, dy, dx, params.pad, params.padding_mode)
    out = apply_flip(out, flip) if params.flip else out
    h, w = x.shape[2:]
    x1, x2 = (dx / w).clamp(0, 1), ((dx + w) / w).clamp(0, 1)
    y1, y2 = (dy / h).clamp(0, 1), ((dy + h) / h).clamp(0, 1)
    boxes = torch.stack([torch.where(flip, 1 - x2, x1), y1, torch.where(flip, 1 - x1, x2), y2], 1).float()
    return out, boxes, flip


def full_boxes(x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """No augmentation: the view is the whole image."""
    n = x.shape[0]
    return x, torch.tensor([[0.0, 0.0, 1.0, 1.0]], device=x.device).expand(n, 4), \
        torch.zeros(n, dtype=torch.bool, device=x.device)


def make_box_augmentation(name: str, params: dict[str, Any] | None = None) -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """The augmentation ``name`` returning ``(views, boxes, flips)`` for LabelPooling; only geometric crops whose box
    is known qualify (``crop_flip``, ``none``)."""
    if name == "crop_flip":
        return functools.partial(crop_flip_boxes, params=CropFlipParams(**(params or {})))
    if name == "none":
        return full_boxes
    raise ValueError(f"label maps need the crop box of every view: augmentation '{name}' does not expose it "
                     "(use crop_flip or none)")


# --------------------------------------------------------------------------------------------------------------
# Registry: name -> factory(**params) -> Augment (called as ``aug(x, generator=g)``; picklable partials)


def _identity(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    return x


@AUGMENTATIONS.register("none")
def _make_none() -> Augment:
    return _identity


@AUGMENTATIONS.register("dsa")
def _make_dsa(**params: Any) -> Augment:
    return functools.partial(dsa, params=DSAParams(**params))


@AUGMENTATIONS.register("crop_flip")
def _make_crop_flip(**params: Any) -> Augment:
    return functools.partial(crop_flip, params=CropFlipParams(**params))


def make_augmentation(name: str, params: dict[str, Any] | None = None) -> Augment:
    """Build a registered augmentation; unknown parameter names are errors."""
    return AUGMENTATIONS.get(name)(**(params or {}))
