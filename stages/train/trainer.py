"""Reference trainer: trains one network on in-memory tensors under a ``Recipe``; the yardstick every curated or
distilled set is measured with.

* Data stays on the device as given; uint8 images are mapped into the *model space* per batch on the device (like
  airbench): the pool's statistics, a recipe's constants or ZCA (``stages.train.model_space``), never the training
  subset's own statistics. Float images (synthetic sets) are already in that space and are used as given.
* Hard labels (int64) and stored soft labels (float rows: probabilities at a stated temperature, or logits; see
  ``losses.SoftLabels``) both train; a ``teacher`` adds on-the-fly KD on each augmented view (FKD / SRe2L).
* ``recipe.mtt_exact`` runs the DC/MTT ``evaluate_synset`` loop: epochs + 1 epochs, lr decay with a fresh
  optimiser (momentum reset), tested at the end.
* Deterministic for a seed: the initial weights, the batch order and the augmentation each come from their own
  seeded generator (the global RNG is forked, never reseeded). On CPU two runs give bit-identical weights.
* Checkpoints after every epoch (atomic rename) hold everything that changes during training, so a killed run
  resumed from ``checkpoint_dir`` ends with the same weights as an uninterrupted one.

Accuracies are percentages.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor, nn

from pipeline.atomic import atomic_path
from stages.train.augment import make_augmentation
from stages.train.losses import SoftLabels, make_loss
from stages.train.model_space import ModelSpace, fixed
from stages.train.networks import create_network
from stages.train.recipes import Recipe, epoch_plan, lr_factor

CHECKPOINT_FORMAT = "distillery.trainer.checkpoint.v2"
WHITEN_INIT_IMAGES = 5000  # images used by networks with a data-dependent init (airbench's whitening stem)


@dataclass
class EpochStats:
    epoch: int  # number of finished epochs
    loss: float
    train_acc: float  # against argmax of soft targets
    lr: float  # recipe lr x schedule factor at the epoch's last step (before norm_lr_scale)
    seconds: float
    test_top1: float | None = None
    test_top5: float | None = None


@dataclass
class TrainResult:
    state_dict: dict[str, Tensor]  # final weights, on CPU
    curve: list[EpochStats]
    wall_time: float  # seconds spent in training steps (all sessions of a resumed run), evaluation excluded
    images_per_sec: float
    test: dict[str, float] | None  # final {top1, top5} on the test set
    network: dict[str, Any]  # create_network arguments; see ``model()``
    space: ModelSpace | None  # the model space uint8 inputs were mapped into (pass to ``evaluate``)
    seed: int
    recipe: Recipe

    def model(self) -> nn.Module:
        """A fresh CPU network holding the final weights."""
        net = create_network(**self.network)
        net.load_state_dict(self.state_dict)
        return net


EpochCallback = Callable[[int, nn.Module, "EpochStats | None"], None]


# --------------------------------------------------------------------------------------------------------------
# Data helpers


def to_nchw(images: Tensor) -> Tensor:
    """Accept (N, C, H, W) or (N, H, W, C) with C in {1, 3}; return NCHW (a view where possible)."""
    if images.dim() != 4:
        raise ValueError(f"images must be 4-D (N, C, H, W) or (N, H, W, C), got shape {tuple(images.shape)}")
    if images.shape[1] in (1, 3) and images.shape[3] not in (1, 3):
        return images
    if images.shape[3] in (1, 3):
        return images.permute(0, 3, 1, 2)
    raise ValueError(f"cannot tell the channel axis of images with shape {tuple(images.shape)}")


def resolve_space(recipe: Recipe, space: ModelSpace | None) -> ModelSpace | None:
    """The model space of a run: the caller's (the pool's statistics or a fitted ZCA), else the recipe's constants.

    Never the training images' own statistics: a subset, its random baseline and the test split must all be
    seen through the same map."""
    if space is not None:
        return space
    norm = recipe.normalization
    if norm.kind == "fixed":
        return fixed(norm.mean, norm.std)  # type: ignore[arg-type]
    return None


class Encoder:
    """uint8 NCHW -> the model space on ``device``; float images are taken as already in it."""

    def __init__(self, space: ModelSpace | None, device: torch.device, what: str = "uint8 images") -> None:
        self.space = space.to(device) if space is not None else None
        self.what = what

    def __call__(self, x: Tensor) -> Tensor:
        if x.is_floating_point():
            return x.float()
        if self.space is None:
            raise ValueError(f"{self.what} need a model space: pass space= (the pool's statistics or a fitted ZCA; "
                             "stages resolve it from the artifact) or use a recipe with fixed normalization")
        return self.space.encode(x)


# --------------------------------------------------------------------------------------------------------------
# Optimiser


_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """Param groups carry an ``lr_scale``; normalisation params get ``norm_lr_scale`` (wd divided by it)."""
    norm_ids = {id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters(recurse=False)}
    trainable = [p for p in model.parameters() if p.requires_grad]
    s, wd = recipe.norm_lr_scale, recipe.weight_decay
    groups = [dict(params=trainable, lr_scale=1.0, weight_decay=wd)]
    if s != 1.0:
        groups = [dict(params=[p for p in trainable if id(p) not in norm_ids], lr_scale=1.0, weight_decay=wd),
                  dict(params=[p for p in trainable if id(p) in norm_ids], lr_scale=s, weight_decay=wd / s)]
    groups = [g for g in groups if g["params"]]
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=recipe.lr, betas=(recipe.momentum, 0.999))
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.optimizer == "nesterov")


def _derived_generator(seed: int, stream: int) -> torch.Generator:
    """Independent, reproducible CPU generator per purpose (order, augmentation) for one run seed."""
    return torch.Generator().manual_seed((seed * 1_000_003 + stream) % (2**63))


# --------------------------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model: nn.Module, images: Tensor, labels: Tensor, *, space: ModelSpace | None = None,
             batch_size: int = 1024, device: str | torch.device | None = None,
             precision: str = "fp32") -> dict[str, float]:
    """Top-1 / top-5 accuracy (%) in eval mode. uint8 images are mapped into the training ``space``."""
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    x, y = to_nchw(images), (labels.argmax(1) if labels.is_floating_point() else labels).to(dev)
    norm = Encoder(space, dev, "uint8 test images")
    was_training = model.training
    model.eval()
    top1 = top5 = 0
    try:
        for i in range(0, len(x), batch_size):
            with _autocast(dev, precision):
                logits = model(norm(x[i:i + batch_size].to(dev)))
            pred = logits.topk(min(5, logits.shape[1]), dim=1).indices
            hit = pred == y[i:i + batch_size, None]
            top1 += int(hit[:, 0].sum())
            top5 += int(hit.any(1).sum())
    finally:
        model.train(was_training)
    n = max(1, len(x))
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


def _autocast(dev: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    if dev.type == "cuda" and precision == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------------------
# Training


@dataclass
class _Progress:
    """Everything besides weights/optimiser/generators that a checkpoint must restore."""

    epoch: int = 0
    step: int = 0
    train_time: float = 0.0
    curve: list[EpochStats] = field(default_factory=list)


def _save_checkpoint(path: Path, identity: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer,
                     gens: Mapping[str, torch.Generator], prog: _Progress) -> None:
    payload = {"format": CHECKPOINT_FORMAT, "identity": identity, "model": model.state_dict(),
               "optimizer": opt.state_dict(), "generators": {k: g.get_state() for k, g in gens.items()},
               "epoch": prog.epoch, "step": prog.step, "train_time": prog.train_time,
               "curve": [asdict(s) for s in prog.curve]}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def _load_checkpoint(path: Path, identity: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer,
                     gens: Mapping[str, torch.Generator], dev: torch.device) -> _Progress:
    try:
        ck = torch.load(path, map_location=dev, weights_only=True)
    except Exception as e:  # truncated or foreign file: say which
        raise ValueError(f"{path}: unreadable trainer checkpoint ({e}); delete it or pass resume=False") from e
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not a {CHECKPOINT_FORMAT} checkpoint")
    diff = sorted(k for k in identity.keys() | ck["identity"].keys() if identity.get(k) != ck["identity"].get(k))
    if diff:
        raise ValueError(f"{path}: checkpoint belongs to a different run ({', '.join(diff)} differ); "
                         "use another checkpoint_dir or pass resume=False")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    for k, g in gens.items():
        g.set_state(ck["generators"][k].cpu())
    return _Progress(ck["epoch"], ck["step"], ck["train_time"], [EpochStats(**s) for s in ck["curve"]])


@runtime_checkable
class BatchStream(Protocol):
    """Training data too large for memory: batches of (uint8 images, int64 labels) streamed per epoch."""

    def __len__(self) -> int: ...

    def sample(self, n: int) -> tuple[Tensor, Tensor]:
        """The first ``n`` images (for a data-dependent init)."""
        ...

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[Tensor, Tensor]]: ...


def _epoch_batches(x: Tensor, y: Tensor, stream: BatchStream | None, bs: int, steps: int, order_gen: torch.Generator,
                   seed: int, epoch: int, dev: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """One epoch of (raw images, targets) on the device: a seeded permutation in memory, or the stream."""
    if stream is not None:
        for xb, yb in stream.batches(bs, seed=seed * 100_003 + epoch):
            yield to_nchw(xb).to(dev, non_blocking=True), yb.to(dev)
        return
    order = torch.randperm(len(x), generator=order_gen).to(dev)
    for b in range(steps):
        idx = order[b * bs:(b + 1) * bs]
        yield x[idx], y[idx]


def train(images: Tensor | BatchStream, targets: Tensor, recipe: Recipe, *, num_classes: int, seed: int = 0,
          device: str | torch.device = "cpu", test: tuple[Tensor, Tensor] | None = None,
          teacher: nn.Module | None = None, checkpoint_dir: str | Path | None = None, resume: bool = True,
          epochs: int | None = None, lr: float | None = None, callback: EpochCallback | None = None,
          space: ModelSpace | None = None, soft_labels: SoftLabels | None = None,
          eval_every: int = 0, label_maps: Any = None, label_fill: str = "zero") -> TrainResult:
    """Train a fresh ``recipe.network`` on ``images`` (uint8 or float, NCHW or NHWC) and ``targets``.

    ``targets``: int64 class ids, or float (N, num_classes) stored soft labels of form ``soft_labels`` (default:
    probabilities at temperature 1). ``space``: the model space uint8 images (training and test) are mapped into;
    default: the recipe's fixed constants (a recipe normalising with the pool's statistics or ZCA needs it given).
    Float images are used as given. ``epochs``/``lr`` override the recipe (e.g. the learned lr of a distilled set).
    ``callback(epochs_done, model, stats)`` runs once with ``(0, model, None)`` before a fresh start and after every
    epoch. ``eval_every`` > 0 also tests mid-run (evaluation never changes the training).
    ``label_maps`` (``stages.labeling.label_maps.LabelMaps``, row-aligned with ``images``): ReLabel training: every
    view's target is LabelPooling of its image's map over that view's crop box (``label_fill``: ``zero`` as
    published, or ``neg_inf``), trained with soft cross-entropy; ``targets`` then only count classes for logging.
    """
    recipe = recipe.with_overrides(**{k: v for k, v in (("epochs", epochs), ("lr", lr)) if v is not None})
    dev = torch.device(device)
    stream = images if isinstance(images, BatchStream) else None
    if stream is not None:  # labels come with the batches; a data-dependent init from a first sample of them
        x = to_nchw(stream.sample(WHITEN_INIT_IMAGES)[0])
        targets = torch.zeros(len(stream), dtype=torch.long)
    else:
        x = to_nchw(images)
    n = len(x) if stream is None else len(stream)
    soft = targets.is_floating_point()
    if len(targets) != n or (soft and tuple(targets.shape) != (n, num_classes)):
        raise ValueError(f"targets of shape {tuple(targets.shape)} do not match {n} images / {num_classes} classes")
    maps = None
    if label_maps is not None:
        from stages.labeling.label_maps import label_pool
        from stages.train.augment import make_box_augmentation

        if stream is not None or len(label_maps.index) != n:
            raise ValueError(f"label maps must be row-aligned with in-memory images ({len(label_maps.index)} maps, "
                             f"{n} images{', streamed' if stream is not None else ''})")
        maps = label_maps.to(dev)
        box_augment = make_box_augmentation(recipe.augmentation.name, recipe.augmentation.params)
    space = resolve_space(recipe, space)
    norm = Encoder(space, dev)
    if test is not None and not test[0].is_floating_point() and space is None:
        raise ValueError("uint8 test images need a model space: pass space= (the one the training images live in)")
    x, y = x.to(dev).contiguous(), targets.to(dev, torch.float32 if soft else torch.long)  # one layout: same numerics
    if maps is not None:  # batches carry row indices; each view's target is pooled from its map
        y, soft = torch.arange(n, device=dev), True
    channels_last = recipe.channels_last  # also pays on CPU: oneDNN convs prefer NHWC (~1.3x for BN nets)

    network = dict(name=recipe.network, num_classes=num_classes, in_channels=x.shape[1], image_size=x.shape[-1],
                   **recipe.network_kwargs)
    with torch.random.fork_rng(devices=[]):  # seeded init without touching the caller's RNG
        torch.manual_seed(seed)
        model = create_network(**network)
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = make_optimizer(model, recipe)
    augment = make_augmentation(recipe.augmentation.name, recipe.augmentation.params)
    soft_labels = SoftLabels() if maps is not None else (soft_labels or SoftLabels())  # pooled: probabilities
    loss_fn = make_loss(recipe.loss, soft_labels)
    gens = {"order": _derived_generator(seed, 1), "augment": _derived_generator(seed, 2)}
    if teacher is not None:
        teacher = teacher.to(dev).eval()

    bs = recipe.batch_size
    steps_per_epoch = n // bs if (recipe.drop_last and n >= bs) else math.ceil(n / bs)
    samples_per_epoch = min(n, steps_per_epoch * bs)
    total_epochs = recipe.total_epochs
    plan = epoch_plan(recipe) if recipe.mtt_exact else None
    identity = {"recipe": recipe.model_dump(mode="json"), "seed": seed, "num_classes": num_classes,
                "n": n, "soft": soft, "soft_labels": soft_labels.model_dump(mode="json") if soft else None,
                "teacher": teacher is not None, "space": space.describe() if space is not None else None,
                "label_maps": None if maps is None else {"k": maps.k, "size": maps.size, "fill": label_fill}}
    ckpt = Path(checkpoint_dir) / "last.pt" if checkpoint_dir is not None else None

    if ckpt is not None and resume and ckpt.exists():
        prog = _load_checkpoint(ckpt, identity, model, opt, gens, dev)
    else:
        prog = _Progress()
        if hasattr(model, "init_from_data"):
            model.init_from_data(norm(x[:WHITEN_INIT_IMAGES]))
        if callback is not None:
            callback(0, model, None)

    def run_test() -> dict[str, float]:
        if test is None:
            raise ValueError("no test set to evaluate on")
        return evaluate(model, test[0], test[1], space=space, batch_size=recipe.eval_batch_size,
                        device=dev, precision=recipe.precision)

    while prog.epoch < total_epochs:
        if plan is not None and plan[prog.epoch][1]:
            opt = make_optimizer(model, recipe)  # evaluate_synset re-creates SGD at the decay: momentum reset
        model.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=dev)
        correct = torch.zeros((), device=dev, dtype=torch.long)
        seen = 0
        for xr, yb in _epoch_batches(x, y, stream, bs, steps_per_epoch, gens["order"], seed, prog.epoch, dev):
            if maps is None:
                xb = augment(norm(xr), generator=gens["augment"])
            else:
                xb, boxes, flips = box_augment(norm(xr), generator=gens["augment"])
                yb = label_pool(maps.index[yb], maps.score[yb], boxes, flips, num_classes, fill=label_fill)
            seen += len(yb)
            if channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            factor = plan[prog.epoch][0] if plan is not None else \
                lr_factor(recipe.schedule, prog.step, steps_per_epoch, recipe.epochs)
            for g in opt.param_groups:
                g["lr"] = recipe.lr * factor * g["lr_scale"]
            with _autocast(dev, recipe.precision):
                logits = model(xb)
                with torch.no_grad():
                    t_logits = teacher(xb) if teacher is not None else None
            loss = loss_fn(logits, yb, t_logits)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            prog.step += 1
            loss_sum += loss.detach() * len(yb)
            correct += (logits.argmax(1) == (yb.argmax(1) if soft else yb)).sum()
        loss_value, correct_value = float(loss_sum), int(correct)  # syncs the device
        seconds = time.perf_counter() - t0
        prog.train_time += seconds
        prog.epoch += 1
        stats = EpochStats(prog.epoch, loss_value / max(seen, 1), 100.0 * correct_value / max(seen, 1),
                           recipe.lr * factor, seconds)
        if test is not None and (prog.epoch == total_epochs or (eval_every and prog.epoch % eval_every == 0)):
            metrics = run_test()
            stats.test_top1, stats.test_top5 = metrics["top1"], metrics["top5"]
        prog.curve.append(stats)
        if ckpt is not None:
            _save_checkpoint(ckpt, identity, model, opt, gens, prog)
        if callback is not None:
            callback(prog.epoch, model, stats)

    final = None
    if test is not None:
        last = prog.curve[-1]
        final = ({"top1": last.test_top1, "top5": last.test_top5} if last.test_top1 is not None
                 else run_test())
    return TrainResult(
        state_dict={k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        curve=prog.curve, wall_time=prog.train_time,
        images_per_sec=samples_per_epoch * prog.epoch / max(prog.train_time, 1e-9), test=final,
        network=network, space=space, seed=seed, recipe=recipe)


def train_seeds(images: Tensor, targets: Tensor, recipe: Recipe, *, test: tuple[Tensor, Tensor],
                seeds: Sequence[int] = (0, 1, 2), checkpoint_dir: str | Path | None = None,
                **kwargs: Any) -> dict[str, Any]:
    """Train once per seed; report the test top-1 mean and (population) std, as DD papers do."""
    results = [train(images, targets, recipe, seed=s, test=test,
                     checkpoint_dir=None if checkpoint_dir is None else Path(checkpoint_dir) / f"seed_{s}",
                     **kwargs) for s in seeds]
    accs = [r.test["top1"] for r in results if r.test is not None]
    return {"mean": statistics.fmean(accs), "std": statistics.pstdev(accs),
            "per_seed": dict(zip(seeds, accs)), "results": results}


def plot_curves(results: TrainResult | Sequence[TrainResult] | Mapping[str, TrainResult],
                path_png: str | Path) -> Path:
    """Loss and accuracy per epoch for one or more runs, written atomically as a PNG."""
    from matplotlib.figure import Figure  # no pyplot: no global figure state, no GUI backend

    if isinstance(results, TrainResult):
        results = [results]
    if not isinstance(results, Mapping):
        results = {f"run {i}: {r.recipe.name}, seed {r.seed}": r for i, r in enumerate(results)}
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_loss, ax_acc = fig.subplots(1, 2)
    for label, r in results.items():
        epochs = [s.epoch for s in r.curve]
        ax_loss.plot(epochs, [s.loss for s in r.curve], label=label)
        line, = ax_acc.plot(epochs, [s.train_acc for s in r.curve], label=f"{label} train")
        tested = [s for s in r.curve if s.test_top1 is not None]
        if tested:
            ax_acc.plot([s.epoch for s in tested], [s.test_top1 for s in tested], "o--", color=line.get_color(),
                        label=f"{label} test")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="top-1 (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    path = Path(path_png)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    return path
