import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stages.train.model_space import MTT_CIFAR10_MEAN, MTT_CIFAR10_STD, channel_stats, fixed
from stages.train.networks import create_network, num_params
from stages.train.recipes import RECIPES, RecipeError, ScheduleSpec, epoch_plan, load_recipe, lr_factor
from stages.train.trainer import evaluate, plot_curves, train, train_seeds

NUM_CLASSES = 4


def blobs(n: int, seed: int, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 NHWC images: a class-coloured disc at a random place on a noisy grey background."""
    g = torch.Generator().manual_seed(seed)
    colors = torch.tensor([[220.0, 40, 40], [40, 220, 40], [40, 40, 220], [220, 220, 40]])
    labels = torch.arange(n) % NUM_CLASSES
    img = 120 + 30 * torch.randn(n, size, size, 3, generator=g)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    cy, cx = torch.randint(4, size - 4, (2, n), generator=g)
    disc = (yy - cy[:, None, None]) ** 2 + (xx - cx[:, None, None]) ** 2 <= 9
    img = torch.where(disc[..., None], colors[labels][:, None, None, :], img)
    return img.clamp(0, 255).to(torch.uint8), labels


TRAIN, TEST = blobs(256, seed=0), blobs(128, seed=1)
POOL = blobs(1024, seed=2)  # the pool TRAIN-sized subsets come from: its statistics define the model space
SPACE = fixed(*channel_stats(POOL[0].permute(0, 3, 1, 2)))


def small(name: str = "standard-dd", **changes):
    """A shipped recipe shrunk to CPU-test size (the network/schedule semantics stay the recipe's; standard-dd
    keeps its MTT-exact loop, so epochs=4 runs 5 epochs)."""
    base = {"epochs": 4, "batch_size": 32}
    if name == "standard-dd":  # 1000-epoch lr is too timid for 4 epochs
        base.update(lr=0.02, network_kwargs={"width": 16, "depth": 2})
    return load_recipe(name, **{**base, **changes})


def same_weights(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------------------
# recipes and schedules


def test_shipped_recipes():
    assert {"standard-dd", "standard-dd-zca", "datadam", "mtt-expert", "standard-resnet", "fast"} <= set(RECIPES.names())
    dd = load_recipe("standard-dd")
    assert dd.mtt_exact and dd.total_epochs == 1001 and dd.eval_seeds == 5
    assert (dd.normalization.kind, dd.normalization.mean, dd.normalization.std) == \
        ("fixed", (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)) == ("fixed", MTT_CIFAR10_MEAN, MTT_CIFAR10_STD)
    zca = load_recipe("standard-dd-zca")
    assert (zca.normalization.kind, zca.normalization.eps) == ("zca", 0.1)
    assert zca.model_dump(exclude={"name", "description", "normalization"}) == \
        dd.model_dump(exclude={"name", "description", "normalization"})
    dam = load_recipe("datadam")
    assert (dam.network_kwargs["norm"], dam.epochs, dam.batch_size, dam.lr, dam.momentum, dam.weight_decay,
            dam.eval_seeds, dam.mtt_exact, dam.augmentation.name, dam.loss.name) == \
        ("batchnorm", 1800, 64, 0.01, 0.9, 5e-4, 10, True, "dsa", "ce")
    assert [f for f, _ in epoch_plan(dam)].index(pytest.approx(0.1)) == 902  # x0.1 after epoch index 901
    ex = load_recipe("mtt-expert")
    assert (ex.optimizer, ex.lr, ex.momentum, ex.weight_decay, ex.epochs, ex.schedule.name, ex.mtt_exact) == \
        ("sgd", 0.01, 0.0, 0.0, 50, "constant", False)
    assert (dd.network, dd.network_kwargs["norm"]) == ("convnet", "instancenorm")
    assert num_params(create_network(dd.network, 10, **dd.network_kwargs)) == 320_010  # ConvNet-3, width 128
    d4 = dd.with_overrides(network="convnet_d4")  # the 64px variant is one override away
    assert create_network(d4.network, 200, image_size=64, **d4.network_kwargs).num_features == 2048
    assert (dd.epochs, dd.batch_size, dd.optimizer, dd.lr, dd.momentum, dd.weight_decay) == \
        (1000, 256, "sgd", 0.01, 0.9, 5e-4)
    assert dd.augmentation.name == "dsa" and dd.augmentation.params["strategy"] == \
        "color_crop_cutout_flip_scale_rotate"
    rn = load_recipe("standard-resnet")
    assert (rn.network, rn.epochs, rn.optimizer, rn.lr, rn.batch_size, rn.schedule.name) == \
        ("resnet18", 200, "nesterov", 0.1, 128, "cosine")
    fast = load_recipe("fast")
    assert (fast.network, fast.label_smoothing, fast.optimizer, fast.precision, fast.batch_size) == \
        ("airbench", 0.2, "nesterov", "bf16", 1024)


def test_recipe_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\nnetwork: convnet\nepochs: 3\nbatch_size: 8\nlr: 0.1\nmomentun: 0.9\n")
    with pytest.raises(RecipeError, match="(?s)bad.yaml.*momentun"):
        load_recipe(bad)
    with pytest.raises(KeyError, match="standard-dd"):
        load_recipe("no-such-recipe")


def test_overrides_deep_merge_and_renamed_specs_replace():
    dd = load_recipe("standard-dd")
    r = load_recipe("standard-dd", schedule={"milestones": [0.3]})
    assert r.schedule.milestones == (0.3,) and (r.schedule.name, r.schedule.gamma) == ("step", 0.1)
    assert r.model_dump(exclude={"schedule"}) == dd.model_dump(exclude={"schedule"})
    assert load_recipe("standard-dd", **{"schedule.milestones": [0.3]}) == r  # dotted keys are the same
    w = load_recipe("standard-dd", network_kwargs={"width": 32})
    assert w.network_kwargs == {"width": 32, "norm": "instancenorm"}
    # another augmentation member brings its own params: the old member's are dropped, not merged in
    cf = load_recipe("standard-dd", augmentation={"name": "crop_flip", "params": {"pad": 2}})
    assert cf.augmentation.params == {"pad": 2}
    same = load_recipe("standard-dd", augmentation={"params": {"mode": "M"}})
    assert same.augmentation.params == {"strategy": "color_crop_cutout_flip_scale_rotate", "mode": "M"}
    kd = load_recipe("standard-dd", loss={"name": "kd", "temperature": 2.0})
    assert (kd.loss.name, kd.loss.temperature, kd.loss.t_squared) == ("kd", 2.0, True)
    with pytest.raises(RecipeError, match="mtt_exact needs a step schedule"):
        load_recipe("standard-dd", schedule={"name": "cosine"})


def test_mtt_exact_epoch_plan():
    """evaluate_synset: range(E + 1) epochs; after epoch E // 2 + 1: lr x0.1 and a new optimiser."""
    plan = epoch_plan(load_recipe("standard-dd"))
    assert len(plan) == 1001
    assert all(f == 1.0 and not reset for f, reset in plan[:502])
    assert plan[502] == (pytest.approx(0.1), True)
    assert all(f == pytest.approx(0.1) and not reset for f, reset in plan[503:])
    small4 = epoch_plan(load_recipe("standard-dd", epochs=4))
    assert [f for f, _ in small4] == pytest.approx([1, 1, 1, 1, 0.1]) and [r for _, r in small4] == [0, 0, 0, 0, 1]


def test_lr_schedules():
    step = ScheduleSpec(name="step", milestones=(0.5,), gamma=0.1)
    # MTT evaluation: x0.1 from epoch epochs // 2 + 1 (0-based epoch index)
    assert lr_factor(step, 500 * 10, 10, 1000) == 1.0
    assert lr_factor(step, 501 * 10, 10, 1000) == pytest.approx(0.1)
    cos = ScheduleSpec(name="cosine", end=0.0)
    assert lr_factor(cos, 0, 10, 10) == 1.0 and lr_factor(cos, 50, 10, 10) == pytest.approx(0.5)
    assert lr_factor(cos, 100, 10, 10) == pytest.approx(0.0, abs=1e-12)
    tri = ScheduleSpec(name="linear", warmup=0.23, start=0.2, end=0.07)  # airbench's triangle
    assert lr_factor(tri, 0, 10, 10) == pytest.approx(0.2)
    assert lr_factor(tri, 23, 10, 10) == pytest.approx(1.0)
    assert lr_factor(tri, 100, 10, 10) == pytest.approx(0.07)


# --------------------------------------------------------------------------------------------------------------
# training


def test_hard_labels_train_well_above_chance():
    res = train(*TRAIN, small(), num_classes=NUM_CLASSES, seed=0, test=TEST)
    assert res.test["top1"] > 85.0  # chance is 25 %
    assert res.curve[-1].loss < res.curve[0].loss
    assert [s.epoch for s in res.curve] == [1, 2, 3, 4, 5] and res.curve[-1].test_top1 == res.test["top1"]
    assert [s.test_top1 is not None for s in res.curve] == [False] * 4 + [True]  # tested once, at the end
    assert [s.lr for s in res.curve] == pytest.approx([0.02] * 4 + [0.002])
    assert res.space.describe() == fixed(MTT_CIFAR10_MEAN, MTT_CIFAR10_STD).describe()  # the recipe's constants
    assert res.images_per_sec > 0 and res.wall_time > 0
    # the final model can be rebuilt and evaluated in the training model space
    again = evaluate(res.model(), *TEST, space=res.space)
    assert again["top1"] == pytest.approx(res.test["top1"])


def test_pool_normalisation_needs_the_pools_space_never_the_subsets_own():
    recipe = small(normalization={"kind": "pool"})
    with pytest.raises(ValueError, match="need a model space"):
        train(*TRAIN, recipe, num_classes=NUM_CLASSES, seed=0)
    res = train(*TRAIN, recipe, num_classes=NUM_CLASSES, seed=0, test=TEST, space=SPACE, epochs=1)
    assert res.space is SPACE
    own = channel_stats(TRAIN[0].permute(0, 3, 1, 2))
    assert res.space.mean != own[0]  # the pool's statistics, not those of the 256 images trained on


def test_float_set_made_with_pool_statistics_trains_exactly_like_the_uint8_subset():
    """A synthetic-set-style float copy of a real subset (normalised with the pool's statistics) is the same
    training problem: identical weights and accuracy, under the full DSA recipe."""
    recipe = small(normalization={"kind": "pool"}, epochs=2)
    images, labels = TRAIN
    as_float = SPACE.encode(images.permute(0, 3, 1, 2).contiguous())
    assert as_float.dtype == torch.float32 and as_float.shape == (256, 3, 16, 16)
    a = train(images, labels, recipe, num_classes=NUM_CLASSES, seed=7, test=TEST, space=SPACE)
    b = train(as_float, labels, recipe, num_classes=NUM_CLASSES, seed=7, test=TEST, space=SPACE)
    assert same_weights(a.state_dict, b.state_dict)
    assert a.test == b.test and [s.loss for s in a.curve] == [s.loss for s in b.curve]
    other = train(as_float, labels, recipe, num_classes=NUM_CLASSES, seed=7, test=TEST,
                  space=fixed((0.5, 0.5, 0.5), (0.25, 0.25, 0.25)))
    assert other.test != a.test or not same_weights(a.state_dict, other.state_dict)  # the test split moved


def test_soft_labels_train_well_above_chance():
    images, labels = TRAIN
    soft = 0.6 * F.one_hot(labels, NUM_CLASSES).float() + 0.4 * torch.rand(len(labels), NUM_CLASSES,
                                                                            generator=torch.Generator().manual_seed(0))
    soft = soft / soft.sum(1, keepdim=True)
    res = train(images, soft, small(), num_classes=NUM_CLASSES, seed=0, test=TEST)
    assert res.test["top1"] > 80.0


def test_teacher_kd_trains_student():
    teacher = train(*TRAIN, small(), num_classes=NUM_CLASSES, seed=1).model()
    res = train(*TRAIN, small(loss={"name": "kd", "temperature": 4.0}, network_kwargs={"width": 8, "depth": 2}),
                num_classes=NUM_CLASSES, seed=0, test=TEST, teacher=teacher)
    assert res.test["top1"] > 65.0


def test_same_seed_same_weights_other_seed_differs():
    recipe = small(epochs=2)
    global_state = torch.random.get_rng_state()
    a = train(*TRAIN, recipe, num_classes=NUM_CLASSES, seed=3)
    assert torch.equal(torch.random.get_rng_state(), global_state)  # the caller's RNG is untouched
    b = train(*TRAIN, recipe, num_classes=NUM_CLASSES, seed=3)
    c = train(*TRAIN, recipe, num_classes=NUM_CLASSES, seed=4)
    assert same_weights(a.state_dict, b.state_dict)
    assert not same_weights(a.state_dict, c.state_dict)
    # NCHW and NHWC inputs are the same data
    d = train(TRAIN[0].permute(0, 3, 1, 2).contiguous(), TRAIN[1], recipe, num_classes=NUM_CLASSES, seed=3)
    assert same_weights(a.state_dict, d.state_dict)


class Killed(RuntimeError):
    pass


def _reference_mtt_loop(x: torch.Tensor, y: torch.Tensor, recipe, seed: int, reset: bool = True) -> list[dict]:
    """MTT's evaluate_synset written out by hand (full-batch epochs, no augmentation): weights after every epoch."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = create_network(recipe.network, NUM_CLASSES, image_size=x.shape[-1], **recipe.network_kwargs)
    lr, epochs = recipe.lr, recipe.epochs
    make = lambda lr: torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.0005)  # noqa: E731
    opt = make(lr)
    after = []
    for ep in range(epochs + 1):
        net.train()
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        after.append({k: v.detach().clone() for k, v in net.state_dict().items()})
        if ep in [epochs // 2 + 1]:
            lr *= 0.1
            if reset:
                opt = make(lr)
            else:
                for g in opt.param_groups:
                    g["lr"] = lr
    return after


def test_mtt_exact_loop_equals_a_hand_written_reference_step_by_step():
    recipe = small(epochs=6, batch_size=512, lr=0.05, augmentation={"name": "none"},
                   network_kwargs={"width": 8, "depth": 1})
    images, labels = TRAIN[0][:64], TRAIN[1][:64]
    seen: list[dict] = []
    res = train(images, labels, recipe, num_classes=NUM_CLASSES, seed=3,
                callback=lambda e, m, s: seen.append({k: v.detach().clone() for k, v in m.state_dict().items()}))
    assert len(seen) == 1 + 7 and [s.lr for s in res.curve] == pytest.approx([0.05] * 5 + [0.005] * 2)
    x = res.space.encode(images.permute(0, 3, 1, 2).contiguous())
    ref = _reference_mtt_loop(x, labels, recipe, 3)
    for epoch, (mine, theirs) in enumerate(zip(seen[1:], ref)):  # full-batch: only the sum order differs
        for k in theirs:
            torch.testing.assert_close(mine[k], theirs[k], rtol=1e-4, atol=1e-6, msg=f"epoch {epoch}, {k}")
    no_reset = _reference_mtt_loop(x, labels, recipe, 3, reset=False)
    gap = max(float((no_reset[-1][k] - ref[-1][k]).abs().max()) for k in ref[-1])
    assert gap > 1e-3, gap  # keeping the momentum across the decay gives other weights: the test can fail


def _kill_at(epoch_to_die: int):
    def callback(epoch, model, stats):
        if epoch == epoch_to_die:
            raise Killed
    return callback


def _killed_then_resumed(recipe, seed: int, ckpt, kill_at: int, **kw):
    """Train until the callback kills the run after ``kill_at`` epochs, then resume from ``ckpt``."""
    with pytest.raises(Killed):
        train(*TRAIN, recipe, num_classes=NUM_CLASSES, seed=seed, checkpoint_dir=ckpt, callback=_kill_at(kill_at))
    return train(*TRAIN, recipe, num_classes=NUM_CLASSES, seed=seed, checkpoint_dir=ckpt, **kw)


def test_killed_run_resumes_to_identical_weights(tmp_path):
    recipe = small(schedule={"name": "cosine"}, mtt_exact=False,
                   network_kwargs={"width": 16, "depth": 2, "norm": "batchnorm"})
    full = train(*TRAIN, recipe, num_classes=NUM_CLASSES, seed=0)
    seen = []
    resumed = _killed_then_resumed(recipe, 0, tmp_path, 2, callback=lambda e, m, s: seen.append(e))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary leftovers
    assert seen == [3, 4]  # only the missing epochs ran
    assert same_weights(full.state_dict, resumed.state_dict)
    assert [s.loss for s in resumed.curve] == [s.loss for s in full.curve]
    # a checkpoint from another configuration is refused rather than silently mixed in
    with pytest.raises(ValueError, match="different run"):
        train(*TRAIN, recipe, num_classes=NUM_CLASSES, seed=0, checkpoint_dir=tmp_path, lr=0.5)


def test_resume_across_the_mtt_momentum_reset(tmp_path):
    recipe = small()  # 5 epochs, a fresh optimiser before the fifth: killed after 4, the resumed run resets
    full = train(*TRAIN, recipe, num_classes=NUM_CLASSES, seed=1)
    assert same_weights(full.state_dict, _killed_then_resumed(recipe, 1, tmp_path, 4).state_dict)


def test_evaluate_top1_top5_exact():
    class Lookup(nn.Module):  # logits are the first pixels of each (float) image
        def __init__(self):
            super().__init__()
            self.dummy = nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return x.flatten(1)[:, :6] + self.dummy

    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1]] * 4)
    images = torch.zeros(4, 1, 3, 3)
    images.view(4, -1)[:, :6] = logits
    labels = torch.tensor([0, 3, 5, 1])  # ranks 1, 4, 6, 2
    assert evaluate(Lookup(), images, labels, batch_size=3) == {"top1": 25.0, "top5": 75.0}
    with pytest.raises(ValueError, match="need a model space"):
        evaluate(Lookup(), torch.zeros(2, 1, 3, 3, dtype=torch.uint8), labels[:2])


def test_train_seeds_and_plot(tmp_path):
    out = train_seeds(*TRAIN, small(epochs=2), test=TEST, seeds=[0, 1], num_classes=NUM_CLASSES)
    accs = list(out["per_seed"].values())
    assert list(out["per_seed"]) == [0, 1] and out["mean"] == pytest.approx(sum(accs) / 2)
    assert out["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2)
    png = plot_curves(out["results"], tmp_path / "curves.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("name,kw", [("fast", {"width": 8}), ("standard-resnet", {"width": 8})])
def test_other_recipes_run_on_cpu(name, kw):
    res = train(*TRAIN, small(name, epochs=3, network_kwargs=kw), num_classes=NUM_CLASSES, seed=0, test=TEST,
                space=SPACE)
    assert math.isfinite(res.curve[-1].loss) and res.curve[-1].loss < res.curve[0].loss
    assert res.test["top1"] > 50.0
