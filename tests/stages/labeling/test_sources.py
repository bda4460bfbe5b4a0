"""Label sources: kNN without the sample itself (and what it does with duplicates), CLIP zero-shot against open_clip
computed by hand, the combination's weights, and the refusals (a teacher without folds, a mismatched CLIP)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from curation_fakes import fake_embeddings, fake_pool, index, write_manifest
from pipeline.errors import InputError
from stages.labeling import create_label_source
from stages.labeling.neighbours import knn_excluding_self, neighbour_distribution
from stages.labeling.teacher import teacher_folds


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_knn_excludes_the_sample_itself_but_keeps_its_exact_duplicates():
    rng = np.random.default_rng(0)
    x = _unit(rng.normal(size=(30, 8)))
    x[7] = x[3]  # an exact duplicate pair
    sims, idx = knn_excluding_self(x, 4)
    assert idx.shape == (30, 4)
    assert not np.any(idx == np.arange(30)[:, None]), "a sample is never its own neighbour"
    assert idx[3, 0] == 7 and idx[7, 0] == 3 and abs(sims[3, 0] - 1) < 1e-5  # the duplicate votes
    brute = np.argsort(-(x @ x.T - 10 * np.eye(30)), axis=1, kind="stable")[:, :4]
    assert all(set(a) == set(b) for a, b in zip(idx[[0, 1, 2, 10]], brute[[0, 1, 2, 10]]))


def test_neighbour_distribution_votes_weights_and_smoothing():
    labels = np.array([0, 1, 1, 2])
    idx = np.array([[1, 2, 3]])
    sims = np.array([[0.9, 0.5, -0.2]])
    np.testing.assert_allclose(neighbour_distribution(labels, sims, idx, 3), [[0, 2 / 3, 1 / 3]])
    np.testing.assert_allclose(neighbour_distribution(labels, sims, idx, 3, weighted=True), [[0, 1, 0]])
    np.testing.assert_allclose(neighbour_distribution(labels, sims, idx, 3, smoothing=0.3),
                               [[0.1, 0.7 * 2 / 3 + 0.1, 0.7 / 3 + 0.1]])


def test_neighbours_source_uses_the_given_labels_of_the_rows(tmp_path):
    labels = np.repeat([0, 1], 20)
    pool = fake_pool(tmp_path / "pool", labels)
    rng = np.random.default_rng(1)
    centres = _unit(rng.normal(size=(2, 16)))
    vec = _unit(centres[labels] + 0.05 * rng.normal(size=(40, 16)))
    emb = fake_embeddings(tmp_path / "emb", pool, vec)
    rows = index(pool).select(["key", "uid", "split", "shard", "label"])
    given = labels.copy()
    given[5] = 1  # a wrong given label: its neighbours (labelled 0) outvote it, and it does not vote for itself
    rows = rows.set_column(rows.column_names.index("label"), "label", pa.array(given, pa.int32()))
    p = create_label_source({"source": "neighbours", "k": 5, "smoothing": 0}).probs(rows, {"embeddings": emb},
                                                                                    ["a", "b"])
    assert p.shape == (40, 2) and np.allclose(p.sum(1), 1)
    assert p[5].tolist() == [1.0, 0.0]
    assert p[6, 0] >= 0.8  # one of five neighbours may be the mislabelled one


def test_combine_is_the_weighted_average(tmp_path, monkeypatch):
    from stages.labeling import combine as comb

    a, b = np.array([[1.0, 0.0]]), np.array([[0.0, 1.0]])
    np.testing.assert_allclose(comb.weighted_average([a, b], [3, 1]), [[0.75, 0.25]])
    src = create_label_source({"source": "combine", "sources": [{"source": "teacher", "weight": 0.5},
                                                                {"source": "neighbours", "k": 3, "weight": 0.5}]})
    assert src.requires() == ("teacher", "embeddings")
    with pytest.raises(InputError, match="needs the input"):
        src.check({"teacher": tmp_path})


def test_a_teacher_without_folds_gives_no_out_of_fold_labels(tmp_path):
    t = write_manifest(tmp_path / "t", "model", "teacher", params={"folds": 1})
    with pytest.raises(InputError, match="folds: K"):
        teacher_folds(t)
    with pytest.raises(InputError, match="folds: K"):
        create_label_source({"source": "teacher", "mode": "out_of_fold"}).check({"teacher": t})
    # by default a one-fold teacher is an external labeller, which must show what it trained on
    with pytest.raises(InputError, match="nothing shows which rows it trained on"):
        create_label_source("teacher").check({"teacher": t})


def _tiny_clip_embeddings(tmp_path, pool, seed=1):
    """An embeddings artifact of the pool's rows made by a tiny open_clip model (random weights file)."""
    from stages.embedders import create_embedder
    from tinyclip import tiny_clip_config, tiny_clip_weights

    cfg = tiny_clip_config(tmp_path / "cfg")
    weights = tmp_path / f"w{seed}.safetensors"
    tiny_clip_weights(cfg, weights, seed)
    spec = f"open_clip:{cfg}:{weights}"
    emb = create_embedder(spec)
    rng = np.random.default_rng(0)
    vec = _unit(rng.normal(size=(index(pool).num_rows, emb.dim)))
    path = fake_embeddings(tmp_path / f"emb{seed}", pool, vec)
    m = json.loads((path / "manifest.json").read_text())
    m["metrics"]["embedder"] = emb.info
    (path / "manifest.json").write_text(json.dumps(m))
    return path, spec, vec


