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

    def __init__(self, x: Tensor, generator: torch.Generator | None, shared: bool = False) -> None:
        self.n, self.g, self.out = (1 if shared else x.shape[0]), generator, x.device
        self.batch = x.shape[0]
        self.dev = generator.device if generator is not None else x.device

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


def _brightness(x: Tensor, p: DSAParams, d: _Draw) -> Tensor:
    return x + (d.uniform() - 0.5).view(-1, 1, 1, 1) * p.brightness


def _saturation(x: Tensor, p: DSAParams, d: _Draw) -> Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * (d.uniform() * p.saturation).view(-1, 1, 1, 1) + mean


def _contrast(x: Tensor, p: DSAParams, d: _Draw) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (d.uniform() + p.contrast).view(-1, 1, 1, 1) + mean


def _crop(x: Tensor, p: DSAParams, d: _Draw) -> Tensor:
    sy, sx = (int(s * p.ratio_crop_pad + 0.5) for s in x.shape[2:])  # DSA: nearest-pixel shift, zero fill
    return translate(x, d.randint(-sy, sy + 1), d.randint(-sx, sx + 1), max(sy, sx), "zeros")


def _cutout(x: Tensor, p: DSAParams, d: _Draw) -> Tensor:
    h, w = x.shape[2:]
    ch, cw = int(h * p.ratio_cutout + 0.5), int(w * p.ratio_cutout + 0.5)
    y0 = d.randint(0, h + (1 - ch % 2)) - ch // 2
    x0 = d.randint(0, w + (1 - cw % 2)) - cw // 2
    ys, xs = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
    in_y = (ys >= y0[:, None]) & (ys < y0[:, None] + ch)
    in_x = (xs >= x0[:, None]) & (xs < x0[:, None] + cw)
    keep = ~(in_y[:, :, None] & in_x[:, None, :])
    return x * keep[:, None].to(x.dtype)


def _flip(x: Tensor, p: DSAParams, d: _Draw) -> Tensor:
    return random_flip(x, p.prob_flip, d)


def _scale(x: Tensor, p: DSAParams, d: _Draw) -> Tensor:
    r = p.ratio_scale
    sx = d.uniform() * (r - 1.0 / r) + 1.0 / r
    sy = d.uniform() * (r - 1.0 / r) + 1.0 / r
    zero = torch.zeros_like(sx)
    return _affine(x, sx, zero, zero, sy)


def _rotate(x: Tensor, p: DSAParams, d: _Draw) -> Tensor:
    angle = (d.uniform() - 0.5) * 2 * p.ratio_rotate / 180 * math.pi
    cos, sin = torch.cos(angle), torch.sin(angle)
    return _affine(x, cos, -sin, sin, cos)


DSA_FAMILIES: dict[str, tuple[Callable[[Tensor, DSAParams, _Draw], Tensor], ...]] = {
    "color": (_brightness, _saturation, _contrast),
    "crop": (_crop,),
    "cutout": (_cutout,),
    "flip": (_flip,),
    "scale": (_scale,),
    "rotate": (_rotate,),
}


def dsa(x: Tensor, params: DSAParams = DSAParams(), generator: torch.Generator | None = None) -> Tensor:
    """Apply DSA to a float batch (N, C, H, W). Mode 'S' picks one family per call, 'M' applies all."""
    families = params.families
    if not families:
        return x
    draw = _Draw(x, generator, params.shared)
    if params.mode == "S":
        if params.flip_first and "flip" in families:
            x = _flip(x, params, draw)
            families = [f for f in families if f != "flip"]
        if families:
            pick = torch.randint(len(families), (1,), generator=generator, device=draw.dev)
            families = [families[int(pick)]]
    for family in families:
        for fn in DSA_FAMILIES[family]:
            x = fn(x, params, draw)
    return x.contiguous()


# --------------------------------------------------------------------------------------------------------------
# Fast-recipe augmentation


class CropFlipParams(BaseModel):
    """Random translation by up to ``pad`` pixels (= pad-then-crop) and a p=0.5 horizontal flip."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    pad: int = 4
    padding_mode: Literal["reflect", "zeros"] = "reflect"
    flip: bool = True


def crop_flip(x: Tensor, params: CropFlipParams = CropFlipParams(), generator: torch.Generator | None = None) -> Tensor:
    draw = _Draw(x, generator)
    x = translate(x, draw.randint(-params.pad, params.pad + 1), draw.randint(-params.pad, params.pad + 1),
                  params.pad, params.padding_mode)
    return random_flip(x, 0.5, draw) if params.flip else x


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
