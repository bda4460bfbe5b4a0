"""Benchmark: what ReLabel label maps cost the reference trainer.

    python bench/label_maps.py [--n 2048] [--width 16]
    python bench/label_maps.py --against DIR     # also: the default path (no maps) of another checkout, e.g.
                                                 # `git archive main | tar -x -C DIR`, vs this one

Trains the ``fast`` recipe (airbench, crop_flip; width shrunk for CPU, fp32) for one epoch on random 32px images,
10 classes: with stored soft rows (the baseline, the trainer's default path) and with top-5 label maps at S = 15
(ReLabel's size) so every crop's target is LabelPooling of its map. Also LabelPooling alone per batch of 512 at
C = 10 and C = 1000 (ImageNet's class count; the dense map is C x S x S per sample). Ratios are against the
baseline measured in the same run; the machine is shared (``machine_load`` is recorded).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from common import best_of, machine_load, write_result  # noqa: E402

from stages.labeling.label_maps import LabelMaps, label_pool  # noqa: E402
from stages.train.model_space import fixed  # noqa: E402
from stages.train.recipes import load_recipe  # noqa: E402
from stages.train.trainer import train  # noqa: E402


def maps(n: int, c: int, k: int = 5, s: int = 15, seed: int = 0) -> LabelMaps:
    g = torch.Generator().manual_seed(seed)
    index = torch.stack([torch.randperm(c, generator=g)[:k] for _ in range(n)])[:, :, None, None].expand(n, k, s, s)
    return LabelMaps(index.to(torch.int16).contiguous(), torch.randn(n, k, s, s, generator=g).half())


DEFAULT_PATH = """
import hashlib, json, sys, torch
sys.path.insert(0, sys.argv[1])
from stages.train.model_space import fixed
from stages.train.recipes import load_recipe
from stages.train.trainer import train
n, width = int(sys.argv[2]), int(sys.argv[3])
g = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (n, 32, 32, 3), dtype=torch.uint8, generator=g)
labels = torch.randint(0, 10, (n,), generator=g)
recipe = load_recipe("fast", epochs=1, batch_size=512, precision="fp32", network_kwargs={"width": width})
r = train(images, labels, recipe, num_classes=10, seed=0, space=fixed([0.5] * 3, [0.25] * 3))
digest = hashlib.sha256(b"".join(v.numpy().tobytes() for v in r.state_dict.values())).hexdigest()
print(json.dumps({"images_per_sec": r.images_per_sec, "weights_sha256": digest}))
"""


def default_path(checkouts: dict[str, str], n: int, width: int, rounds: int = 5) -> dict:
    """images/s (best of ``rounds``, alternating) and the final weights' digest of the default path per checkout."""
    out: dict[str, dict] = {name: {"images_per_sec": 0.0} for name in checkouts}
    with tempfile.TemporaryDirectory() as cwd:  # outside the repo, so sys.path picks the checkout given
        for _ in range(rounds):
            for name, root in checkouts.items():
                res = json.loads(subprocess.run([sys.executable, "-c", DEFAULT_PATH, root, str(n), str(width)],
                                                cwd=cwd, check=True, capture_output=True, text=True).stdout)
                out[name] = {"images_per_sec": max(out[name]["images_per_sec"], res["images_per_sec"]),
                             "weights_sha256": res["weights_sha256"]}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--against", help="another checkout (e.g. main) to compare the default training path with")
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n, 32, 32, 3), dtype=torch.uint8, generator=g)
    soft = torch.softmax(torch.randn(args.n, 10, generator=g), 1)
    recipe = load_recipe("fast", epochs=1, batch_size=512, precision="fp32", network_kwargs={"width": args.width})
    space = fixed([0.5] * 3, [0.25] * 3)
    load = machine_load()
    runs = {}
    for name, kw in (("soft_rows", {}), ("label_maps", {"label_maps": maps(args.n, 10)})):
        t = [train(images, soft, recipe, num_classes=10, seed=0, space=space, **kw).images_per_sec for _ in range(2)]
        runs[name] = max(t)
    pool = {}
    for c in (10, 1000):
        m = maps(512, c)
        boxes = torch.tensor([[0.1, 0.2, 0.8, 0.9]]).expand(512, 4)
        flips = torch.arange(512) % 2 == 0
        pool[f"C{c}_ms_per_batch512"] = 1000 * best_of(lambda: label_pool(m.index, m.score, boxes, flips, c), 5)
    if args.against:
        here = str(Path(__file__).resolve().parent.parent)
        d = default_path({"against": args.against, "this": here}, args.n, args.width)
        runs_default = {"against": args.against, **d,
                        "this_vs_against": d["this"]["images_per_sec"] / d["against"]["images_per_sec"],
                        "identical_weights": d["this"]["weights_sha256"] == d["against"]["weights_sha256"]}
    result = {"n": args.n, "width": args.width, "images_per_sec": runs,
              "label_maps_vs_soft_rows": runs["label_maps"] / runs["soft_rows"], "label_pool": pool,
              "machine_load": load, "note": "shared 2-core machine; one epoch of fast (airbench) on CPU, fp32"}
    if args.against:
        result["default_path"] = runs_default
    print(result)
    print(write_result("label_maps", result))


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"{time.perf_counter() - t0:.0f} s")
