"""Benchmark: the curation experiment on CIFAR-10 (issue 7), read from a finished run of
``manifests/cifar10-curate-cpu.yaml`` (or its GPU sibling ``manifests/cifar10-curate.yaml``).

    distillery run manifests/cifar10-curate-cpu.yaml
    python bench/curation.py quality runs/cifar10-curate-cpu

Writes ``bench/results/curation-<protocol>.json`` and ``curation-<protocol>.png`` (accuracy vs kept fraction per
method, the random control and the full pool beside them; probe vs trained accuracy):

* **quality**: every ``val-<method>-<pct>`` step (mean ± std over seeds on the full test split), its difference from
  ``val-random-<pct>`` (the control: same pool, same size, same recipe) and the class composition kept;
* **probe agreement**: the linear probe and kNN on frozen embeddings (``probe-*`` steps) against trained accuracy:
  Spearman and Kendall over all selections (dominated by size: bigger sets win under both), and the pairwise
  agreement *between methods at the same size* (the decision a user makes with the probe);
* **stages**: the wall time of every stage of the DAG (stages run concurrently where the DAG allows, so the times
  overlap; the run's wall time is beside them).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from common import RESULTS, write_result  # noqa: E402

STEP = re.compile(r"^(?P<method>[a-z0-9]+(?:-[a-z]+)*)-(?P<pct>\d+)$")


def _metrics(run: Path, step: str) -> dict[str, Any] | None:
    path = run / step / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else None


def _events(run: Path) -> list[dict[str, Any]]:
    lines = (run / "events.jsonl").read_text().splitlines()
    return [json.loads(x) for x in lines if x.strip()]


def stage_times(run: Path) -> dict[str, Any]:
    ev = _events(run)
    started = [e["ts"] for e in ev if e["event"] == "run_started"]
    finished = {e["stage"]: e for e in ev if e["event"] == "stage_finished"}
    cached = sorted({e["stage"] for e in ev if e["event"] == "stage_cached"})
    last = max((e["ts"] for e in finished.values()), default=None)
    busy = {}
    for name in finished:  # compute the stage's tasks used (wall "seconds" include waiting for a free worker)
        manifest = run / name / "manifest.json"
        if manifest.exists():
            busy[name] = json.loads(manifest.read_text()).get("timings", {}).get("task_s_sum")
    return {"seconds": {k: v.get("seconds") for k, v in finished.items()}, "task_seconds": busy,
            "note": "seconds = wall time of the stage in the run, including time its tasks waited for a worker "
                    "held by a concurrent stage; task_seconds = the sum of its tasks' own run times",
            "counts": {k: v.get("counts") for k, v in finished.items()},
            "cached": cached,
            "run_wall_s": round(last - started[0], 1) if started and last else None,
            "driver_runs": len(started)}  # > 1: the run was resumed (cached stages are not re-run)


def _kept_per_class(run: Path, step: str) -> list[int] | None:
    import pyarrow.parquet as pq

    path = run / step / "kept.parquet"
    if not path.exists():
        return None
    labels = pq.read_table(path, columns=["label", "split"]).to_pandas()
    labels = labels[labels["split"] == "train"]["label"].to_numpy()
    return np.bincount(labels.astype(int), minlength=10).tolist()


def quality(run: Path) -> dict[str, Any]:
    from stages.evaluation.ranking import kendall, pairwise_agreement, spearman

    rows: dict[str, dict[str, Any]] = {}
    for d in sorted(p.name for p in run.iterdir() if p.is_symlink() and p.name.startswith("val-")):
        name = d[4:]
        m = _metrics(run, d)
        if m is None:
            continue
        probe = _metrics(run, f"probe-{name}") or {}
        rows[name] = {"n_train": m["n_train"], "top1_mean": round(m["top1_mean"], 2),
                      "top1_std": round(m["top1_std"], 2), "per_seed": m["per_seed"],
                      "kept_per_class": _kept_per_class(run, name),
                      "probe_linear": probe.get("linear_top1"), "probe_knn": probe.get("knn_top1")}
    by_pct: dict[int, dict[str, str]] = {}
    for name in rows:
        if (mt := STEP.match(name)):
            by_pct.setdefault(int(mt["pct"]), {})[mt["method"]] = name
    for pct, methods in by_pct.items():
        if "random" not in methods:
            continue
        ctrl = rows[methods["random"]]
        for method, name in methods.items():
            r = rows[name]
            r["vs_random"] = round(r["top1_mean"] - ctrl["top1_mean"], 2)
            # the difference in units of its standard error over seeds (both rows' std, n seeds each)
            n = len(r["per_seed"])
            se = np.sqrt((r["top1_std"] ** 2 + ctrl["top1_std"] ** 2) / max(n, 1))
            r["vs_random_se"] = round(float(r["vs_random"] / se), 1) if se > 0 else None
    agreement: dict[str, Any] = {}
    names = [n for n in rows if rows[n]["probe_linear"] is not None]
    trained = [rows[n]["top1_mean"] for n in names]
    for probe in ("probe_linear", "probe_knn"):
        vals = [rows[n][probe] for n in names]
        if len(names) >= 3:
            within_a, within_b = [], []
            for methods in by_pct.values():
                ms = [m for m in methods.values() if m in names]
                for i in range(len(ms)):
                    for j in range(i + 1, len(ms)):
                        within_a.append(np.sign(rows[ms[i]]["top1_mean"] - rows[ms[j]]["top1_mean"]))
                        within_b.append(np.sign(rows[ms[i]][probe] - rows[ms[j]][probe]))
            same = [a == b for a, b in zip(within_a, within_b) if a != 0 and b != 0]
            agreement[probe] = {"spearman_all": round(spearman(vals, trained), 3),
                                "kendall_all": round(kendall(vals, trained), 3),
                                "pairwise_all": round(pairwise_agreement(vals, trained), 3),
                                "pairwise_same_size": round(float(np.mean(same)), 3) if same else None,
                                "same_size_pairs": len(same)}
    return {"table": rows, "probe_agreement": agreement}


def plot(result: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["table"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.5))
    series: dict[str, list[tuple[int, float, float]]] = {}
    for name, r in rows.items():
        if (mt := STEP.match(name)):
            series.setdefault(mt["method"], []).append((int(mt["pct"]), r["top1_mean"], r["top1_std"]))
    for method, pts in sorted(series.items()):
        pts.sort()
        x, y, e = zip(*pts)
        style = dict(color="black", ls="--") if method == "random" else {}
        ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=method + (" (control)" if method == "random" else ""),
                    **style)
    if "pool" in rows:
        ax.axhline(rows["pool"]["top1_mean"], color="grey", ls=":", label="full pool (100 %)")
    ax.set_xlabel("kept % of the pool")
    ax.set_ylabel("test top-1 % (mean ± std, 3 seeds)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    for probe, marker in (("probe_linear", "o"), ("probe_knn", "s")):
        pts = [(r[probe], r["top1_mean"]) for r in rows.values() if r.get(probe) is not None]
        if pts:
            px, py = zip(*pts)
            bx.scatter(px, py, marker=marker, label=probe.replace("_", " "))
    for name, r in rows.items():
        if r.get("probe_linear") is not None:
            bx.annotate(name, (r["probe_linear"], r["top1_mean"]), fontsize=6, alpha=0.7)
    bx.set_xlabel("probe accuracy on frozen embeddings %")
    bx.set_ylabel("trained accuracy %")
    bx.set_title("cheap probe vs trained accuracy")
    bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


PROTOCOLS = {
    "cpu": {
        "protocol": "cpu",
        "reduced": {
            "pool": "class-balanced random 10,000 of the 50,000 CIFAR-10 training images (seed 0), not all 50,000",
            "embedder": "checkpoint: a DD ConvNet (width 128) trained on the pool, standard-dd with 15 epochs "
                        "(not 1000) and crop+flip instead of DSA; not a pretrained CLIP/DINOv2",
            "margin_teacher": "2 out-of-fold ConvNets on the pool, same settings",
            "clusters": "k = 100 on the 50,000 training embeddings",
            "training": "fast recipe (airbench, 10 epochs) at width 32 instead of 64; 3 seeds; not ResNet-18 "
                        "standard-resnet",
            "test": "the full 10,000-image CIFAR-10 test split (not reduced)"},
        "manifest": "manifests/cifar10-curate-cpu.yaml"},
    "gpu": {"protocol": "paper", "manifest": "manifests/cifar10-curate.yaml"},
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["quality"])
    ap.add_argument("run", type=Path)
    ap.add_argument("--protocol", choices=sorted(PROTOCOLS), default="cpu")
    args = ap.parse_args()
    res = quality(args.run)
    res.update(PROTOCOLS[args.protocol], stages=stage_times(args.run))
    for name, r in res["table"].items():
        extra = f"  vs random {r['vs_random']:+.2f} ({r['vs_random_se']} se)" if "vs_random" in r else ""
        print(f"{name:12s} n={r['n_train']:6d}  top-1 {r['top1_mean']:6.2f} ± {r['top1_std']:.2f}{extra}  "
              f"probe lin {r['probe_linear']} knn {r['probe_knn']}")
    print(json.dumps(res["probe_agreement"], indent=1))
    name = f"curation-{args.protocol}"
    png = RESULTS / f"{name}.png"
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(res, png, f"CIFAR-10 curation ({args.protocol} protocol)")
    res["figure"] = png.name
    print("wrote", write_result(name, res), png)


if __name__ == "__main__":
    main()
