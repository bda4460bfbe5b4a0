"""What the trainer trains on, whatever artifact it comes from: images + hard or soft targets.

Each artifact kind registers a loader under its kind in ``TRAINSETS`` (``shards``, ``selection``, ``labels`` and
``synthetic-set`` here): consumers dispatch on the kind, never on the
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
    # the pool's targets under the set's own labelling (a labels artifact covers its pool): a random baseline's
    # targets come from here, row-aligned with ``pool``
    pool_targets: torch.Tensor | None = None
    label_maps: Any = None  # localized label maps (``stages.labeling.label_maps.LabelMaps``), row-aligned

    def __len__(self) -> int:
        return len(self.images) if self.info.get("mode") == "stream" else len(self.targets)


# artifact kinds a training set can be loaded from (each registers a loader below or where it is defined)
TRAINING_KINDS = ("shards", "selection", "labels", "synthetic-set")
Loader = Callable[..., TrainSet]  # (path, split, size, mode, cache_dir, targets=...) -> TrainSet
# which targets a labelled set trains on: its hard ``label``, its soft rows, or soft when they hold more than one class
LabelTargets = Literal["hard", "soft", "auto"]
TRAINSETS: Registry[Loader] = Registry("training-set loader", entry_point_group="distillery.trainsets")


def from_images(s: ImageSet, pool: ImageSet | None = None, **kw: Any) -> TrainSet:
    return TrainSet(torch.from_numpy(np.ascontiguousarray(s.images)), torch.from_numpy(s.labels), s.num_classes,
                    s.classes, s.uids, pool, **kw)


@TRAINSETS.register("shards")
def _shards(path: Path, split: str, size: int | None, mode: str = "auto", cache_dir: Path | None = None,
            targets: LabelTargets = "auto") -> TrainSet:
    """Decoded into memory when it fits (``MEMORY_LIMIT_BYTES``), else streamed from the shards."""
    if choose_mode(path, split, size, mode) == "stream":  # type: ignore[arg-type]
        import json

        stream = ShardStream(path, split, size)
        classes = json.loads((path / "classes.json").read_text())
        return TrainSet(stream, torch.zeros(0, dtype=torch.long), len(classes), classes, info={"mode": "stream"},
                        pool_artifact=path, pool_split=split)
    images = load_images(path, split, size=size, cache_dir=cache_dir)
    ts = from_images(images, info={"mode": "memory"}, pool_artifact=path, pool_split=split)
    labels = Artifact(path).manifest().metrics.get("labels")  # an export that carries a labels artifact's members
    if labels:
        soft = wants_soft(np.array([labels.get("max_k", 1)]), targets)
        ts.info["targets"] = "soft" if soft else "hard"
        if soft:
            from stages.labeling.export_members import load_exported_soft

            ts.targets = torch.from_numpy(load_exported_soft(path, split, images.keys, ts.num_classes))
    return ts


@TRAINSETS.register("selection")
def _selection(path: Path, split: str, size: int | None, mode: str = "auto", cache_dir: Path | None = None,
               targets: LabelTargets = "auto") -> TrainSet:
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


def wants_soft(topk_lengths: np.ndarray, targets: LabelTargets) -> bool:
    """``auto``: soft targets when any row's stored top-k names more than one class (else they equal the hard label)."""
    if targets == "auto":
        return bool(len(topk_lengths)) and int(np.max(topk_lengths)) > 1
    return targets == "soft"


@TRAINSETS.register("labels")
def _labels(path: Path, split: str, size: int | None, mode: str = "auto", cache_dir: Path | None = None,
            targets: LabelTargets = "auto") -> TrainSet:
    """A labels artifact trains on its pool's images: the labelled rows of ``split`` whose action is not ``drop``,
    in the pool's order, with the hard ``label`` or the dense soft rows (``soft_targets``). Every labelled row of
    the split (drops included) under the same labelling is the pool a random baseline draws from, so the baseline
    is labelled exactly like the set. Decoded into memory (the set is a table over a pool that has to be decoded
    for the baseline anyway); label maps in the artifact travel with the set (``TrainSet.label_maps``)."""
    import json

    from pipeline.errors import InputError
    from stages.labeling.store import load_labels, soft_targets
    from stages.sharding.pool import find_pool

    if mode == "stream":
        raise ValueError(f"{path}: a labels set is decoded into memory; use data_mode: memory or auto")
    pool_path = find_pool(path)
    table = load_labels(path, split)
    if table.num_rows == 0:
        raise ValueError(f"{path}: no labelled rows in split '{split}'")
    classes = json.loads((pool_path / "classes.json").read_text())
    num_classes = int(Artifact(path).manifest().metrics.get("num_classes") or len(classes))
    pool = load_images(pool_path, split, size=size, cache_dir=cache_dir)
    pos = {u: i for i, u in enumerate(pool.uids)}
    uids = table.column("uid").to_pylist()
    missing = [u for u in uids if u not in pos]
    if missing:
        raise InputError(f"{path}: {len(missing)} labelled uids (e.g. {missing[0]}) are not in split '{split}' of "
                         f"its pool {pool_path}")
    rows = np.array([pos[u] for u in uids], dtype=np.int64)
    order = np.argsort(rows, kind="stable")  # the pool's order, like every other loader
    table, rows = table.take(pa.array(order)), rows[order]
    lengths = np.diff(table.column("topk_index").combine_chunks().offsets.to_numpy())
    soft = wants_soft(lengths, targets)
    if soft:
        all_targets = torch.from_numpy(soft_targets(table, num_classes))
        hard = all_targets.argmax(1).numpy()
    else:
        hard = table.column("label").to_numpy().astype(np.int64)
        all_targets = torch.from_numpy(hard.copy())
    keep = np.array([a != "drop" for a in table.column("action").to_pylist()], dtype=bool)
    if not keep.any():
        raise ValueError(f"{path}: every labelled row of split '{split}' is dropped")
    covered = pool.subset(rows)
    covered.labels = hard  # the class composition of a baseline is counted in the set's own labelling
    chosen = covered.subset(np.flatnonzero(keep))
    info: dict[str, Any] = {"format": "labels", "mode": "memory", "targets": "soft" if soft else "hard",
                            "labelled": int(len(keep)), "dropped": int((~keep).sum()), "pool_size": len(covered)}
    maps = None
    from stages.labeling.label_maps import has_maps, load_maps

    if has_maps(path, split):
        maps = load_maps(path, split, chosen.uids)
        info["label_maps"] = {"size": maps.size, "k": maps.k}
    return TrainSet(torch.from_numpy(np.ascontiguousarray(chosen.images)), all_targets[torch.from_numpy(keep)],
                    num_classes, classes, chosen.uids, covered, info=info, pool_artifact=pool_path, pool_split=split,
                    pool_targets=all_targets, label_maps=maps)


@TRAINSETS.register(SYNTHETIC_KIND)
def _synthetic(path: Path, split: str, size: int | None, mode: str = "auto", cache_dir: Path | None = None,
               targets: LabelTargets = "auto") -> TrainSet:
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
                  cache_dir: str | Path | None = None, targets: LabelTargets = "auto") -> TrainSet:
    """The training set in an artifact of any registered kind (decoded images cached under ``cache_dir``);
    ``targets`` picks hard or soft targets where the artifact carries both (labels artifacts, their exports)."""
    path = Path(path)
    kind = Artifact(path).manifest().kind
    return TRAINSETS.get(kind)(path, split, size, mode, Path(cache_dir) if cache_dir is not None else None,
                               targets=targets)


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
