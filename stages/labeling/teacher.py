"""``teacher``: out-of-fold probabilities of a teacher artifact trained with ``folds: K`` (K >= 2)
(``oof_predictions.parquet`` of ``stages/teacher.py``): every sample is labelled by the fold model that did not
train on it. A teacher without folds is refused (a model that saw a sample, with its possibly wrong label, cannot
judge that label), and so is one whose records show a prediction from a model that trained on the sample."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import InputError
from stages.labeling.base import LABEL_SOURCES, LabelSource, SourceParams, align, take_rows

OOF_FILE = "oof_predictions.parquet"


class TeacherSourceParams(SourceParams):
    source: Literal["teacher"] = "teacher"


def teacher_folds(teacher: Path) -> int:
    """The teacher's ``folds``; an error unless it is >= 2 and its out-of-fold predictions exist."""
    manifest = json.loads((teacher / "manifest.json").read_text())
    folds = int((manifest.get("params") or {}).get("folds") or 1)
    if manifest.get("stage") != "teacher" or folds < 2:
        raise InputError(f"{teacher}: label source 'teacher' needs a teacher trained with folds: K (K >= 2), so no "
                         f"sample is labelled by a model that trained on it (this one: folds {folds})")
    if not (teacher / OOF_FILE).is_file():
        raise InputError(f"{teacher}: no {OOF_FILE} (an incomplete teacher artifact?)")
    return folds


def verify_out_of_fold(teacher: Path) -> dict[str, Any]:
    """Check from the teacher's own records that each out-of-fold prediction came from a fold model that never
    trained on the sample: the rows fold k predicted (``oof/fold_k.npz`` index into ``oof_predictions.parquet``)
    must be among the uids its checkpoint says it held out, and every row is predicted exactly once."""
    import torch

    folds = teacher_folds(teacher)
    uids = pq.read_table(teacher / OOF_FILE, columns=["uid"]).column("uid").to_numpy(zero_copy_only=False)
    seen = np.zeros(len(uids), np.int64)
    for k in range(folds):
        with np.load(teacher / "oof" / f"fold_{k}.npz", allow_pickle=False) as z:
            index = z["index"]
        held = set(torch.load(teacher / "teachers" / f"fold_{k}.pt", map_location="cpu", weights_only=True)
                   ["held_out"])
        trained_on = [u for u in uids[index] if u not in held]
        if trained_on:
            raise InputError(f"{teacher}: fold {k} predicted {len(trained_on)} samples it trained on "
                             f"(e.g. {trained_on[0]}); its predictions are not out of fold")
        seen[index] += 1
    if not np.all(seen == 1):
        raise InputError(f"{teacher}: {int((seen != 1).sum())} rows are not predicted exactly once across folds")
    return {"folds": folds, "rows": len(uids)}


def oof_probs(teacher: Path) -> tuple[pa.Array, np.ndarray]:
    """uids and (n, C) out-of-fold probabilities."""
    t = pq.read_table(teacher / OOF_FILE, columns=["uid", "probs"])
    flat = pc.list_flatten(t.column("probs")).to_numpy(zero_copy_only=False).astype(np.float64)
    return t.column("uid"), flat.reshape(t.num_rows, -1) if t.num_rows else np.zeros((0, 1))


@LABEL_SOURCES.register()
class TeacherSource(LabelSource):
    name = "teacher"
    Params = TeacherSourceParams
    needs = ("teacher",)

    missing_reason = "teacher: no out-of-fold prediction (not in the teacher's training set)"

    def check(self, inputs: dict[str, Path]) -> None:
        super().check(inputs)
        teacher_folds(inputs["teacher"])

    def probs(self, rows: pa.Table, inputs: dict[str, Path], classes: list[str]) -> np.ndarray:
        verify_out_of_fold(inputs["teacher"])
        uids, probs = oof_probs(inputs["teacher"])
        if len(probs) and probs.shape[1] != len(classes):
            raise InputError(f"{inputs['teacher']}: the teacher predicts {probs.shape[1]} classes, the pool has "
                             f"{len(classes)}")
        return take_rows(probs, align(rows.column("uid"), uids))
