"""Benchmark: training-loop throughput of the reference trainer against a plain PyTorch loop, same model.

On CPU: images/s of ``stages.train.trainer.train`` (no augmentation, so the work is identical) against a minimal
hand-written loop (normalise, forward, CE, backward, SGD step), per network, and the cost of DSA. On a GPU,
also: wall time of the ``fast`` recipe to 93% on CIFAR-10 (our JPEG copy).

    python bench/train.py [--images 2048] [--archive ../shared/data/cifar10-jpeg.tar]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CIFAR, write_result  # noqa: E402


def cifar(archive: Path, work: Path):
    from pipeline.config import PipelineManifest
    from pipeline.runner import Runner
    from stages.train.image_data import load_images

    m = PipelineManifest.model_validate({"name": "bench-train", "output_dir": str(work),
                                         "source": {"kind": "tar", "path": str(archive)},
                                         "stages": [{"name": "shard", "params": {"samples_per_shard": 10000}}]})
    with Runner(m, show_progress=False) as r:
        art = r.run()[0].path
    return load_images(art, "train"), load_images(art, "test")


def plain_loop(x: torch.Tensor, y: torch.Tensor, recipe, dev: torch.device) -> float:
    """The loop a user would write by hand: the floor our trainer's bookkeeping is measured against."""
    from stages.train.networks import create_network

    torch.manual_seed(0)
    model = create_network(recipe.network, 10, **recipe.network_kwargs).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    xf = x.permute(0, 3, 1, 2).to(dev)
    mean = xf.float().mean((0, 2, 3), keepdim=True)
    std = xf.float().std((0, 2, 3), keepdim=True)
    bs = recipe.batch_size
    if dev.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    order = torch.randperm(len(xf), device=dev)  # a real loop shuffles: gathering batches is part of the cost
    yd = y.to(dev)
    for i in range(0, len(xf) - bs + 1, bs):
        idx = order[i:i + bs]
        xb = (xf[idx].float() - mean) / std
        loss = torch.nn.functional.cross_entropy(model(xb), yd[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
    return (len(xf) // bs * bs) / (time.perf_counter() - t0)


def ours(x, y, recipe, dev) -> float:
    from stages.train.model_space import channel_stats, fixed
    from stages.train.trainer import train

    space = fixed(*channel_stats(x.permute(0, 3, 1, 2)))  # the plain loop's normalisation, so the work is equal
    return train(x, y, recipe, num_classes=10, device=dev, epochs=1, space=space).images_per_sec


def main() -> None:
    from stages.train.recipes import load_recipe

    ap = argparse.ArgumentParser()
    ap.add_argument("--archive", type=Path, default=DEFAULT_CIFAR)
    ap.add_argument("--images", type=int, default=4096)
    args = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        tr, te = cifar(args.archive, Path(tmp))
    x, y = torch.from_numpy(tr.images[: args.images].copy()), torch.from_numpy(tr.labels[: args.images])
    rows = {}
    cases = [("convnet", "standard-dd", {}), ("resnet18", "standard-resnet", {"batch_size": 128}),
             ("airbench", "fast", {"precision": "fp32", "optimizer": "sgd", "norm_lr_scale": 1.0})]
    for name, rec, extra in cases:
        n = args.images if name != "resnet18" or dev.type == "cuda" else 1024
        recipe = load_recipe(rec, augmentation={"name": "none"}, schedule={"name": "constant"}, drop_last=True,
                             loss={"name": "ce"}, mtt_exact=False, **extra)
        plain = max(plain_loop(x[:n], y[:n], recipe, dev) for _ in range(2))
        mine = max(ours(x[:n], y[:n], recipe, dev) for _ in range(2))
        aug = ours(x[:n], y[:n], load_recipe(rec, **extra), dev)
        rows[name] = {"plain_images_per_s": round(plain, 1), "trainer_images_per_s": round(mine, 1),
                      "trainer_ratio_vs_plain": round(mine / plain, 3),
                      "trainer_with_recipe_augmentation_images_per_s": round(aug, 1), "images": n,
                      "augmentation": load_recipe(rec).augmentation.name}
        print(f"{name:9s} plain {plain:8.1f} img/s   trainer {mine:8.1f} img/s ({mine / plain:.2f}x)   "
              f"with {rows[name]['augmentation']}: {aug:8.1f} img/s")
    result = {"device": str(dev), "networks": rows}
    if dev.type == "cuda":
        from stages.train.trainer import train

        t0 = time.perf_counter()
        from stages.train.model_space import channel_stats, fixed

        x_all = torch.from_numpy(tr.images)
        res = train(x_all, torch.from_numpy(tr.labels), load_recipe("fast"), num_classes=10, device=dev,
                    space=fixed(*channel_stats(x_all.permute(0, 3, 1, 2))),
                    test=(torch.from_numpy(te.images), torch.from_numpy(te.labels)), eval_every=1)
        first = next((s for s in res.curve if s.test_top1 and s.test_top1 >= 93), None)
        result["fast_recipe"] = {"final_top1": res.test["top1"], "train_wall_s": res.wall_time,
                                 "end_to_end_s": time.perf_counter() - t0,
                                 "epoch_reaching_93": first.epoch if first else None}
    else:
        result["fast_recipe"] = "not measured: needs a GPU (airbench's 3.83 s on an A100 is the anchor)"
    print("wrote", write_result("train", result))


if __name__ == "__main__":
    main()