def test_zero_shot_equals_open_clip_by_hand_and_refuses_another_model(tmp_path):
    import torch

    from stages.embedders import create_embedder

    pool = fake_pool(tmp_path / "pool", np.array([0, 1, 2, 0, 1]), classes=["cat", "sports_car", "dog"])
    emb_path, spec, vec = _tiny_clip_embeddings(tmp_path, pool)
    templates = ["a photo of a {}.", "a drawing of a {}."]
    src = create_label_source({"source": "zero-shot", "templates": templates})
    src.check({"embeddings": emb_path})
    rows = index(pool).select(["key", "uid", "split", "shard", "label"])
    p = src.probs(rows, {"embeddings": emb_path}, ["cat", "sports_car", "dog"])
    # by hand: open_clip's own tokenizer and encode_text, CLIP's template ensembling, logit scale 100
    emb = create_embedder(spec)
    model = emb.text.model
    tok = emb.tokenize
    w = []
    for name in ("cat", "sports car", "dog"):
        with torch.no_grad():
            t = model.encode_text(tok([tpl.format(name) for tpl in templates])).double()
        t = t / t.norm(dim=1, keepdim=True)
        w.append((t.mean(0) / t.mean(0).norm()).numpy())
    v16 = vec.astype(np.float16).astype(np.float64)  # the store keeps float16
    v16 /= np.linalg.norm(v16, axis=1, keepdims=True)
    logits = 100 * v16 @ np.stack(w).T
    want = np.exp(logits - logits.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(p, want, atol=2e-3)
    # the text tower of another model (other weights) is refused with a clear message
    other = create_label_source({"source": "zero-shot", "embedder": spec.rsplit(":", 1)[0] + ":" +
                                 str(_tiny_clip_embeddings(tmp_path, pool, seed=2)[1].rsplit(":", 1)[1])})
    with pytest.raises(InputError, match="not the model that made"):
        other.probs(rows, {"embeddings": emb_path}, ["cat", "sports_car", "dog"])
    # embeddings of a model without a text tower
    m = json.loads((emb_path / "manifest.json").read_text())
    m["metrics"]["embedder"]["member"] = "timm"
    (emb_path / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(InputError, match="open_clip embedder"):
        src.check({"embeddings": emb_path})
