"""``checkpoint:<teacher artifact>[#fold]``: penultimate features (``forward_features``, flattened; timm networks:
their pooled pre-logits) of a network trained by the reference trainer, seeing images exactly as it was trained:
the shared decode at its training size, then its own model space (pool statistics, fixed constants or ZCA).

Embeddings from a model trained on the pool itself: cheap, in-domain, and what DBP/SSP-style pruning uses when
no foundation model fits the data (32px CIFAR, digits). The identity is the teacher artifact's id and the
checkpoint file's sha256, never its path.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages.embedders.base import EMBEDDERS, Description, Embedder, Member, absolute, file_sha256, probe


@dataclass(frozen=True)
class DecodeAt:
    """Stored bytes -> RGB uint8 at the network's training size (the trainer's own decode and resize)."""

    size: int

    def __call__(self, data: bytes) -> np.ndarray:
        from stages.imaging.decode import decode

        return decode(data, self.size)


class TeacherFeatures(nn.Module):
    """uint8 NHWC -> the teacher's model space -> ``forward_features`` (flattened) / timm's pooled pre-logits."""

    def __init__(self, net: nn.Module, space: Any) -> None:
        super().__init__()
        self.net, self.space = net, space
        self._spaces: dict[str, Any] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if key not in self._spaces:
            self._spaces[key] = self.space.to(x.device)
        z = self._spaces[key].encode(x.permute(0, 3, 1, 2))
        feats = self.net.forward_features(z)
        if hasattr(self.net, "forward_head"):  # timm: pooled pre-logit features, not the unpooled map
            feats = self.net.forward_head(feats, pre_logits=True)
        return feats.flatten(1)


@EMBEDDERS.register("checkpoint")
class Checkpoint(Member):
    prefix = "checkpoint"
    syntax = "checkpoint:<teacher artifact>[#fold] (or checkpoint:[#fold] with a 'teacher' input bound)"

    @property
    def bound(self) -> bool:
        """No path: the teacher is an input of the stage (made earlier in the same pipeline); its artifact id is
        then part of the embeddings' id as any input's is."""
        return not self.spec.name

    def with_artifact(self, path: str) -> str:
        """The full spec for a bound teacher input at ``path``."""
        return f"checkpoint:{path}" + (f"#{self.spec.weights}" if self.spec.weights else "")

    @property
    def fold(self) -> int:
        w = self.spec.weights
        if w is None:
            return 0
        if not w.isdigit():
            raise self.error(f"fold '#{w}' is not a number")
        return int(w)

    @property
    def file(self) -> Path:
        return Path(self.spec.name) / "teachers" / f"fold_{self.fold}.pt"

    def normalised_text(self) -> str:
        return self.spec.text if self.bound else self.with_artifact(absolute(self.spec.name))

    def check(self) -> None:
        _ = self.fold
        if self.bound:  # the runner checks the input; the stage checks that one is bound
            return
        if not Path(self.spec.name).is_dir():
            raise self.error(f"teacher artifact {self.spec.name} not found")
        if not self.file.is_file():
            have = sorted(p.stem for p in (Path(self.spec.name) / "teachers").glob("fold_*.pt"))
            raise self.error(f"no checkpoint {self.file} (is it a teacher artifact? folds: {', '.join(have) or 'none'})")

    def _artifact_id(self) -> str:
        try:
            return json.loads((Path(self.spec.name) / "manifest.json").read_text())["artifact_id"]
        except (OSError, ValueError, KeyError):
            return ""

    def identity(self) -> dict[str, Any]:
        return {"member": "checkpoint", "teacher": "input" if self.bound else self._artifact_id(), "fold": self.fold}

    def fingerprint(self) -> str:
        return "" if self.bound else file_sha256(self.file)

    def create(self) -> Embedder:
        from stages.teacher import load_teacher

        if self.bound:
            raise self.error("no teacher artifact: give its path, or bind the embed stage's 'teacher' input")

        teacher = load_teacher(self.spec.name, self.fold)
        network = torch.load(self.file, map_location="cpu", weights_only=True)["network"]
        pixels = DecodeAt(int(network["image_size"]))
        image = TeacherFeatures(teacher.net, teacher.space).eval()
        measured = probe(image, pixels)
        space = teacher.space.describe()
        desc = Description(
            member="checkpoint", architecture=str(network["name"]), pretrained=f"teacher {self._artifact_id()[:12]} "
            f"fold {self.fold} ({self.spec.name})", weights_sha256=file_sha256(self.file), dim=measured["dim"],
            image_size=measured["image_size"], mean=space.get("mean"), std=space.get("std"),
            preprocess=f"decode, resize shorter side to {pixels.size} (bicubic) + centre crop, model space "
                       f"{space['kind']}", text=False,
            extra={"weights_hashed": "file", "model_space": space, "network": network,
                   "classes": teacher.meta.get("classes")})
        return Embedder(image=image, pixels=pixels, info=desc.as_dict())
