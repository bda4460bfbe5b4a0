"""An external teacher (trained on other data) labels a pool: prune's ``exclude`` input makes the disjoint training
set, the teacher records what it trained on, and the ``teacher`` source predicts the pool's images with it only
after showing it never saw one of them; its flags find injected noise."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from conftest import run_pipeline
from pipeline.errors import InputError
from stages.labeling.store import load_labels
from stages.labeling.teacher import external_probs, seen_rows
from stages.teacher import TRAINED_ON_FILE, load_teacher
from stages.train.image_data import decode_rows

TEACHER = {"recipe": "standard-dd", "seed": 0, "image_size": 16,
           "overrides": {"epochs": 5, "batch_size": 32, "lr": 0.05, "mtt_exact": False, "augmentation": {"name": "none"},
                         "network_kwargs": {"width": 16, "norm": "batchnorm", "depth": 2}}}


@pytest.fixture(scope="module")
def external_run(digits_shards, tmp_path_factory, client):
    out = tmp_path_factory.mktemp("external") / "run"
    shards = str(digits_shards.path)
    manifest = {"name": "external", "output_dir": str(out), "stages": [
        {"name": "half", "stage": "prune", "inputs": {"shards": shards},
         "params": {"method": "random", "fraction": 0.5, "seed": 1}},
        {"name": "rest", "stage": "prune", "inputs": {"shards": shards, "exclude": "half"},
         "params": {"method": "random", "fraction": 1.0}},
        {"name": "teacher", "inputs": {"data": "half"}, "params": TEACHER},
        {"name": "corrupt", "inputs": {"data": "rest"}, "params": {"rate": 0.08, "seed": 2}},
        {"name": "relabel", "inputs": {"data": "corrupt", "teacher": "teacher"},
         "params": {"sources": [{"source": "teacher"}], "action": "relabel", "flags_shown": 0}},
    ]}
    return manifest, {r.name: r for r in run_pipeline(manifest, client)}


def _uids(selection):
    t = pq.read_table(selection / "kept.parquet")
    return {u for u, s in zip(t["uid"].to_pylist(), t["split"].to_pylist()) if s == "train"}


def test_exclude_gives_the_exact_complement(external_run, digits_shards):
    _, res = external_run
    half, rest = _uids(res["half"].path), _uids(res["rest"].path)
    index = pq.read_table(digits_shards.path / "index.parquet")
    train = {u for u, s in zip(index["uid"].to_pylist(), index["split"].to_pylist()) if s == "train"}
    assert half and rest and not (half & rest) and half | rest == train
    m = json.loads((res["rest"].path / "manifest.json").read_text())
    assert m["counts"]["in"] == len(train) and m["counts"]["out"] == len(rest)
    assert m["counts"]["rejected_by_reason"] == {"excluded: held out by the exclude input": len(half)}
    dropped = pq.read_table(res["rest"].path / "dropped.parquet")
    assert set(dropped["uid"].to_pylist()) == half  # counts in = out + rejects, and the rejects are the held-out rows


def test_the_teacher_records_what_it_trained_on(external_run, digits_shards):
    _, res = external_run
    trained = pq.read_table(res["teacher"].path / TRAINED_ON_FILE)
    assert set(trained["uid"].to_pylist()) == _uids(res["half"].path)
    index = pq.read_table(digits_shards.path / "index.parquet").to_pandas().set_index("uid")
    assert trained["sha256"].to_pylist() == index.loc[trained["uid"].to_pylist(), "sha256"].tolist()


def test_external_labels_are_the_teachers_own_predictions_and_find_the_noise(external_run):
    _, res = external_run
    corrupt, teacher = res["corrupt"].path, res["teacher"].path
    m = json.loads((res["relabel"].path / "manifest.json").read_text())
    assert m["metrics"]["sources"]["mode"] == "auto" and m["counts"]["rejected"] == 0
    lab = load_labels(res["relabel"].path).to_pandas().set_index("uid")
    noise = pq.read_table(corrupt / "noise.parquet").to_pandas().set_index("uid").loc[lab.index]
    truth = noise["corrupted"].to_numpy(bool)
    flagged = lab["flagged"].to_numpy(bool)
    recall, precision = (flagged & truth).sum() / truth.sum(), (flagged & truth).sum() / max(flagged.sum(), 1)
    assert recall >= 0.7 and precision >= 0.5, (recall, precision)
    # the soft label's top-1 is the teacher's own prediction on the image, recomputed by hand
    index = pq.read_table(corrupt / "index.parquet").to_pandas().set_index("uid")
    rows = index.loc[lab.index[:40]].reset_index()
    images = decode_rows(corrupt, "train", rows.to_dict("records"), 16)
    model = load_teacher(teacher)
    by_hand = torch.softmax(model.logits(torch.from_numpy(images)), 1).numpy()
    top = np.array([r[0] for r in lab["topk_index"].iloc[:40]])
    np.testing.assert_array_equal(top, by_hand.argmax(1))
    np.testing.assert_allclose([r[0] for r in lab["topk_prob"].iloc[:40]], by_hand.max(1), atol=1e-5)


def test_a_teacher_that_saw_the_rows_or_cannot_show_it_is_refused(external_run, client, tmp_path):
    _, res = external_run
    corrupt = res["corrupt"].path
    index = pq.read_table(corrupt / "index.parquet")
    rows = index.filter(pc.equal(index["split"], "train"))
    # a teacher trained on the rows (the corrupt pool itself, one fold) is refused, naming a row
    own = run_pipeline({"name": "own", "output_dir": str(tmp_path / "own"), "stages": [
        {"name": "teacher", "inputs": {"data": str(corrupt)},
         "params": {**TEACHER, "overrides": {**TEACHER["overrides"], "epochs": 1}}}]}, client)[0]
    with pytest.raises(InputError, match="trained on .* of the .* rows"):
        external_probs(own.path, corrupt, rows, json.loads((corrupt / "classes.json").read_text()))
    # the same image under another uid still counts as seen (by content)
    trained = pq.read_table(res["teacher"].path / TRAINED_ON_FILE)
    renamed = pa.table({"uid": ["elsewhere/0.png"], "sha256": [trained["sha256"][0].as_py()]})
    assert seen_rows(trained, renamed).tolist() == [True]
    assert seen_rows(trained, pa.table({"uid": ["elsewhere/0.png"], "sha256": ["0" * 64]})).tolist() == [False]
    # a teacher without a record of its training rows cannot label as external
    blind = tmp_path / "blind"
    shutil.copytree(res["teacher"].path, blind)
    (blind / TRAINED_ON_FILE).unlink()
    with pytest.raises(InputError, match="nothing shows which rows it trained on"):
        run_pipeline({"name": "b", "output_dir": str(tmp_path / "b"), "stages": [
            {"name": "relabel", "inputs": {"data": str(corrupt), "teacher": str(blind)},
             "params": {"sources": [{"source": "teacher"}]}}]}, client)
    # asking for out-of-fold labels from a one-fold teacher names the fix
    with pytest.raises(InputError, match="mode: external"):
        run_pipeline({"name": "c", "output_dir": str(tmp_path / "c"), "stages": [
            {"name": "relabel", "inputs": {"data": str(corrupt), "teacher": str(res["teacher"].path)},
             "params": {"sources": [{"source": "teacher", "mode": "out_of_fold"}]}}]}, client)
