"""ReaL-style accuracy: hand-made label sets with known numbers, and through the validate stage."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import torch

from conftest import run_pipeline
from curation_fakes import index, write_manifest
from labeling_fakes import digit_probs, labels_table
from stages.labeling.multilabel import label_sets_of, predict, real_accuracy
from stages.labeling.store import LABELS_FILE, write_labels
from stages.train.networks import create_network
from stages.train.model_space import fixed
from stages.train.trainer import evaluate


def test_real_top1_on_hand_made_sets():
    sets = np.zeros((6, 4), bool)
    sets[0, [0]] = sets[1, [0, 1]] = sets[3, [1]] = sets[4, [2, 3]] = sets[5, [0]] = True  # row 2: empty set
    pred = np.array([0, 1, 2, 3, 3, 0])
    labelled = np.array([True, True, True, True, True, False])  # row 5: no set at all
    got = real_accuracy(pred, sets, labelled)
    assert got == {"real_top1": 100 * 3 / 4, "evaluated": 4, "excluded_empty": 1, "excluded_unlabelled": 1}
    assert real_accuracy(pred, np.zeros((6, 4), bool))["real_top1"] is None


def test_singleton_sets_give_top1():
    torch.manual_seed(0)
    net = create_network("resnet18", num_classes=4, width=4).eval()
    images = torch.randint(0, 256, (50, 16, 16, 3), dtype=torch.uint8)
    labels = torch.randint(0, 4, (50,))
    space = fixed([0.5] * 3, [0.25] * 3)
    top1 = evaluate(net, images, labels, space=space)["top1"]
    sets = np.eye(4, dtype=bool)[labels.numpy()]
    assert real_accuracy(predict(net, images, space), sets)["real_top1"] == top1


def test_validate_reports_real_top1_beside_top1(digits_shards, tmp_path, client):
    """Every test image's set holds every class (ReaL top-1 must be 100), 10 sets are empty and 20 images have
    none: they are excluded and counted."""
    pool = digits_shards.path
    rows = index(pool, "test").slice(20)  # the first 20 test images are not in the artifact
    table = labels_table(rows, digit_probs(rows.column("label").to_numpy()))
    multi = [[] if i < 10 else list(range(10)) for i in range(rows.num_rows)]
    table = table.set_column(table.schema.get_field_index("multi"), "multi", pa.array(multi, pa.list_(pa.int16())))
    art = tmp_path / "test_labels"
    art.mkdir()
    write_labels(art / LABELS_FILE, table)
    write_manifest(art, "labels", "relabel", {"num_classes": 10})
    sets, labelled = label_sets_of(art, "test", index(pool, "test").column("uid").to_pylist(), 10)
    assert labelled.sum() == rows.num_rows and sets[20:30].sum() == 0 and sets[30:].all()
    res = run_pipeline({"name": "real", "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "validate", "inputs": {"train": str(pool), "test_labels": str(art)},
         "params": {"recipe": "fast", "seeds": [0], "overrides": {"epochs": 1, "batch_size": 256,
                                                                 "network_kwargs": {"width": 8}}}}]}, client)
    m = json.loads((res[0].path / "metrics.json").read_text())
    assert m["real_top1_mean"] == 100.0 and 0 <= m["top1_mean"] <= 100
    assert m["real"] == {"evaluated": index(pool, "test").num_rows - 30, "excluded_empty": 10,
                         "excluded_unlabelled": 20}
