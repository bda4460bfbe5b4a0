"""The model space: how uint8 pixels become the floats a network sees, the same map for a training set, its random
baseline and the test split (and the space a synthetic set's float images live in).

* ``ChannelNorm``: ``(x / 255 - mean) / std`` per channel, with the *pool's* statistics or constants a recipe fixes.
* ``ZCA``: ZCA whitening of [0, 1] pixels as kornia's ``ZCAWhitening(eps, compute_inv=True)`` (the MTT/TESLA
  code): flattened images, unbiased covariance, ``T = U (S + eps)^-1/2 U^T``, ``z = (x - mu) T``.

Both are pure maps over tensors with an inverse (``to_unit``), so a teacher trained in one space can label images
given in another (``bridge``). ``describe()`` is the JSON that manifests and metrics record; ``tensors()`` what a
safetensors file stores.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

# The MTT / DC / DataDAM code's CIFAR-10 constants (also used for CIFAR-100 there).
MTT_CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
MTT_CIFAR10_STD = (0.2023, 0.1994, 0.2010)
SPACE_FORMAT = "distillery.model-space.v1"


def channel_stats(images: Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) std of uint8 NCHW images scaled to [0, 1] (float64, chunked)."""
    total = torch.zeros(images.shape[1], dtype=torch.float64)
    sq = torch.zeros_like(total)
    for i in range(0, len(images), chunk):
        x = images[i:i + chunk].to(torch.float64) / 255.0
        total += x.sum((0, 2, 3)).cpu()
        sq += (x * x).sum((0, 2, 3)).cpu()
    n = images.numel() / images.shape[1]
    mean = total / n
    std = (sq / n - mean * mean).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def to_unit_float(x: Tensor) -> Tensor:
    """uint8 pixels -> float32 in [0, 1] (float input is taken as already in [0, 1])."""
    return x.float() / 255.0 if not x.is_floating_point() else x.float()


