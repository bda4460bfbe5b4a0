"""``teacher``: class probabilities from a teacher artifact (``stages/teacher.py``) that never trained on the rows it
labels (a model that saw a sample, with its possibly wrong label, cannot judge that label). Two ways to get them:

* ``out_of_fold``: a teacher trained on this pool with ``folds: K`` (K >= 2); each row is labelled by the fold
  model that held it out (``oof_predictions.parquet``). One whose records show a prediction from a model that
  trained on the sample is refused.
* ``external``: a teacher trained on *other* data (a stand-in for a pretrained labeller: ReLabel's teacher, CLIP
  fine-tuned elsewhere); it predicts the rows' images (the average of its folds when it has several). It is refused
  unless its ``trained_on.parquet`` shows that none of the rows, by uid or by image content (sha256), was in its
  training set.

``mode: auto`` is ``out_of_fold`` for a K-fold teacher and ``external`` for a single one."""
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


Mode = Literal["auto", "out_of_fold", "external"]


class TeacherSourceParams(SourceParams):
    source: Literal["teacher"] = "teacher"
    mode: Mode = "auto"


def _manifest(teacher: Path) -> dict[str, Any]:
    m = json.loads((teacher / "manifest.json").read_text())
    if m.get("stage") != "teacher":
        raise InputError(f"{teacher}: label source 'teacher' needs a teacher artifact (this is a "
                         f"'{m.get('stage')}' artifact)")
    return m


def resolve_mode(teacher: Path, mode: Mode) -> Literal["out_of_fold", "external"]:
    if mode != "auto":
        return mode
    folds = int((_manifest(teacher).get("params") or {}).get("folds") or 1)
    return "out_of_fold" if folds >= 2 else "external"


def teacher_folds(teacher: Path) -> int:
    """The teacher's ``folds``; an error unless it is >= 2 and its out-of-fold predictions exist."""
    folds = int((_manifest(teacher).get("params") or {}).get("folds") or 1)
    if folds < 2:
        raise InputError(f"{teacher}: out-of-fold labels need a teacher trained with folds: K (K >= 2), so no "
                         f"sample is labelled by a model that trained on it (this one: folds {folds}; a teacher "
                         f"trained on other data labels with mode: external)")
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


def trained_on(teacher: Path) -> pa.Table:
    from stages.teacher import TRAINED_ON_FILE

    path = teacher / TRAINED_ON_FILE
    if not path.is_file():
        raise InputError(f"{teacher}: no {TRAINED_ON_FILE}, so nothing shows which rows it trained on (a teacher "
                         f"from before stage version 3: re-run it); an external teacher must prove it never saw "
                         f"the rows it labels")
    t = pq.read_table(path)
    if t.num_rows == 0:
        raise InputError(f"{teacher}: its training set has no row ids (a synthetic set?), so nothing shows it never "
                         f"saw the rows it would label")
    return t


def seen_rows(trained: pa.Table, rows: pa.Table) -> np.ndarray:
    """Which ``rows`` (uid, sha256) the teacher trained on: the same uid, or the same image bytes under another
    name. Conservative: a uid that merely collides across sources also counts as seen."""
    seen = pc.is_in(rows["uid"], value_set=trained["uid"].combine_chunks()).to_numpy(zero_copy_only=False)
    hashes = trained["sha256"].combine_chunks().drop_null()
    if len(hashes) and "sha256" in rows.column_names:
        same = pc.fill_null(pc.is_in(rows["sha256"], value_set=hashes), False)
        seen = seen | same.to_numpy(zero_copy_only=False)
    return seen


def external_probs(teacher: Path, data: Path, rows: pa.Table, classes: list[str], batch: int = 1024) -> np.ndarray:
    """(n, C) softmax of an external teacher over the images of ``rows`` (the average over its folds), in row order;
    an error if it trained on any of them or predicts another class set."""
    import torch

    from stages.sharding.pool import find_pool
    from stages.teacher import load_teacher
    from stages.train.image_data import decode_rows

    pool = find_pool(data)
    index = pq.read_table(pool / "index.parquet")
    pos = align(rows["uid"], index["uid"])
    if (pos < 0).any():
        raise InputError(f"{data}: {int((pos < 0).sum())} rows are not in its pool {pool}")
    located = index.take(pa.array(pos))
    seen = seen_rows(trained_on(teacher), located)
    if seen.any():
        example = located["uid"][int(np.flatnonzero(seen)[0])].as_py()
        raise InputError(f"{teacher}: trained on {int(seen.sum())} of the {len(seen)} rows it would label (e.g. "
                         f"{example}); an external teacher must never have seen them: train it on other data, or "
                         f"use a K-fold teacher of this pool (mode: out_of_fold)")
    params = _manifest(teacher).get("params") or {}
    size = params.get("image_size")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    folds = sorted((teacher / "teachers").glob("fold_*.pt"))
    if not folds:
        raise InputError(f"{teacher}: no teacher checkpoints (teachers/fold_*.pt)")
    models = [load_teacher(teacher, f) for f in range(len(folds))]
    for model in models:
        if list(model.meta.get("classes") or classes) != list(classes):
            raise InputError(f"{teacher}: the teacher predicts the classes {model.meta['classes'][:5]}..., the pool "
                             f"has {classes[:5]}...")
    out = np.zeros((len(pos), len(classes)), dtype=np.float64)
    groups: dict[tuple[str, int], list[int]] = {}
    for i, (split, shard) in enumerate(zip(located["split"].to_pylist(), located["shard"].to_pylist())):
        groups.setdefault((split, shard), []).append(i)
    for (split, _), members in sorted(groups.items()):
        for a in range(0, len(members), batch):
            chunk = members[a:a + batch]
            images = torch.from_numpy(decode_rows(pool, split, located.take(pa.array(chunk)).to_pylist(), size))
            for model in models:  # each image decoded once, whatever the number of folds
                out[chunk] += torch.softmax(model.logits(images, dev), 1).double().numpy()
    return out / len(folds)


@LABEL_SOURCES.register()
class TeacherSource(LabelSource):
    name = "teacher"
    Params = TeacherSourceParams
    needs = ("teacher",)

    missing_reason = "teacher: no out-of-fold prediction (not in the teacher's training set)"

    def requires(self) -> tuple[str, ...]:
        return ("teacher", "data") if self.params.mode == "external" else self.needs

    def check(self, inputs: dict[str, Path]) -> None:
        super().check(inputs)
        if resolve_mode(inputs["teacher"], self.params.mode) == "out_of_fold":
            teacher_folds(inputs["teacher"])
        else:
            trained_on(inputs["teacher"])

    def probs(self, rows: pa.Table, inputs: dict[str, Path], classes: list[str]) -> np.ndarray:
        if resolve_mode(inputs["teacher"], self.params.mode) == "external":
            return external_probs(inputs["teacher"], inputs["data"], rows, classes)
        verify_out_of_fold(inputs["teacher"])
        uids, probs = oof_probs(inputs["teacher"])
        if len(probs) and probs.shape[1] != len(classes):
            raise InputError(f"{inputs['teacher']}: the teacher predicts {probs.shape[1]} classes, the pool has "
                             f"{len(classes)}")
        return take_rows(probs, align(rows.column("uid"), uids))
