"""Accuracy baselines: run a pipeline manifest of validate stages and collect mean ± std per stage as JSON.

    python bench/accuracy.py manifests/cifar10-baselines-cpu.yaml [--cluster local-gpu]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_result  # noqa: E402


def main() -> None:
    from pipeline.artifacts import Artifact
    from pipeline.config import load_manifest
    from pipeline.runner import Runner

    ap = argparse.ArgumentParser()
    ap.add_argument("manifest", type=Path)
    ap.add_argument("--cluster", default=None)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    m = load_manifest(args.manifest, args.overrides)
    t0 = time.perf_counter()
    with Runner(m, where=str(args.manifest), overrides=args.overrides, profile=args.cluster) as r:
        results = r.run()
    rows = {}
    for res in results:
        man = Artifact(res.path).manifest()
        if man.stage != "validate":
            continue
        mt = man.metrics
        rows[res.name] = {k: mt.get(k) for k in ("recipe", "network", "epochs", "epochs_run", "mtt_exact", "subset",
                                                 "n_train", "top1_mean", "top1_std", "top5_mean", "per_seed",
                                                 "images_per_sec", "wall_time_s", "model_space",
                                                 "model_space_source")}
        curves = res.path / "curves.png"
        if curves.is_file():  # the accuracy curves go next to the numbers
            shutil.copyfile(curves, RESULTS / f"accuracy-{m.name}-{res.name}.png")
        print(f"{res.name:22s} n={mt['n_train']:6d}  top-1 {mt['top1_mean']:6.2f} ± {mt['top1_std']:.2f}  "
              f"({mt['recipe']}, {mt['epochs']} epochs)")
    print("wrote", write_result(f"accuracy-{m.name}", {"manifest": str(args.manifest), "results": rows,
                                                       "total_s": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
