"""The ``synthetic-set`` artifact format: float images in a recorded model space + hard or soft targets.

What a distillation method writes and the validator reads (it lives in ``stages`` because the validator must
read it; ``distill`` builds on it). One safetensors file, ``synthetic_set.safetensors`` (no pickle anywhere):

    tensors   images   float32 (N, C, H, W), already in the model space
              targets  int64 (N,) class ids, or float32 (N, K) soft labels
              lr       float32 scalar, optional: a learned learning rate (MTT's syn_lr)
              zca.*    the ZCA transform when the model space is ZCA (mean, matrix, inverse)
    metadata  format       "distillery.synthetic-set.v1"
              classes      JSON list of class names (K = its length)
              model_space  JSON: {"kind": "normalize", "mean", "std"} or {"kind": "zca", "eps", "sha256", ...}
              soft_labels  JSON {"kind": "probs", "temperature": T_s} | {"kind": "logits"}, for float targets
              pool         JSON {"artifact": path, "artifact_id", "split"}: the real images it was made from
                           (the validator's random baseline draws from there), optional
              labeller     JSON {"artifact": path of a teacher (model) artifact, "fold": k}: what produced the
                           soft labels, so a random baseline can be labelled the same way, optional
              meta         JSON: anything else (method, ipc, iterations)

The artifact's ``manifest.json`` (kind ``synthetic-set``) repeats the model space and the target form in its
metrics (``synthetic_metrics``). ``write_synthetic_artifact`` makes a complete artifact directory by hand.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pipeline.artifacts import Artifact, ArtifactManifest, FileEntry, code_version, now_iso
from pipeline.atomic import atomic_path, sha256_file
from stages.train.losses import SoftLabels
from stages.train.model_space import ModelSpace, space_from

SYNTHETIC_FORMAT = "distillery.synthetic-set.v1"
SYNTHETIC_FILE = "synthetic_set.safetensors"
SYNTHETIC_KIND = "synthetic-set"


class SyntheticSetError(ValueError):
    """A synthetic-set file that is missing, foreign or inconsistent; the message starts with its path."""


@dataclass
class SyntheticSet:
    images: Tensor  # float32 (N, C, H, W) in ``space``
    targets: Tensor  # int64 (N,) or float32 (N, K)
    classes: list[str]
    space: ModelSpace
    soft_labels: SoftLabels | None = None  # how float targets are stored (required for them)
    lr: float | None = None
    pool: dict[str, Any] | None = None  # {"artifact": str path, "artifact_id": str, "split": str}
    labeller: dict[str, Any] | None = None  # {"artifact": str path of a teacher artifact, "fold": int}
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def soft(self) -> bool:
        return self.targets.is_floating_point()

    def check(self, where: str = "synthetic set") -> "SyntheticSet":
        """Shapes, dtypes and values agree with each other; raises ``SyntheticSetError`` naming ``where``."""
        x, y, k = self.images, self.targets, len(self.classes)
        problems = []
        if x.dim() != 4 or x.dtype != torch.float32:
            problems.append(f"images must be float32 (N, C, H, W), found {x.dtype} {list(x.shape)}")
        elif not torch.isfinite(x).all():
            problems.append("images contain NaN/inf")
        if len(y) != len(x):
            problems.append(f"{len(y)} targets for {len(x)} images")
        if y.is_floating_point():
            if y.dim() != 2 or y.shape[1] != k or y.dtype != torch.float32:
                problems.append(f"soft targets must be float32 (N, {k}), found {y.dtype} {list(y.shape)}")
            if self.soft_labels is None:
                problems.append("float targets need soft_labels (probs at a temperature, or logits)")
        elif y.dtype != torch.int64 or y.dim() != 1 or (len(y) and (int(y.min()) < 0 or int(y.max()) >= k)):
            problems.append(f"hard targets must be int64 (N,) in [0, {k})")
        if self.lr is not None and not self.lr > 0:
            problems.append(f"lr must be positive, found {self.lr}")
        if problems:
            raise SyntheticSetError(f"{where}: " + "; ".join(problems))
        return self


def save_synthetic_set(path: str | Path, s: SyntheticSet) -> Path:
    """Write one synthetic-set file atomically (safetensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    s.check(str(path))
    tensors = {"images": s.images.detach().cpu().contiguous(), "targets": s.targets.detach().cpu().contiguous(),
               **{k: v.detach().cpu().contiguous() for k, v in s.space.tensors().items()}}
    if s.lr is not None:
        tensors["lr"] = torch.tensor(float(s.lr), dtype=torch.float32)
    meta = {"format": SYNTHETIC_FORMAT, "classes": json.dumps(s.classes),
            "model_space": json.dumps(s.space.describe()),
            "soft_labels": json.dumps(s.soft_labels.model_dump() if s.soft and s.soft_labels else None),
            "pool": json.dumps(s.pool), "labeller": json.dumps(s.labeller), "meta": json.dumps(s.meta)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    return path


def load_synthetic_set(path: str | Path) -> SyntheticSet:
    """Read and validate a synthetic-set file (safetensors: loading never runs code)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise SyntheticSetError(f"{path}: no such synthetic-set file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise SyntheticSetError(f"{path}: unreadable safetensors file ({e})") from e
    if meta.get("format") != SYNTHETIC_FORMAT:
        raise SyntheticSetError(f"{path}: format is {meta.get('format')!r}, expected {SYNTHETIC_FORMAT!r}")
    try:
        desc = {k: json.loads(meta[k]) for k in ("classes", "model_space", "soft_labels", "pool", "labeller", "meta")}
        space = space_from(desc["model_space"], tensors)
    except (KeyError, json.JSONDecodeError, ValueError) as e:
        raise SyntheticSetError(f"{path}: bad metadata ({e})") from e
    missing = [k for k in ("images", "targets") if k not in tensors]
    if missing:
        raise SyntheticSetError(f"{path}: missing tensors {missing}")
    s = SyntheticSet(tensors["images"], tensors["targets"], list(desc["classes"]), space,
                     SoftLabels(**desc["soft_labels"]) if desc["soft_labels"] else None,
                     float(tensors["lr"]) if "lr" in tensors else None, desc["pool"], desc["labeller"],
                     desc["meta"] or {})
    return s.check(str(path))


def synthetic_metrics(s: SyntheticSet) -> dict[str, Any]:
    """What a synthetic-set manifest records: model space, target form, sizes, learned lr."""
    hard = s.targets.argmax(1) if s.soft else s.targets
    return {"format": SYNTHETIC_FORMAT, "model_space": s.space.describe(), "images": len(s.images),
            "image_shape": list(s.images.shape[1:]), "targets": "soft" if s.soft else "hard",
            "soft_labels": s.soft_labels.model_dump() if s.soft and s.soft_labels else None,
            "per_class": torch.bincount(hard, minlength=len(s.classes)).tolist(), "lr": s.lr,
            "pool": s.pool, "labeller": s.labeller}


def write_synthetic_artifact(directory: str | Path, s: SyntheticSet, *, name: str = "synthetic") -> Path:
    """A complete ``synthetic-set`` artifact made outside the DAG (its id: the file's sha256)."""
    directory = Path(directory)
    file = save_synthetic_set(directory / SYNTHETIC_FILE, s)
    digest = sha256_file(file)
    manifest = ArtifactManifest(
        artifact_id=hashlib.sha256(f"{SYNTHETIC_KIND}:{digest}".encode()).hexdigest(), stage="external",
        kind=SYNTHETIC_KIND, name=name, stage_version="1", params={}, code_version=code_version(),
        created=now_iso(), counts={"images": len(s.images)},
        files=[FileEntry(path=SYNTHETIC_FILE, sha256=digest, bytes=file.stat().st_size)],
        metrics=synthetic_metrics(s))
    Artifact(directory).write_manifest(manifest)
    return directory
