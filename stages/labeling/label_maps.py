"""Localized label maps (ReLabel, Yun et al. 2021) and LabelPooling.

* ``dense_scores``: the teacher's class scores at every location of its last spatial feature map: global pooling
  removed, the final linear layer applied as a 1x1 convolution (same weights). Works for networks with a spatial
  map before pooling (``resnet18``, ``airbench``); ConvNet-DD's classifier reads the *flattened* map (weights per
  position), so it has no per-location classifier and is refused.
* ``topk_maps``: the top-k classes per location, stored int16 / float16 in the labels artifact's sidecar
  ``maps/<split>/<shard:05d>.npz`` (``write_maps``; ``stages.labeling.store.maps_path``).
* ``label_pool``: ReLabel's LabelPooling for one random crop per sample: scatter the top-k into a zero map,
  RoIAlign 1x1 over the crop box (``torchvision.ops.roi_align``, aligned=False, box scaled by S and shifted by
  -0.5 as ReLabel does), softmax over classes.

Boxes are ``(x1, y1, x2, y2)`` normalised to [0, 1] of the image (x = column, y = row): the order ``roi_align``
wants. ReLabel's code builds ``(y1, x1, y2, x2)`` from ``RandomResizedCrop.get_params`` (curation.md 4.1); here the
augmentation (``stages.train.augment.crop_flip_boxes``) produces the box in this order directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline.atomic import atomic_path
from pipeline.errors import InputError
from stages.labeling.store import MAPS_DIR, maps_path

Fill = Literal["zero", "neg_inf"]


# --------------------------------------------------------------------------------------------------------------
# Dense scores


def _spatial_head(model: nn.Module) -> tuple[Callable[[Tensor], Tensor], nn.Linear, float]:
    """(features before global pooling, the final linear layer, the logit scale) of a supported network."""
    from stages.train.networks import AirbenchNet, ConvNet, ResNet

    net = getattr(model, "net", model)  # a stages.teacher.Teacher wraps its network
    if isinstance(net, ResNet):
        return (lambda x: net.layers(net.stem(x))), net.fc, 1.0
    if isinstance(net, AirbenchNet):
        return (lambda x: net.groups(F.gelu(net.whiten(x)))), net.head, float(net.logit_scale)
    if isinstance(net, ConvNet):
        raise ValueError("label maps need a classifier applied per location: ConvNet flattens its last feature map "
                         "into a position-dependent linear layer; use a resnet18 or airbench teacher")
    raise ValueError(f"label maps: unsupported network {type(net).__name__} (supported: resnet18, airbench)")


@torch.no_grad()
def dense_scores(model: nn.Module, images: Tensor, size: int | None = None) -> Tensor:
    """(n, C, S, S) class scores per location for float NCHW ``images`` already in the model's space (eval mode).

    The final linear layer as a 1x1 convolution over the map before global pooling; ``size`` resizes the score
    map bilinearly to ``size x size`` (the grid then still covers the whole image)."""
    features, fc, scale = _spatial_head(model)
    was = model.training
    model.eval()
    try:
        fmap = features(images)
        weight = fc.weight.view(*fc.weight.shape, 1, 1)
        scores = F.conv2d(fmap, weight, fc.bias) * scale
    finally:
        model.train(was)
    if size is not None and scores.shape[-1] != size:
        scores = F.interpolate(scores, size=(size, size), mode="bilinear", align_corners=False)
    return scores.float()


def topk_maps(scores: Tensor, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best classes per location, descending: ``index`` int16 (n, k, S, S), ``score`` float16."""
    k = min(k, scores.shape[1])
    val, idx = scores.topk(k, dim=1)
    return idx.to(torch.int16).cpu().numpy(), val.to(torch.float16).cpu().numpy()


# --------------------------------------------------------------------------------------------------------------
# Sidecar I/O


@dataclass
class LabelMaps:
    """Top-k label maps row-aligned with a training set's rows."""

    index: Tensor  # int16 (n, k, S, S)
    score: Tensor  # float16 (n, k, S, S)

    @property
    def k(self) -> int:
        return int(self.index.shape[1])

    @property
    def size(self) -> int:
        return int(self.index.shape[-1])

    def to(self, device: torch.device | str) -> "LabelMaps":
        return LabelMaps(self.index.to(device), self.score.to(device))


def has_maps(artifact: Path, split: str) -> bool:
    return any((Path(artifact) / MAPS_DIR / split).glob("*.npz"))


def load_maps(artifact: Path, split: str, uids: Sequence[str]) -> LabelMaps:
    """The maps of ``uids`` (in that order) from every shard file of ``split``; a uid without a map is an error."""
    index, score, pos = [], [], {}
    n = 0
    for f in sorted((Path(artifact) / MAPS_DIR / split).glob("*.npz")):
        with np.load(f, allow_pickle=False) as z:
            index.append(z["index"])
            score.append(z["score"])
            for i, u in enumerate(z["uid"].tolist()):
                pos[u] = n + i
            n += len(z["uid"])
    missing = [u for u in uids if u not in pos]
    if missing:
        raise InputError(f"{artifact}: {len(missing)} rows of split '{split}' have no label map (e.g. {missing[0]})")
    rows = np.array([pos[u] for u in uids], dtype=np.int64)
    return LabelMaps(torch.from_numpy(np.concatenate(index)[rows]), torch.from_numpy(np.concatenate(score)[rows]))


