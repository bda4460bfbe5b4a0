"""Training on a labels artifact: the loader (drop rows skipped, hard / soft targets), the trainer trains on exactly
those targets (one SGD step equals the soft cross-entropy reference), validate's baseline gets the same labelling,
and label maps train end to end through LabelPooling."""
from __future__ import annotations

import json

import numpy as np
import pyarrow.compute as pc
import pytest
import torch
import torch.nn.functional as F

from conftest import run_pipeline
from curation_fakes import index
from labeling_fakes import digit_probs, fake_labels, noisy_digit_labels
from stages.labeling.label_maps import label_pool, write_maps
from stages.labeling.store import load_labels, soft_targets
from stages.train.image_data import load_images
from stages.train.recipes import load_recipe
from stages.train.trainer import train
from stages.train.training_sets import load_trainset
from stages.validate import ValidateParams, baseline_decision, select


@pytest.fixture(scope="module")
def labels(digits_shards, tmp_path_factory):
    """Soft rows over the digits train split; every 7th row dropped, every 11th relabelled."""
    return noisy_digit_labels(tmp_path_factory.mktemp("labels") / "labels", digits_shards.path)


def test_labels_loader_skips_drops_and_gives_hard_or_soft_targets(digits_shards, labels):
    table = load_labels(labels, "train")
    kept = table.filter(pc.not_equal(table["action"], "drop"))
    soft = load_trainset(labels)
    assert soft.info["targets"] == "soft" and soft.info["dropped"] == table.num_rows - kept.num_rows > 0
    assert soft.uids == kept.column("uid").to_pylist()  # the pool's order, drops skipped
    assert torch.equal(soft.targets, torch.from_numpy(soft_targets(kept, 10)))
    pool = load_images(digits_shards.path, "train")
    pos = {u: i for i, u in enumerate(pool.uids)}
    assert torch.equal(soft.images, torch.from_numpy(pool.images[[pos[u] for u in soft.uids]]))
    hard = load_trainset(labels, targets="hard")
    relabelled = kept.column("label").to_numpy()
    assert torch.equal(hard.targets, torch.from_numpy(relabelled.astype(np.int64)))
    assert (relabelled != kept.column("given").to_numpy()).any(), "relabel rows train on the suggestion"
    assert len(soft.pool) == len(soft.pool_targets) == table.num_rows  # drops are still in the baseline's pool


def test_auto_targets_are_hard_when_the_top_k_is_one_class(digits_shards, tmp_path):
    given = index(digits_shards.path).column("label").to_numpy()
    one = fake_labels(tmp_path / "k1", digits_shards.path, digit_probs(given), k=1)
    ts = load_trainset(one)
    assert ts.info["targets"] == "hard" and not ts.targets.is_floating_point()
    assert load_trainset(one, targets="soft").targets.is_floating_point()


def tiny_resnet(**kw):
    return load_recipe("standard-resnet", epochs=1, network_kwargs={"width": 4}, schedule={"name": "constant"},
                       channels_last=False,
                       normalization={"kind": "fixed", "mean": [0.5] * 3, "std": [0.25] * 3}, **kw)


def _one_step(images, targets, **kw):
    """Weights before and after one full-batch SGD step (lr 1, no momentum / decay / augmentation)."""
    recipe = tiny_resnet(batch_size=len(images), lr=1.0, momentum=0.0, weight_decay=0.0, optimizer="sgd",
                         augmentation={"name": "none"})
    seen = []
    res = train(images, targets, recipe, num_classes=10, seed=0,
                callback=lambda e, m, s: seen.append({k: v.detach().clone() for k, v in m.state_dict().items()}),
                **kw)
    return seen[0], seen[1], res


def _reference_step(w0, images, targets, res):
    net = res.model()
    net.load_state_dict(w0)
    net.train()
    x = res.space.encode(images.permute(0, 3, 1, 2).contiguous())
    loss = -(targets * F.log_softmax(net(x), 1)).sum(1).mean()  # soft CE
    loss.backward()
    return {k: p.grad for k, p in net.named_parameters()}


def assert_step_is(w0, w1, grads):
    """The weight change of the step is the reference gradient (float32 sums in another order: 1e-4 of its scale)."""
    for k, g in grads.items():
        err = float((w0[k] - w1[k] - g).abs().max())
        assert err <= 1e-4 * float(g.abs().max()) + 1e-7, (k, err, float(g.abs().max()))


