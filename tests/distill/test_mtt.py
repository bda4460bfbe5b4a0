"""MTT on the core: presets, refusals, the positive step size, non-finite guards, and a resumed loop equal to an
uninterrupted one (with a negative control)."""
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from distill.checkpoint import checkpoint_path
from distill.loop import run_loop
from distill.methods import DISTILL_METHODS, DistillContext
from distill.methods.base import PresetError, resolve_params
from stages.train.model_space import fixed
from stages.train.networks import create_network

KW = {"in_channels": 1, "image_size": 8, "width": 4, "depth": 2}


@dataclass
class FakeBuffer:
    """A 2-expert buffer of random-walk trajectories (what distill.buffer.ExpertBuffer hands out)."""

    epochs: int = 4
    network: str = "convnet"
    network_kwargs: dict[str, Any] = field(default_factory=lambda: dict(KW))
    num_classes: int = 3
    lr: float = 0.01
    space: Any = field(default_factory=lambda: fixed([0.5], [0.25]))

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        p0 = torch.cat([p.detach().reshape(-1) for p in create_network(self.network, 3, **self.network_kwargs).parameters()])
        self.trajs = [torch.cumsum(torch.cat([p0[None], 0.02 * torch.randn(self.epochs, len(p0), generator=g)]), 0)
                      for _ in range(2)]

    def __len__(self) -> int:
        return len(self.trajs)

    def pair(self, i: int, start: int, target: int):
        return self.trajs[i][start], self.trajs[i][target]

    def check_space(self, space) -> None:
        if space.describe() != self.space.describe():
            raise ValueError("another model space")


def context(buf=None, seed=0):
    buf = buf or FakeBuffer()
    g = torch.Generator().manual_seed(1)
    return DistillContext(torch.randn(6, 1, 8, 8, generator=g), torch.tensor([0, 0, 1, 1, 2, 2]), 3, buf.space,
                          experts=buf, seed=seed)


def mtt_params(**kw):
    return DISTILL_METHODS.get("mtt").Params(**{"iterations": 6, "syn_steps": 3, "expert_epochs": 2,
                                                "max_start_epoch": 2, "lr_img": 10.0, "lr_lr": 1e-3, **kw})


def test_paper_preset_states_published_numbers_and_refuses_unknown():
    mtt = DISTILL_METHODS.get("mtt")
    params, record = resolve_params(mtt, "paper", "cifar10", 1, {})
    assert (params.syn_steps, params.expert_epochs, params.max_start_epoch, params.lr_img, params.lr_lr,
            params.lr_teacher, params.expected_space) == (50, 2, 2, 100, 1e-7, 0.01, "zca")
    assert record["published_top1"] == 46.3 and "min_lr" in record["deviations"]
    assert resolve_params(mtt, "paper", "cifar10", 10, {"iterations": 7})[0].iterations == 7
    with pytest.raises(PresetError, match="ipc 3"):
        resolve_params(mtt, "paper", "cifar10", 3, {})
    with pytest.raises(ValueError):
        resolve_params(mtt, None, None, 1, {"no_such_field": 1})


def test_refuses_short_experts_wrong_space_and_classes():
    mtt = DISTILL_METHODS.get("mtt")()
    with pytest.raises(ValueError, match="issue #4"):
        mtt.check(mtt_params(max_start_epoch=4), context())
    with pytest.raises(ValueError, match="zca"):
        mtt.check(mtt_params(expected_space="zca"), context())
    ctx = context()
    ctx.space = fixed([0.4], [0.25])
    with pytest.raises(ValueError, match="model space"):
        mtt.check(mtt_params(), ctx)
    ctx = context()
    ctx.num_classes = 4
    with pytest.raises(ValueError, match="classes"):
        mtt.check(mtt_params(), ctx)


def test_step_size_stays_positive_and_images_move():
    mtt, ctx = DISTILL_METHODS.get("mtt")(), context()
    params = mtt_params(lr_teacher=2.0, lr_lr=1e6, min_lr=1e-4)  # alpha overshoots; a huge lr_lr drives it negative
    state = mtt.start(params, ctx)
    run_loop(mtt, params, ctx, state)
    assert float(state.tensors["lr"]) == pytest.approx(1e-4)  # projected onto the floor, not negative
    assert not torch.equal(state.tensors["images"].detach(), ctx.init_images)
    out = mtt.result(state, params, ctx)
    assert out.labeller == {"kind": "hard"} and torch.equal(out.labels, ctx.init_labels) and out.lr > 0


def test_non_finite_iterations_are_skipped_then_fail():
    mtt, ctx = DISTILL_METHODS.get("mtt")(), context()
    params = mtt_params(max_bad_steps=3)
    state = mtt.start(params, ctx)
    with torch.no_grad():
        state.tensors["images"][0, 0, 0, 0] = float("nan")
    before = state.tensors["images"].detach().clone()
    m = mtt.step(state, params, ctx, 0)
    assert m["skipped"] == 1.0 and torch.equal(state.tensors["images"].isnan(), before.isnan())
    with pytest.raises(FloatingPointError, match="3 iterations in a row"):
        for i in range(3):
            mtt.step(state, params, ctx, i)


def _run(tmp_path, stop_after=None, restore_generator=True):
    mtt, ctx = DISTILL_METHODS.get("mtt")(), context()
    params = mtt_params()
    ckpt = checkpoint_path(tmp_path, {"test": 1})
    state = mtt.start(params, ctx)
    hist = run_loop(mtt, params, ctx, state, checkpoint=ckpt, checkpoint_every=2, stop_after=stop_after)
    return mtt, ctx, params, ckpt, state, hist


def test_resumed_run_equals_uninterrupted(tmp_path):
    *_, ref_state, ref_hist = _run(tmp_path / "a")
    _, _, _, ckpt, _, part = _run(tmp_path / "b", stop_after=3)  # killed after iteration 3; checkpoint at 2
    assert len(part["iterations"]) == 3
    mtt, ctx = DISTILL_METHODS.get("mtt")(), context()
    params = mtt_params()
    state = mtt.start(params, ctx)
    hist = run_loop(mtt, params, ctx, state, checkpoint=ckpt, checkpoint_every=2)
    assert hist["resumed_from"] == 2
    assert torch.equal(state.tensors["images"], ref_state.tensors["images"])
    assert torch.equal(state.tensors["lr"], ref_state.tensors["lr"])
    assert [h["loss"] for h in hist["iterations"]] == [h["loss"] for h in ref_hist["iterations"]]
    # negative control: the same resume without the method's generator state lands elsewhere
    saved = torch.load(ckpt, weights_only=True)
    state2 = mtt.start(params, ctx)
    state2.load_state_dict(saved["state"])
    state2.generator.manual_seed(123)
    for it in range(4, 6):
        mtt.step(state2, params, ctx, it)
    assert not torch.equal(state2.tensors["images"], ref_state.tensors["images"])
