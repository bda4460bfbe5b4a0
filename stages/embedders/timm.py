"""``timm:<model>[:pretrained | :<weights file>]``: a timm model's pooled pre-logit features (``num_classes=0``),
with timm's own eval preprocess for that model (``resolve_data_config`` + ``create_transform``).

* ``timm:vit_base_patch16_clip_224.openai:pretrained``: timm's pretrained weights (its hub cache, ``HF_HUB_*``);
  ``hf-hub:timm/...`` names work the same way;
* ``timm:resnet50:/path/weights.safetensors``: a local file, through timm's ``pretrained_cfg_overlay={"file": ...}``;
* ``timm:resnet50``: random init with seed 0: only useful for tests and throughput measurements.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.embedders.base import (
    EMBEDDERS, Description, Embedder, Member, PixelEncoder, absolute, file_sha256, probe, seeded, split_preprocess,
    state_sha256,
)

RANDOM_SEED = 0
PRETRAINED = "pretrained"


@EMBEDDERS.register("timm")
class Timm(Member):
    prefix = "timm"
    syntax = "timm:<model>[:pretrained | :<weights file>]"

    def _weights_kind(self) -> str:
        w = self.spec.weights
        return "random" if w is None else "hub" if w == PRETRAINED else "file"

    def normalised_text(self) -> str:
        w = self.spec.weights
        if self._weights_kind() == "file":
            w = absolute(w)  # type: ignore[arg-type]
        return f"timm:{self.spec.name}" + (f":{w}" if w is not None else "")

    def check(self) -> None:
        import timm

        name = self.spec.name
        if not name.startswith("hf-hub:") and not timm.is_model(name):
            raise self.error(f"unknown timm model '{name}' (timm.list_models() lists them)")
        if self._weights_kind() == "file" and not Path(self.spec.weights).is_file():  # type: ignore[arg-type]
            raise self.error(f"weights file {self.spec.weights} not found (use ':{PRETRAINED}' for timm's own)")

    def identity(self) -> dict[str, Any]:
        kind = self._weights_kind()
        return {"member": "timm", "model": self.spec.name, "pretrained": kind}

    def fingerprint(self) -> str:
        return file_sha256(self.spec.weights) if self._weights_kind() == "file" else ""  # type: ignore[arg-type]

    def create(self) -> Embedder:
        import timm
        from timm.data import create_transform, resolve_data_config

        kind = self._weights_kind()
        kw: dict[str, Any] = {"num_classes": 0}
        if kind == "file":
            kw.update(pretrained=True, pretrained_cfg_overlay={"file": self.spec.weights})
        else:
            kw["pretrained"] = kind == "hub"
        build = lambda: timm.create_model(self.spec.name, **kw)  # noqa: E731
        model = (seeded(RANDOM_SEED, build) if kind == "random" else build()).eval()
        cfg = resolve_data_config({}, model=model)
        preprocess = create_transform(**cfg, is_training=False)
        pixels, mean, std = split_preprocess(preprocess)
        image = PixelEncoder(model, "forward", mean, std)
        measured = probe(image, pixels)
        sha = file_sha256(self.spec.weights) if kind == "file" else state_sha256(model)  # type: ignore[arg-type]
        source = {"random": f"random init (seed {RANDOM_SEED})", "hub": "timm pretrained weights",
                  "file": str(self.spec.weights)}[kind]
        desc = Description(
            member="timm", architecture=self.spec.name, pretrained=source, weights_sha256=sha, dim=measured["dim"],
            image_size=measured["image_size"], mean=mean, std=std,
            preprocess=" -> ".join(repr(t).replace("\n", " ") for t in preprocess.transforms), text=False,
            extra={"weights_hashed": "file" if kind == "file" else "loaded state",
                   "library": f"timm {timm.__version__}",
                   "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}})
        return Embedder(image=image, pixels=pixels, info=desc.as_dict())