@dataclass(frozen=True)
class ChannelNorm:
    """Per-channel ``(u - mean) / std`` of [0, 1] pixels ``u``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: torch.device = field(default=torch.device("cpu"), compare=False)

    kind = "normalize"

    def __post_init__(self) -> None:
        if len(self.mean) != len(self.std) or min(self.std) <= 0:
            raise ValueError(f"mean {self.mean} / std {self.std}: need one positive std per channel")
        object.__setattr__(self, "_m", torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1))
        object.__setattr__(self, "_s", torch.tensor(self.std, device=self.device).view(1, -1, 1, 1))

    def from_unit(self, u: Tensor) -> Tensor:
        return (u - self._m) / self._s  # type: ignore[attr-defined]

    def to_unit(self, z: Tensor) -> Tensor:
        return z * self._s + self._m  # type: ignore[attr-defined]

    def encode(self, x: Tensor) -> Tensor:
        """uint8 NCHW -> model space (float input: [0, 1] pixels)."""
        return self.from_unit(to_unit_float(x))

    def to(self, device: torch.device | str) -> "ChannelNorm":
        return ChannelNorm(self.mean, self.std, torch.device(device))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "mean": [float(v) for v in self.mean], "std": [float(v) for v in self.std]}

    def tensors(self) -> dict[str, Tensor]:
        return {}


@dataclass(frozen=True, eq=False)
class ZCA:
    """ZCA whitening of flattened [0, 1] images: ``z = (u - mean) @ matrix``; ``u = z @ inverse + mean``."""

    mean: Tensor  # (D,)
    matrix: Tensor  # (D, D), symmetric
    inverse: Tensor  # (D, D)
    eps: float
    fitted_on: dict[str, Any] = field(default_factory=dict, compare=False)

    kind = "zca"

    def from_unit(self, u: Tensor) -> Tensor:
        flat = u.reshape(len(u), -1)
        if flat.shape[1] != self.mean.numel():
            raise ValueError(f"ZCA fitted on {self.mean.numel()} values per image, got {flat.shape[1]}")
        return ((flat - self.mean) @ self.matrix).reshape(u.shape)

    def to_unit(self, z: Tensor) -> Tensor:
        return (z.reshape(len(z), -1) @ self.inverse + self.mean).reshape(z.shape)

    def encode(self, x: Tensor) -> Tensor:
        return self.from_unit(to_unit_float(x))

    def to(self, device: torch.device | str) -> "ZCA":
        return ZCA(self.mean.to(device), self.matrix.to(device), self.inverse.to(device), self.eps, self.fitted_on)

    def digest(self) -> str:
        h = hashlib.sha256()
        for t in (self.mean, self.matrix):
            h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return h.hexdigest()

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "eps": self.eps, "dim": int(self.mean.numel()), "sha256": self.digest(),
                "fitted_on": self.fitted_on}

    def tensors(self) -> dict[str, Tensor]:
        return {"zca.mean": self.mean, "zca.matrix": self.matrix, "zca.inverse": self.inverse}


ModelSpace = ChannelNorm | ZCA


def fit_zca(images: Tensor, eps: float = 0.1, chunk: int = 2048, fitted_on: dict[str, Any] | None = None) -> ZCA:
    """Fit ZCA on ``images`` (uint8 N x C x H x W, or float in [0, 1]) like kornia's ``ZCAWhitening(eps,
    compute_inv=True).fit``: unbiased covariance of the flattened images, in float64, chunked to bound memory."""
    n = len(images)
    if n < 2:
        raise ValueError("ZCA needs at least two images (unbiased covariance)")
    flat = lambda i: to_unit_float(images[i:i + chunk]).reshape(-1, images[0].numel()).double()  # noqa: E731
    total = torch.zeros(images[0].numel(), dtype=torch.float64)
    for i in range(0, n, chunk):
        total += flat(i).sum(0)
    mean = total / n
    cov = torch.zeros(len(mean), len(mean), dtype=torch.float64)
    for i in range(0, n, chunk):
        xc = flat(i) - mean
        cov += xc.T @ xc
    cov /= n - 1
    evals, evecs = torch.linalg.eigh(cov)  # = kornia's SVD for a symmetric PSD matrix
    evals = evals.clamp_min(0)
    matrix = (evecs * (evals + eps).rsqrt()) @ evecs.T
    inverse = (evecs * (evals + eps).sqrt()) @ evecs.T
    return ZCA(mean.float(), matrix.float(), inverse.float(), float(eps),
               {"images": n, **(fitted_on or {})})


def bridge(src: ModelSpace, dst: ModelSpace) -> Callable[[Tensor], Tensor] | None:
    """A map from ``src`` space to ``dst`` space (through [0, 1] pixels), or None when they are the same space."""
    if src.describe() == dst.describe():
        return None
    return lambda z: dst.from_unit(src.to_unit(z))


def space_from(description: dict[str, Any], tensors: dict[str, Tensor] | None = None) -> ModelSpace:
    """Rebuild a space from ``describe()`` (+ ``tensors()`` for ZCA); the inverse of writing it down."""
    kind = description.get("kind")
    if kind == ChannelNorm.kind:
        return ChannelNorm(tuple(description["mean"]), tuple(description["std"]))
    if kind == ZCA.kind:
        t = tensors or {}
        missing = [k for k in ("zca.mean", "zca.matrix", "zca.inverse") if k not in t]
        if missing:
            raise ValueError(f"a ZCA model space needs the tensors {missing}")
        space = ZCA(t["zca.mean"].float(), t["zca.matrix"].float(), t["zca.inverse"].float(),
                    float(description["eps"]), dict(description.get("fitted_on", {})))
        if "sha256" in description and space.digest() != description["sha256"]:
            raise ValueError("ZCA tensors do not match the recorded sha256")
        return space
    raise ValueError(f"unknown model space kind {kind!r}; expected {ChannelNorm.kind!r} or {ZCA.kind!r}")


def save_space(path: str | Path, space: ModelSpace) -> Path:
    """A safetensors file holding the space (tensors + its description as metadata), written atomically."""
    from safetensors.torch import save_file

    from pipeline.atomic import atomic_path

    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in space.tensors().items()} or {"none": torch.zeros(0)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": SPACE_FORMAT, "model_space": json.dumps(space.describe())})
    return path


def load_space(path: str | Path) -> ModelSpace:
    """Read a ``save_space`` file (safetensors: no pickle)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != SPACE_FORMAT:
            raise ValueError(f"{path}: not a {SPACE_FORMAT} file")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    return space_from(json.loads(meta["model_space"]), tensors)


def fixed(mean: Sequence[float], std: Sequence[float]) -> ChannelNorm:
    return ChannelNorm(tuple(float(v) for v in mean), tuple(float(v) for v in std))
