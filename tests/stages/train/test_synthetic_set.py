"""The synthetic-set format: safetensors round trip, validation, loading by artifact kind."""
from __future__ import annotations

import pytest
import torch

from stages.train.losses import SoftLabels
from stages.train.model_space import ZCA, fit_zca, fixed
from stages.train.synthetic_set import (SYNTHETIC_FILE, SyntheticSet, SyntheticSetError, load_synthetic_set,
                                        save_synthetic_set, write_synthetic_artifact)
from stages.train.training_sets import load_trainset

CLASSES = ["a", "b", "c"]


def _set(**kw) -> SyntheticSet:
    g = torch.Generator().manual_seed(0)
    base = dict(images=torch.randn(6, 3, 4, 4, generator=g), targets=torch.tensor([0, 0, 1, 1, 2, 2]),
                classes=CLASSES, space=fixed((0.5, 0.5, 0.5), (0.2, 0.2, 0.2)))
    return SyntheticSet(**{**base, **kw})


def test_round_trip_keeps_every_field(tmp_path):
    u8 = torch.randint(0, 256, (20, 3, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    zca = fit_zca(u8, 0.1, fitted_on={"artifact_id": "x", "split": "train"})
    soft = torch.softmax(torch.randn(6, 3), 1)
    s = _set(targets=soft, space=zca, soft_labels=SoftLabels(kind="probs", temperature=4.0), lr=0.0123,
             pool={"artifact": "/p", "artifact_id": "x", "split": "train"}, labeller={"artifact": "/t"},
             meta={"method": "mtt", "ipc": 2})
    back = load_synthetic_set(save_synthetic_set(tmp_path / SYNTHETIC_FILE, s))
    assert torch.equal(back.images, s.images) and torch.equal(back.targets, soft)
    assert isinstance(back.space, ZCA) and back.space.describe() == zca.describe()
    assert back.soft_labels == SoftLabels(kind="probs", temperature=4.0) and back.lr == pytest.approx(0.0123)
    assert (back.pool, back.labeller, back.meta, back.classes) == (s.pool, s.labeller, s.meta, CLASSES)
    hard = load_synthetic_set(save_synthetic_set(tmp_path / "h.safetensors", _set()))
    assert hard.soft_labels is None and hard.lr is None and hard.space.describe() == _set().space.describe()


@pytest.mark.parametrize("change,problem", [
    ({"targets": torch.rand(6, 3)}, "float targets need soft_labels"),
    ({"targets": torch.tensor([0, 1, 2])}, "3 targets for 6 images"),
    ({"targets": torch.tensor([0, 0, 1, 1, 2, 3])}, r"hard targets must be int64 \(N,\) in \[0, 3\)"),
    ({"images": torch.zeros(6, 3, 4, 4, dtype=torch.float64)}, "images must be float32"),
    ({"images": torch.full((6, 3, 4, 4), float("nan"))}, "NaN"),
    ({"lr": -1.0}, "lr must be positive"),
])
def test_inconsistent_sets_are_refused_naming_the_file(tmp_path, change, problem):
    with pytest.raises(SyntheticSetError, match=problem):
        save_synthetic_set(tmp_path / "x.safetensors", _set(**change))


def test_loads_by_artifact_kind(tmp_path):
    art = write_synthetic_artifact(tmp_path / "syn", _set(lr=0.02))
    ts = load_trainset(art)
    assert ts.images.dtype == torch.float32 and ts.lr == pytest.approx(0.02) and ts.space is not None
    assert ts.pool is None and "names no pool" in ts.info["no_pool"]
