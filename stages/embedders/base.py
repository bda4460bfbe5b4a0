"""The embedder contract: a spec string names a member and its weights; the member builds the model *and* its
preprocessing (the embed stage never picks a resize or a normalisation) and describes itself for the manifest.

    open_clip:<arch>[:<pretrained tag | weights file>]    arch: an open_clip name, a .json config, hf-hub:/local-dir:
    timm:<model>[:pretrained | :<weights file>]           no third field: random init (seeded; for tests)
    checkpoint:<teacher artifact>[#fold]                  penultimate features of a model trained here
    checkpoint:[#fold]                                    ... of the embed stage's bound 'teacher' input
    <preset>                                              a YAML in presets/ naming one of the above

A member is split in two, like a source: the driver-side half is cheap (``check``, ``identity``, ``fingerprint``:
no weights are loaded, nothing is downloaded) and ``create()`` loads on a worker. ``Embedder.pixels`` turns stored
image bytes into the model's input pixels (decode, resize, crop: CPU, in loader workers); ``Embedder.image`` takes
a batch of them to features (``ToTensor``/``Normalize`` happen there, on the device, so only uint8 crosses PCIe).
"""
from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence

import numpy as np
import torch
import yaml
from torch import nn

from pipeline.atomic import sha256_file
from pipeline.errors import InputError
from pipeline.registry import Registry, RegistryError

PRESET_DIR = Path(__file__).with_name("presets")
HUB_SCHEMAS = ("hf-hub:", "local-dir:")  # model names that carry their own colon (open_clip and timm syntax)


class EmbedderError(InputError):
    """A spec that cannot work (unknown prefix, missing file, unknown tag); the message names the spec."""


@dataclass(frozen=True)
class Spec:
    """A parsed spec: ``member:name[:weights]`` (``checkpoint:path#fold`` puts the fold in ``weights``)."""

    text: str
    member: str
    name: str
    weights: str | None = None
    preset: str | None = None  # the preset name the spec came from, if any


def parse_spec(text: str) -> Spec:
    """Split a spec into member, name and weights; bare words are presets. Unknown prefixes are errors."""
    text = text.strip()
    if ":" not in text:
        return _preset(text)
    member, rest = text.split(":", 1)
    if member not in EMBEDDERS:
        raise EmbedderError(f"embedder '{text}': unknown prefix '{member}:'; expected one of "
                            f"{', '.join(p + ':' for p in EMBEDDERS.names())} or a preset "
                            f"({', '.join(preset_names()) or 'none'})")
    if member == "checkpoint":  # no path: the embed stage's bound 'teacher' input
        path, _, fold = rest.partition("#")
        return Spec(text, member, path, fold or None)
    if not rest:
        raise EmbedderError(f"embedder '{text}': nothing after '{member}:' ({EMBEDDERS.get(member).syntax})")
    schema = next((s for s in HUB_SCHEMAS if rest.startswith(s)), "")
    name, sep, weights = rest[len(schema):].partition(":")
    return Spec(text, member, schema + name, weights if sep else None)


def _preset(name: str) -> Spec:
    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        raise EmbedderError(f"embedder '{name}': not a preset ({', '.join(preset_names()) or 'none'}) and no "
                            f"'<prefix>:' ({', '.join(p + ':' for p in EMBEDDERS.names())})")
    spec = parse_spec(load_preset(name)["spec"])
    return Spec(spec.text, spec.member, spec.name, spec.weights, preset=name)


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))


def load_preset(name: str) -> dict[str, Any]:
    """A preset: ``spec`` plus what the loaded model must match (``dim``) and a ``description``."""
    data = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())
    if not isinstance(data, dict) or not isinstance(data.get("spec"), str):
        raise EmbedderError(f"preset '{name}': needs a 'spec' string")
    return data


def absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