def save_maps(path: Path, uids: Sequence[str], index: np.ndarray, score: np.ndarray) -> None:
    """One shard's sidecar, atomically: ``uid`` (n,), ``index`` int16 and ``score`` float16 (n, k, S, S)."""
    if not (len(uids) == len(index) == len(score)):
        raise ValueError("uids, index and score must be row-aligned")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, uid=np.array(list(uids), dtype=str), index=index.astype(np.int16),
                     score=score.astype(np.float16))


def _fold_of_rows(teacher_artifact: Path, uids: Sequence[str]) -> tuple[list[Path], np.ndarray]:
    """Which teacher checkpoint labels each row: the fold that held it out (out-of-fold), else fold 0."""
    ckpts = sorted((Path(teacher_artifact) / "teachers").glob("fold_*.pt"), key=lambda p: int(p.stem.split("_")[1]))
    if not ckpts:
        raise InputError(f"{teacher_artifact}: no teacher checkpoints (teachers/fold_*.pt)")
    fold = np.zeros(len(uids), dtype=np.int64)
    pos = {u: i for i, u in enumerate(uids)}
    for k, p in enumerate(ckpts):
        held = torch.load(p, map_location="cpu", weights_only=True).get("held_out") or []
        for u in held:
            if u in pos:
                fold[pos[u]] = k
    return ckpts, fold


def write_maps(teacher_artifact: Path, pool: Path, rows: Any, out: Path | Callable[[str], Path], size: int = 15,
               k: int = 5, device: str | torch.device = "cpu", batch: int = 512,
               image_size: int | None = None) -> dict[str, Any]:
    """Label maps of the pool ``rows`` (a table of the pool's index rows: key, uid, split, shard, offset, bytes) into
    ``maps/<split>/<shard:05d>.npz`` under ``out`` (a directory, or ``ctx.output``). Each row is labelled by the
    teacher fold that held it out when the teacher artifact is K-fold (no row is mapped by a model that trained on
    it), else by fold 0. Returns what to record in the manifest."""
    import pyarrow as pa

    from stages.teacher import load_teacher
    from stages.train.image_data import decode_rows
    from stages.train.trainer import Encoder, to_nchw

    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(list(rows))
    uids = table.column("uid").to_pylist()
    ckpts, fold = _fold_of_rows(Path(teacher_artifact), uids)
    dev = torch.device(device)
    output = out if callable(out) else (lambda rel: Path(out) / rel)  # type: ignore[operator]
    files = []
    where = list(zip(table.column("split").to_pylist(), table.column("shard").to_pylist()))
    for (split, shard) in sorted(set(where)):
        sel = [i for i, w in enumerate(where) if w == (split, shard)]
        part = table.take(pa.array(sel)).to_pylist()
        idx_parts: list[np.ndarray] = [np.empty(0)] * len(part)
        score_parts: list[np.ndarray] = [np.empty(0)] * len(part)
        for f in np.unique(fold[sel]):
            teacher = load_teacher(teacher_artifact, int(f)).to(dev)
            enc = Encoder(teacher.space, dev)
            mine = [j for j, i in enumerate(sel) if fold[i] == f]
            for a in range(0, len(mine), batch):
                chunk = mine[a:a + batch]
                images = torch.from_numpy(decode_rows(pool, split, [part[j] for j in chunk], image_size))
                scores = dense_scores(teacher, enc(to_nchw(images).to(dev)), size)
                ti, ts = topk_maps(scores, k)
                for j, ii, ss in zip(chunk, ti, ts):
                    idx_parts[j], score_parts[j] = ii, ss
        rel = f"{MAPS_DIR}/{split}/{shard:05d}.npz"
        save_maps(output(rel), [r["uid"] for r in part], np.stack(idx_parts), np.stack(score_parts))
        files.append(rel)
    return {"size": size, "k": k, "files": files, "rows": len(uids), "teacher": str(teacher_artifact),
            "folds_used": sorted(int(f) for f in np.unique(fold)), "dtype": {"index": "int16", "score": "float16"}}


# --------------------------------------------------------------------------------------------------------------
# LabelPooling


def densify(index: Tensor, score: Tensor, num_classes: int) -> Tensor:
    """Scatter top-k (B, k, S, S) into a zero (B, C, S, S) map (ReLabel step 1)."""
    b, _, s, _ = index.shape
    dense = torch.zeros(b, num_classes, s, s, dtype=torch.float32, device=score.device)
    return dense.scatter_(1, index.long(), score.float())