def test_trainer_trains_on_exactly_the_soft_targets(labels):
    ts = load_trainset(labels)
    images, targets = ts.images[:64], ts.targets[:64]
    w0, w1, res = _one_step(images, targets)
    grads = _reference_step(w0, images, targets, res)
    assert_step_is(w0, w1, grads)
    other = _reference_step(w0, images, F.one_hot(targets.argmax(1), 10).float(), res)
    assert max(float((other[k] - grads[k]).abs().max()) for k in grads) > 1e-3  # the test can fail


def test_validate_baseline_of_a_labels_set_is_labelled_by_the_same_artifact(labels):
    ts = load_trainset(labels)
    params = ValidateParams()
    trained, reason = baseline_decision(ts, params, has_teacher=False)
    assert trained and "same labels artifact" in reason
    images, targets = select(ts, "baseline", params, seed=0)
    assert len(targets) == len(ts) and targets.is_floating_point()
    pos = {u: i for i, u in enumerate(ts.pool.uids)}
    table = load_labels(labels, "train")
    dense = soft_targets(table, 10)
    by_uid = {u: dense[i] for i, u in enumerate(table.column("uid").to_pylist())}
    # every baseline row's target is that row's soft label in the artifact
    for img, t in list(zip(images, targets))[:50]:
        i = next(j for j in range(len(ts.pool)) if np.array_equal(ts.pool.images[j], img.numpy()))
        assert np.allclose(t.numpy(), by_uid[ts.pool.uids[i]])
    assert np.bincount(targets.argmax(1).numpy(), minlength=10).tolist() == \
        np.bincount(ts.targets.argmax(1).numpy(), minlength=10).tolist()
    del pos


@pytest.fixture(scope="module")
def teacher(labels, tmp_path_factory):
    """A tiny resnet18 teacher trained here for one epoch on the digits (a teacher artifact's fold_0)."""
    from curation_fakes import write_manifest
    from stages.teacher import save_teacher

    ts = load_trainset(labels, targets="hard")
    recipe = tiny_resnet(batch_size=128, lr=0.05)
    res = train(ts.images, ts.targets, recipe, num_classes=10, seed=0)
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    save_teacher(path / "teachers" / "fold_0.pt", {"network": res.network, "state_dict": res.state_dict,
                                                   "classes": ts.classes, "recipe": recipe.model_dump(mode="json"),
                                                   "seed": 0, "held_out": []}, res.space)
    return write_manifest(path, "model", "teacher", params={"folds": 1})


@pytest.fixture(scope="module")
def mapped(digits_shards, labels, teacher, tmp_path_factory):
    """The labels artifact plus label maps written by ``write_maps`` (what relabel's ``label_maps`` option calls)."""
    import shutil

    out = tmp_path_factory.mktemp("mapped") / "labels"
    shutil.copytree(labels, out)
    info = write_maps(teacher, digits_shards.path, index(digits_shards.path), out, size=4, k=3)
    assert info["files"] == ["maps/train/00000.npz", "maps/train/00001.npz", "maps/train/00002.npz"]
    m = json.loads((out / "manifest.json").read_text())
    m["metrics"]["label_maps"] = info
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def test_trainer_trains_on_exactly_the_pooled_label_map_targets(mapped):
    ts = load_trainset(mapped)
    assert ts.label_maps is not None and ts.info["label_maps"] == {"size": 4, "k": 3}
    images, maps = ts.images[:64], ts.label_maps
    from stages.labeling.label_maps import LabelMaps

    sub = LabelMaps(maps.index[:64], maps.score[:64])
    w0, w1, res = _one_step(images, ts.targets[:64], label_maps=sub)
    whole = torch.tensor([[0.0, 0, 1, 1]]).expand(64, 4)
    pooled = label_pool(sub.index, sub.score, whole, torch.zeros(64, dtype=torch.bool), 10)
    grads = _reference_step(w0, images, pooled, res)
    assert_step_is(w0, w1, grads)
    other = _reference_step(w0, images, ts.targets[:64], res)  # the stored soft rows are other targets
    assert max(float((other[k] - grads[k]).abs().max()) for k in grads) > 1e-3


def test_validate_trains_on_label_maps_end_to_end(mapped, digits_shards, tmp_path, client):
    """A few steps of the fast recipe (crop_flip: LabelPooling on every random crop) through the validate stage."""
    res = run_pipeline({"name": "maps", "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "validate", "inputs": {"train": str(mapped)},
         "params": {"recipe": "fast", "seeds": [0], "overrides": {"epochs": 1, "batch_size": 256,
                                                                 "network_kwargs": {"width": 8}}}}]}, client)
    m = json.loads((res[0].path / "metrics.json").read_text())
    assert m["targets"] == {"set": "label maps", "baseline": "soft"}
    assert m["n_train"] == len(load_trainset(mapped)) and 0 <= m["top1_mean"] <= 100
    assert "random_baseline" in m
