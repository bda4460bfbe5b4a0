"""What the trainer trains on, whatever artifact it comes from: images + hard or soft targets.

Each artifact kind registers a loader under its kind in ``TRAINSETS`` (``shards``, ``selection`` and
``synthetic-set`` here; labels register theirs where they are defined): consumers dispatch on the kind, never on the
name of the stage that made the artifact. A loader returns a ``TrainSet``: the images, their targets, the
*pool* they were chosen from (so the validator can train the random-subset baseline of the same size under the
same recipe), the artifact whose training split defines the model space, and for float sets the model space
their images already live in.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, model_validator

from pipeline.artifacts import Artifact
from pipeline.registry import Registry
from stages.train.image_data import MEMORY_LIMIT_BYTES, ImageSet, ShardStream, choose_mode, load_images
from stages.train.losses import SoftLabels
from stages.train.model_space import ModelSpace
from stages.train.synthetic_set import SYNTHETIC_FILE, SYNTHETIC_KIND, load_synthetic_set


@dataclass
class TrainSet:
    images: Any  # uint8 N x H x W x 3 tensor, float N x C x H x W (synthetic sets), or a trainer.BatchStream
    targets: torch.Tensor  # int64 labels or float (N, C) probability rows
    num_classes: int
    classes: list[str]
    uids: list[str] = field(default_factory=list)
    pool: ImageSet | None = None  # what a random baseline of the same size draws from
    lr: float | None = None  # a learned learning rate travels with some distilled sets
    info: dict[str, Any] = field(default_factory=dict)
    space: ModelSpace | None = None  # float images: the model space they live in (recorded by the set)
    pool_artifact: Path | None = None  # whose training split's statistics / ZCA define the model space
    pool_split: str = "train"
    soft_labels: SoftLabels | None = None  # float targets: how they are stored
    labeller: Path | None = None  # the teacher artifact that produced the soft labels, when the set names one

    def __len__(self) -> int:
        return len(self.images) if self.info.get("mode") == "stream" else len(self.targets)


# artifact kinds a training set can be loaded from (each registers a loader below or where it is defined)
TRAINING_KINDS = ("shards", "selection", "labels", "synthetic-set")
Loader = Callable[..., TrainSet]  # (path, split, size, mode, cache_dir) -> TrainSet
TRAINSETS: Registry[Loader] = Registry("training-set loader", entry_point_group="distillery.trainsets")


def from_images(s: ImageSet, pool: ImageSet | None = None, **kw: Any) -> TrainSet:
    return TrainSet(torch.from_numpy(np.ascontiguousarray(s.images)), torch.from_numpy(s.labels), s.num_classes,
                    s.classes, s.uids, pool, **kw)


@TRAINSETS.register("shards")
def _shards(path: Path, split: str, size: int | None, mode: str = "auto", cache_dir: Path | None = None) -> TrainSet:
    """Decoded into memory when it fits (``MEMORY_LIMIT_BYTES``), else streamed from the shards."""
    if choose_mode(path, split, size, mode) == "stream":  # type: ignore[arg-type]
        import json

        stream = ShardStream(path, split, size)
        classes = json.loads((path / "classes.json").read_text())
        return TrainSet(stream, torch.zeros(0, dtype=torch.long), len(classes), classes, info={"mode": "stream"},
                        pool_artifact=path, pool_split=split)
    return from_images(load_images(path, split, size=size, cache_dir=cache_dir), info={"mode": "memory"},
                       pool_artifact=path, pool_split=split)


@TRAINSETS.register("selection")
def _selection(path: Path, split: str, size: int | None, mode: str = "auto", cache_dir: Path | None = None) -> TrainSet:
    """A selection's kept rows, read from its pool by offset (no export needed). The pool's split is decoded once
    (cached) and the selection is its subset, so the pool is also what the same-size random baseline draws from and
    its training split defines the model space. A pool too large to decode streams the selection instead (then
    there is no baseline, and the metrics say why)."""
    import pyarrow.compute as pc

    from stages.train.image_data import decoded_bytes, read_index
    from stages.train.loaders import load_rows

    rows = load_rows(path, split)
    if len(rows) == 0:
        raise ValueError(f"{path}: the selection keeps no rows of split '{split}'")
    info: dict[str, Any] = {"format": "selection", "selected": len(rows)}
    pool_index = read_index(rows.pool, split)
    if mode == "stream" or (mode == "auto" and decoded_bytes(pool_index, size) > MEMORY_LIMIT_BYTES):
        stream = ShardStream(rows.pool, split, size, uids=rows.uids)
        return TrainSet(stream, torch.zeros(0, dtype=torch.long), len(rows.classes), rows.classes, rows.uids,
                        info={**info, "mode": "stream", "no_pool": "streamed: the pool is not decoded, so no random "
                                                                  "baseline is drawn from it"},
                        pool_artifact=rows.pool, pool_split=split)
    pool = load_images(rows.pool, split, size=size, cache_dir=cache_dir)
    chosen = np.flatnonzero(pc.is_in(pa.array(pool.uids, pa.string()),
                                     value_set=rows.table["uid"].combine_chunks()).to_numpy(zero_copy_only=False))
    return from_images(pool.subset(chosen), pool, info={**info, "mode": "memory", "pool_size": len(pool)},
                       pool_artifact=rows.pool, pool_split=split)


@TRAINSETS.register(SYNTHETIC_KIND)
def _synthetic(path: Path, split: str, size: int | None, mode: str = "auto", cache_dir: Path | None = None) -> TrainSet:
    """A distilled set in its own model space; its pool (for the random baseline) is loaded when it still exists."""
    s = load_synthetic_set(path / SYNTHETIC_FILE)
    info: dict[str, Any] = {"mode": "memory", "format": "synthetic-set"}
    pool = pool_path = None
    if s.pool is None:
        info["no_pool"] = "the set names no pool"
    else:
        pool_path = Path(s.pool["artifact"])
        found = Artifact(pool_path).manifest().artifact_id if (pool_path / "manifest.json").is_file() else None
        if found is None or (s.pool.get("artifact_id") and found != s.pool["artifact_id"]):
            info["no_pool"] = f"its pool {pool_path} is missing or is another artifact now"
            pool_path = None
        else:
            pool = load_images(pool_path, s.pool.get("split", "train"), size=size, cache_dir=cache_dir)
    labeller = Path(s.labeller["artifact"]) if s.labeller else None
    return TrainSet(s.images, s.targets, len(s.classes), s.classes, pool=pool, lr=s.lr, info=info, space=s.space,
                    pool_artifact=pool_path, pool_split=(s.pool or {}).get("split", "train"),
                    soft_labels=s.soft_labels, labeller=labeller)


def load_trainset(path: str | Path, split: str = "train", size: int | None = None, mode: str = "auto",
                  cache_dir: str | Path | None = None) -> TrainSet:
    """The training set in an artifact of any registered kind (decoded images cached under ``cache_dir``)."""
    path = Path(path)
    kind = Artifact(path).manifest().kind
    return TRAINSETS.get(kind)(path, split, size, mode, Path(cache_dir) if cache_dir is not None else None)


class SubsetSpec(BaseModel):
    """A random class-balanced subset: ``ipc`` images per class, or a ``fraction`` of every class."""

    model_config = ConfigDict(extra="forbid")
    ipc: int | None = None
    fraction: float | None = None

    @model_validator(mode="after")
    def _one(self) -> "SubsetSpec":
        if (self.ipc is None) == (self.fraction is None):
            raise ValueError("give exactly one of ipc or fraction")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError("fraction must be in (0, 1]")
        return self

    def describe(self) -> str:
        return f"ipc{self.ipc}" if self.ipc is not None else f"{self.fraction:.0%}"


def balanced_subset(labels: np.ndarray, spec: SubsetSpec | None = None, *, per_class: dict[int, int] | None = None,
                    seed: int = 0, kind: Literal["random"] = "random") -> np.ndarray:
    """Indices of a random subset with ``spec`` (or exact ``per_class`` counts), sorted, deterministic by seed."""
    rng = np.random.default_rng(seed)
    out = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if per_class is not None:
            k = per_class.get(int(c), 0)
        elif spec.ipc is not None:  # type: ignore[union-attr]
            k = spec.ipc  # type: ignore[union-attr]
        else:
            k = max(1, round(len(idx) * spec.fraction))  # type: ignore[union-attr, operator]
        if k > len(idx):
            raise ValueError(f"class {c} has {len(idx)} samples, fewer than the {k} asked for")
        out.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(out)) if out else np.empty(0, dtype=np.int64)


def class_counts(targets: torch.Tensor, num_classes: int) -> dict[int, int]:
    hard = targets.argmax(1) if targets.is_floating_point() else targets
    counts = torch.bincount(hard, minlength=num_classes)
    return {i: int(n) for i, n in enumerate(counts)}
