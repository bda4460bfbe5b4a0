"""Export carries labels: the ``labels`` member hook (``stages.selections.reshard.MEMBER_HOOKS``).

For every exported sample the labels artifact describes:

    {key}.cls          the label to train with (the artifact's ``label``: the suggestion when the action is
                       ``relabel``); the new index row carries the same
    {key}.soft.npy     the dense soft label, float32 (C,) (``store.soft_targets``: the top-k where they are, the
                       rest of the mass spread evenly), ``np.load``-able
    {key}.labels.json  {"label", "given", "suggested", "multi", "action", "noise_score", "flagged", "topk_index",
                       "topk_prob"}

Rows whose action is ``drop`` are left out as rejects with reason ``label-noise`` (so in == out + rejected).
Rows the artifact does not describe (typically the test split) are exported as they are, without label members.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import Artifact
from stages.labeling.store import load_labels
from stages.selections.reshard import MEMBER_HOOKS, MemberHook, Rejected

DROP_REASON = "label-noise"
SOFT_MEMBER, LABELS_MEMBER = "soft.npy", "labels.json"


def soft_row(index: np.ndarray, prob: np.ndarray, num_classes: int) -> np.ndarray:
    """One dense soft label from its top-k, exactly as ``store.soft_targets`` densifies a table."""
    out = np.zeros(num_classes, np.float32)
    k = len(index)
    if k < num_classes:
        rest = np.float32(max(1.0 - float(np.sum(prob, dtype=np.float64)), 0.0))
        out[:] = np.float32(np.float64(rest) / (num_classes - k))
    out[index.astype(np.int64)] = prob.astype(np.float32)
    return out


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


class LabelMembers:
    """The hook for one labels artifact: a uid -> row lookup over columns held as arrays (no per-row tables)."""

    def __init__(self, artifact: Path) -> None:
        t = load_labels(artifact)
        meta = Artifact(artifact).manifest().metrics
        self.num_classes = int(meta.get("num_classes") or len(meta.get("classes") or []))
        if self.num_classes <= 0:
            raise ValueError(f"{artifact}: the labels manifest names no num_classes")
        self.row = {u: i for i, u in enumerate(t.column("uid").to_pylist())}
        self.cols = {c: t.column(c).to_numpy() for c in ("given", "label", "suggested", "noise_score", "flagged")}
        self.action = t.column("action").to_pylist()
        self.lists = {}
        for c in ("topk_index", "topk_prob", "multi"):
            arr = t.column(c).combine_chunks()
            self.lists[c] = (arr.offsets.to_numpy(), arr.values.to_numpy())

    def _list(self, name: str, i: int) -> np.ndarray:
        offsets, values = self.lists[name]
        return values[offsets[i]:offsets[i + 1]]

    def __call__(self, row: dict[str, Any]) -> dict[str, bytes]:
        i = self.row.get(row["uid"])
        if i is None:
            return {}
        if self.action[i] == "drop":
            raise Rejected(DROP_REASON)
        row["label"] = int(self.cols["label"][i])
        idx, prob = self._list("topk_index", i), self._list("topk_prob", i)
        info = {"label": row["label"], "given": int(self.cols["given"][i]), "suggested": int(self.cols["suggested"][i]),
                "multi": self._list("multi", i).astype(int).tolist(), "action": self.action[i],
                "noise_score": float(self.cols["noise_score"][i]), "flagged": bool(self.cols["flagged"][i]),
                "topk_index": idx.astype(int).tolist(), "topk_prob": [float(p) for p in prob]}
        return {SOFT_MEMBER: npy_bytes(soft_row(idx, prob, self.num_classes)),
                LABELS_MEMBER: json.dumps(info, sort_keys=True).encode()}


@MEMBER_HOOKS.register("labels")
def labels_members(artifact: Path) -> MemberHook:
    return LabelMembers(Path(artifact))


def exported_labels(artifact: Path) -> dict[str, Any]:
    """What an export records about the labels it carries (``metrics.labels``), read by the trainer's shards loader."""
    import pyarrow.compute as pc

    m = Artifact(artifact).manifest()
    lengths = pc.list_value_length(load_labels(artifact, columns=["topk_index"]).column("topk_index"))
    return {"artifact_id": m.artifact_id, "path": str(Path(artifact).resolve()),
            "num_classes": int(m.metrics.get("num_classes") or len(m.metrics.get("classes") or [])),
            "members": {"soft": SOFT_MEMBER, "labels": LABELS_MEMBER, "soft_dtype": "float32"},
            "max_k": int(pc.max(lengths).as_py() or 0), "drop_reason": DROP_REASON}


def load_exported_soft(artifact: Path, split: str, keys: list[str], num_classes: int) -> np.ndarray:
    """(n, C) float32 soft rows of ``keys`` read from the ``{key}.soft.npy`` members of an export's tars."""
    import tarfile

    want = {k: i for i, k in enumerate(keys)}
    out = np.full((len(keys), num_classes), np.nan, np.float32)
    suffix = "." + SOFT_MEMBER
    for tar in sorted((Path(artifact) / "shards" / split).glob("*.tar")):
        with tarfile.open(tar) as tf:
            for member in tf:
                name = member.name.rsplit("/", 1)[-1]
                if name.endswith(suffix) and name[:-len(suffix)] in want:
                    out[want[name[:-len(suffix)]]] = np.load(io.BytesIO(tf.extractfile(member).read()))  # type: ignore[union-attr]
    missing = int(np.isnan(out).any(1).sum())
    if missing:
        raise ValueError(f"{artifact}: {missing} samples of split '{split}' have no {SOFT_MEMBER} member")
    return out