@dataclass
class Embedder:
    """A loaded model with its preprocessing. ``pixels(bytes)`` runs in loader workers (picklable); ``image`` maps a
    stacked batch of its outputs to [n, dim] features; ``text``/``tokenize`` exist for members with a text tower."""

    image: nn.Module
    pixels: Callable[[bytes], np.ndarray]
    info: dict[str, Any]
    text: nn.Module | None = None
    tokenize: Callable[[Sequence[str]], torch.Tensor] | None = None

    @property
    def dim(self) -> int:
        return int(self.info["dim"])

    def to(self, device: torch.device | str) -> "Embedder":
        self.image.to(device).eval()
        if self.text is not None:
            self.text.to(device).eval()
        return self

    @property
    def device(self) -> torch.device:
        return next(iter(self.image.parameters())).device

    @torch.inference_mode()
    def features(self, batch: np.ndarray | torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """Raw (unnormalised) float32 features of a stacked batch of ``pixels`` outputs, left on the device: no
        synchronisation, so the caller can fetch the next batch while the GPU works."""
        dev = self.device
        x = torch.as_tensor(batch).to(dev, non_blocking=True)
        with autocast(dev, precision):
            return self.image(x).float()

    def embed_pixels(self, batch: np.ndarray | torch.Tensor, precision: str = "fp32") -> np.ndarray:
        return self.features(batch, precision).cpu().numpy()

    @torch.inference_mode()
    def embed_texts(self, captions: Sequence[str], precision: str = "fp32", batch_size: int = 256) -> np.ndarray:
        if self.text is None or self.tokenize is None:
            raise EmbedderError(f"embedder '{self.info.get('spec')}' has no text tower")
        dev = self.device
        out = [np.zeros((0, self.dim), np.float32)]
        for i in range(0, len(captions), batch_size):
            tokens = self.tokenize(list(captions[i:i + batch_size])).to(dev)
            with autocast(dev, precision):
                out.append(self.text(tokens).float().cpu().numpy())
        return np.concatenate(out)

    def embed_bytes(self, images: Sequence[bytes], precision: str = "fp32") -> np.ndarray:
        """Features of stored image bytes, in-process (tests, notebooks); the stage batches on loader workers."""
        return self.embed_pixels(np.stack([self.pixels(b) for b in images]), precision)


def autocast(device: torch.device, precision: str) -> Any:
    """bf16 autocast (matmuls and convolutions in bf16, the rest in fp32) or plain fp32."""
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision '{precision}': expected bf16 or fp32")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


class Member:
    """One kind of embedder. The driver calls ``check``/``identity``/``fingerprint`` (cheap, nothing loaded);
    ``create`` loads weights on a worker."""

    prefix: ClassVar[str]
    syntax: ClassVar[str]
    has_text: ClassVar[bool] = False

    def __init__(self, spec: Spec) -> None:
        self.spec = spec

    def check(self) -> None:
        """Raise ``EmbedderError`` naming the spec if it cannot load (missing file, unknown name or tag)."""

    def identity(self) -> dict[str, Any]:
        """What decides the embeddings, without where files live (their content is in ``fingerprint``)."""
        return {"member": self.spec.member, "name": self.spec.name, "weights": self.spec.weights}

    def fingerprint(self) -> str:
        """sha256 of the local files the spec points at ('' when a name or tag identifies the weights)."""
        return ""

    def create(self) -> Embedder:
        raise NotImplementedError

    def error(self, message: str) -> EmbedderError:
        return EmbedderError(f"embedder '{self.spec.text}': {message}")

    def normalised_text(self) -> str:
        """The spec with local paths made absolute (workers may run in another directory)."""
        return self.spec.text


EMBEDDERS: Registry[type[Member]] = Registry("embedder", entry_point_group="distillery.embedders")


def resolve_embedder(spec: str) -> Member:
    """The member for ``spec`` (presets resolved), without loading anything."""
    parsed = parse_spec(spec)
    try:
        cls = EMBEDDERS.get(parsed.member)
    except RegistryError as e:  # a preset naming an unknown member
        raise EmbedderError(f"embedder '{spec}': {e}") from None
    return cls(parsed)


def create_embedder(spec: str) -> Embedder:
    """Load the embedder a spec names: model + preprocessing + its description (checked against a preset's)."""
    member = resolve_embedder(spec)
    member.check()
    emb = member.create()
    emb.info = {"spec": member.spec.text, **({"preset": member.spec.preset} if member.spec.preset else {}),
                **emb.info}
    if member.spec.preset:
        want = load_preset(member.spec.preset).get("dim")
        if want is not None and int(want) != emb.dim:
            raise member.error(f"preset '{member.spec.preset}' declares dim {want}, the model gives {emb.dim}")
    return emb


# ---- helpers the members share ----------------------------------------------------------------------------


def state_sha256(module: nn.Module) -> str:
    """sha256 of a module's loaded state (names, dtypes, shapes, bytes in key order): what weights were in use."""
    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        t = value.detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def file_sha256(path: str | os.PathLike[str]) -> str:
    return sha256_file(path)


def seeded(seed: int, build: Callable[[], Any]) -> Any:
    """Build something whose random init must not depend on the process's RNG state (random-init members)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


class PixelEncoder(nn.Module):
    """uint8 NHWC pixels -> ``ToTensor`` (x/255, NCHW) -> ``Normalize`` (mean/std) -> ``model.<method>``.

    The arithmetic is torchvision's (float32 division, then subtract and divide), so the model sees the same
    floats as with the member's own preprocessing, only computed on the device. Float input (a preprocessing
    that could not be split) goes to the model unchanged."""

    def __init__(self, model: nn.Module, method: str, mean: Sequence[float] | None, std: Sequence[float] | None):
        super().__init__()
        self.model, self.method = model, method
        self.normalise = mean is not None
        self.register_buffer("mean", torch.tensor(list(mean or [0.0]), dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)
        self.register_buffer("std", torch.tensor(list(std or [1.0]), dtype=torch.float32).view(1, -1, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = x.permute(0, 3, 1, 2).float().div(255)
            if self.normalise:
                x = (x - self.mean) / self.std
        out = getattr(self.model, self.method)(x)
        return out.flatten(1)


TO_TENSOR = ("ToTensor", "MaybeToTensor")


@dataclass(frozen=True)
class PilPixels:
    """Stored bytes -> the shared decode (RGB uint8) -> the PIL half of a torchvision preprocess (resize, crop,
    mode) -> uint8 HWC. Picklable: it runs in DataLoader workers."""

    ops: Any  # torchvision Compose of PIL-level transforms
    full: bool = False  # the whole preprocess (could not be split): returns float CHW

    def __call__(self, data: bytes) -> np.ndarray:
        from PIL import Image

        from stages.imaging.decode import decode

        img = self.ops(Image.fromarray(decode(data, None)))
        if self.full:
            return np.asarray(img, dtype=np.float32)
        return np.asarray(img.convert("RGB") if getattr(img, "mode", "RGB") != "RGB" else img, dtype=np.uint8)


def split_preprocess(preprocess: Any) -> tuple[PilPixels, list[float] | None, list[float] | None]:
    """Split a torchvision eval preprocess ``[PIL ops..., ToTensor, Normalize]`` into its PIL half (loader workers)
    and the mean/std the device applies. Anything else runs whole in the workers (mean/std None)."""
    from torchvision import transforms as T

    ops = list(getattr(preprocess, "transforms", []))
    cut = next((i for i, t in enumerate(ops) if type(t).__name__ in TO_TENSOR), None)
    tail = ops[cut + 1:] if cut is not None else []
    if cut is None or len(tail) != 1 or not isinstance(tail[0], T.Normalize):
        return PilPixels(preprocess, full=True), None, None
    norm = tail[0]
    return PilPixels(T.Compose(ops[:cut])), _floats(norm.mean), _floats(norm.std)


def _floats(v: Any) -> list[float]:
    """Normalize's constants as written (a tuple), or a tensor's values."""
    return [float(x) for x in (v.reshape(-1).tolist() if isinstance(v, torch.Tensor) else v)]


def probe_image() -> bytes:
    """A small PNG to run once through ``pixels`` and ``image``: gives the input size and the output dim."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (120, 60, 200)).save(buf, format="PNG")
    return buf.getvalue()


def probe(image: nn.Module, pixels: Callable[[bytes], np.ndarray]) -> dict[str, Any]:
    """Input size and feature dim of an embedder, measured (never trusted from a config)."""
    x = pixels(probe_image())
    with torch.inference_mode():
        out = image.eval()(torch.from_numpy(np.array(x[None])))
    size = list(x.shape[:2]) if x.dtype == np.uint8 else list(x.shape[1:])
    return {"image_size": size, "dim": int(out.shape[1]), "input": "uint8" if x.dtype == np.uint8 else "float32"}


@dataclass
class Description:
    """What the manifest records about an embedder (``info``); members fill it, the stage stores it."""

    member: str
    architecture: str
    pretrained: str
    weights_sha256: str
    dim: int
    image_size: list[int]
    mean: list[float] | None
    std: list[float] | None
    preprocess: str
    text: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in self.__dict__.items() if k != "extra"}
        return {**d, "dtype": "float16", "normalisation": "l2", **self.extra}
