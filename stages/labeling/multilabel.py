"""ReaL-style multi-label evaluation (Beyer et al. 2020, "Are we done with ImageNet?"): a prediction counts as
correct when it is in the image's label set; images with an empty set are excluded from the metric (and counted),
as timm's ``RealLabelsImagenet`` does."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from stages.labeling.store import load_labels, multi_hot


def real_accuracy(pred: np.ndarray, sets: np.ndarray, labelled: np.ndarray | None = None) -> dict[str, Any]:
    """``pred`` (n,) top-1 classes, ``sets`` (n, C) bool label sets, ``labelled`` (n,) rows that have a set at all.
    ReaL top-1 (%) over the rows with a non-empty set; the excluded rows counted by why."""
    labelled = np.ones(len(pred), bool) if labelled is None else np.asarray(labelled, bool)
    nonempty = labelled & sets.any(1)
    hit = sets[np.arange(len(pred)), np.asarray(pred, np.int64)] & nonempty
    n = int(nonempty.sum())
    return {"real_top1": 100.0 * int(hit.sum()) / n if n else None, "evaluated": n,
            "excluded_empty": int((labelled & ~sets.any(1)).sum()), "excluded_unlabelled": int((~labelled).sum())}


def label_sets_of(artifact: Path, split: str, uids: Sequence[str],
                  num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, C) label sets of ``uids`` from a labels artifact's ``split`` rows, and which uids it describes at all."""
    table = load_labels(artifact, split, columns=["uid", "multi"])
    sets = multi_hot(table, num_classes)
    pos = {u: i for i, u in enumerate(table.column("uid").to_pylist())}
    out = np.zeros((len(uids), num_classes), bool)
    labelled = np.array([u in pos for u in uids], bool)
    rows = [pos[u] for u in uids if u in pos]
    out[labelled] = sets[rows]
    return out, labelled


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, space: Any, device: torch.device | str = "cpu",
            batch_size: int = 1024) -> np.ndarray:
    """Top-1 classes of uint8 images (NHWC or NCHW) in eval mode, mapped into the training ``space``."""
    from stages.train.trainer import Encoder, to_nchw

    dev = torch.device(device)
    model = model.to(dev).eval()
    enc, x = Encoder(space, dev, "uint8 test images"), to_nchw(images)
    return torch.cat([model(enc(x[i:i + batch_size].to(dev))).argmax(1).cpu()
                      for i in range(0, len(x), batch_size)]).numpy()