def map_boxes(boxes: Tensor, flips: Tensor) -> Tensor:
    """Boxes in the view's source image (mirrored when it was flipped before cropping) -> the map's coordinates."""
    x1, y1, x2, y2 = boxes.float().unbind(1)
    flip = flips.to(torch.bool)
    return torch.stack([torch.where(flip, 1 - x2, x1), y1, torch.where(flip, 1 - x1, x2), y2], 1)


def roi_boxes(boxes: Tensor, flips: Tensor, size: int) -> Tensor:
    """RoIAlign boxes on an S x S map as ReLabel makes them (scaled by S, shifted by -0.5, aligned=False), with
    RoIAlign's minimum extent of one cell applied *before* mirroring a flipped view, so a flip mirrors exactly the
    region that is pooled (RoIAlign would otherwise grow a thin mirrored box on the other side)."""
    x1, y1, x2, y2 = (boxes.float() * size - 0.5).unbind(1)
    x2, y2 = torch.maximum(x2, x1 + 1), torch.maximum(y2, y1 + 1)
    flip = flips.to(torch.bool)
    last = size - 1.0
    return torch.stack([torch.where(flip, last - x2, x1), y1, torch.where(flip, last - x1, x2), y2], 1)


def _axis_weights(lo: Tensor, hi: Tensor, size: int) -> Tensor:
    """(B, S): RoIAlign's weight per cell along one axis for 1x1 output, exactly as torchvision samples: ceil(extent)
    points at bin centres, bilinear, a point beyond one cell outside contributes nothing, clamped at the border."""
    extent = hi - lo
    grid = torch.ceil(extent).clamp(min=1)
    a = torch.arange(int(grid.max().item()), device=lo.device, dtype=lo.dtype)
    pts = lo[:, None] + (a[None] + 0.5) * extent[:, None] / grid[:, None]
    use = ((a[None] < grid[:, None]) & (pts >= -1) & (pts <= size)).to(lo.dtype) / grid[:, None]
    p = pts.clamp(min=0)
    low = p.floor().long()
    end = low >= size - 1
    low = torch.where(end, torch.full_like(low, size - 1), low)
    p = torch.where(end, low.to(p.dtype), p)
    high = torch.where(end, low, low + 1)
    frac = p - low.to(p.dtype)
    w = torch.zeros(len(lo), size, device=lo.device, dtype=lo.dtype)
    return w.scatter_add_(1, low, (1 - frac) * use).scatter_add_(1, high, frac * use)


def roi_weights(rois: Tensor, size: int) -> Tensor:
    """(B, S*S): the weight ``roi_align(..., output_size=1, aligned=False)`` gives every cell of an S x S map for
    each box (``roi_boxes``). For a 1x1 output its sampling grid and bilinear weights separate into rows x columns,
    so this is an outer product of two (B, S) vectors; pooling the sparse top-k is then a weighted scatter-add,
    never a dense C x S x S map (C = 1000, S = 15: 460 MB per batch of 512)."""
    x1, y1, x2, y2 = rois.float().unbind(1)
    wy, wx = _axis_weights(y1, y2, size), _axis_weights(x1, x2, size)
    return (wy[:, :, None] * wx[:, None, :]).flatten(1)


def label_pool(index: Tensor, score: Tensor, boxes: Tensor, flips: Tensor, num_classes: int,
               fill: Fill = "zero") -> Tensor:
    """Soft targets (B, C) of one crop per sample: RoIAlign 1x1 of the densified top-k map over the crop box (equal to
    ``torchvision.ops.roi_align`` on the dense map, computed sparsely: ``roi_weights``), then a softmax over classes.

    ``boxes``: (B, 4) ``(x1, y1, x2, y2)`` in [0, 1] of the image the crop was taken from; ``flips[i]``: that
    image was the horizontal mirror of the mapped one (flip, then crop), so the box is mirrored into the map's
    coordinates. (A flip *after* the crop changes nothing: the output is 1x1.)
    ``fill``: ``zero`` as ReLabel publishes (non-top-k classes score 0 before the softmax, so they keep mass
    proportional to e^0); ``neg_inf``: classes in no location's top-k under the box get no mass (the others pool
    as with zero fill)."""
    b = len(boxes)
    size = index.shape[-1]
    weights = roi_weights(roi_boxes(boxes.to(score.device), flips.to(score.device), size), size)  # (B, S*S)
    flat_index = index.long().flatten(2).flatten(1)  # (B, k*S*S), location-major within each of the k
    contrib = (score.float().flatten(2) * weights[:, None, :]).flatten(1)
    pooled = torch.zeros(b, num_classes, device=score.device).scatter_add_(1, flat_index, contrib)
    if fill == "neg_inf":
        seen = torch.zeros(b, num_classes, device=score.device).scatter_add_(
            1, flat_index, weights[:, None, :].expand(-1, index.shape[1], -1).flatten(1)) > 0
        pooled = pooled.masked_fill(~seen, float("-inf"))
    elif fill != "zero":
        raise ValueError(f"fill must be 'zero' or 'neg_inf', got {fill!r}")
    return pooled.softmax(1)
