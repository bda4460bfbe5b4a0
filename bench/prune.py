"""Benchmark: pruning and export.

    python bench/prune.py quota                  # DBP quotas: the closed form against OSQP (the released code's solver)
    python bench/prune.py scale [--pool DIR]     # CIFAR-10: DBP prune 50 % + export, against a copy floor
    python bench/prune.py accuracy [--work DIR]  # digits: methods at 50 % / 10 % kept, mean ± std over seeds

``quota``: per k (clusters; sizes log-normal like web-scale clusters), the time of our exact projection + rounding,
of OSQP through qpsolvers (tight tolerances, and the released code's call with OSQP's defaults + rint), how far
each is from the exact optimum and by how many samples the released code's ``rint`` misses N.

``scale``: shards CIFAR-10 (or takes ``--pool``), clusters pixel features (spherical k-means, k = 100; no embedder
is in the tree yet, so this measures the machinery, not a curation result), prunes 50 % with DBP and exports the
selection on the local cluster. The floor is one process reading the selected images by offset and writing them
into tars (the least work an export can do).

``accuracy``: the digits pool; clusters of pixel features (as above) for ssp/dbp and a 5-fold out-of-fold teacher
for margin; each method at 50 % and 10 % kept, validated with the quickstart's ConvNet (3 seeds), against random
subsets of the same size. Small data: expect random to be hard to beat (curation.md §9).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the packages before tests/stages (a namespace)
sys.path.append(str(Path(__file__).resolve().parent.parent / "tests"))  # test helpers: curation_fakes, conftest
from common import DEFAULT_CIFAR, write_result  # noqa: E402


def timed(fn, repeat: int = 3):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_quota() -> dict:
    import qpsolvers
    import scipy.sparse as sp

    from stages.pruning.quota import dbp_bounds, largest_remainder, project_capped_simplex, redistribute, softmax

    rng = np.random.default_rng(0)
    rows = {}
    for k in (100, 500, 10_000):
        sizes = np.maximum(1, rng.lognormal(6, 1.2, k)).astype(np.int64)
        comp = rng.gamma(4, 0.04, k)  # d_inter * d_intra: small positive numbers
        prob = softmax(comp, 0.1)
        n = int(0.5 * sizes.sum())
        lb, ub = dbp_bounds(sizes, n, 0.0)
        t_ours, x = timed(lambda: project_capped_simplex(n * prob, n, lb, ub))
        t_round, q = timed(lambda: largest_remainder(x, n, lb, ub))
        args = (sp.identity(k, format="csc"), -n * prob)
        kw = dict(A=sp.csc_matrix(np.ones((1, k))), b=np.array([float(n)]), lb=lb.astype(float), ub=ub.astype(float),
                  solver="osqp")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t_tight, x_tight = timed(lambda: qpsolvers.solve_qp(*args, eps_abs=1e-9, eps_rel=1e-9, polish=True,
                                                                 max_iter=500_000, **kw), 1)
            t_code, x_code = timed(lambda: qpsolvers.solve_qp(*args, **kw), 1)
        rows[str(k)] = {
            "n": n, "clusters_capped": int((q == sizes).sum()),
            "ours_ms": round(1000 * t_ours, 3), "rounding_ms": round(1000 * t_round, 3),
            "ours_sum_minus_n": float(x.sum() - n), "rounded_sum_minus_n": int(q.sum() - n),
            "osqp_tight_ms": round(1000 * t_tight, 1),
            "osqp_tight_max_abs_diff": float(np.max(np.abs(x_tight - x))),
            "osqp_tight_sum_minus_n": float(x_tight.sum() - n),  # its objective can dip below the optimum by this
            "osqp_default_ms": round(1000 * t_code, 1),
            "osqp_default_max_abs_diff": float(np.max(np.abs(x_code - x))),
            "released_code_rint_misses_n_by": int(np.rint(x_code).sum() - n),
            "redistribute_max_abs_diff": float(np.max(np.abs(redistribute(n * prob, n, lb, ub) - x))),
        }
        r = rows[str(k)]
        print(f"k={k:6d}  ours {r['ours_ms']:.2f} ms (+{r['rounding_ms']:.2f} rounding, "
              f"sum-N {r['rounded_sum_minus_n']})"
              f"  osqp tight {r['osqp_tight_ms']:.0f} ms (max diff {r['osqp_tight_max_abs_diff']:.1e})"
              f"  osqp default {r['osqp_default_ms']:.0f} ms (max diff {r['osqp_default_max_abs_diff']:.2f},"
              f" rint misses N by {r['released_code_rint_misses_n_by']})"
              f"  redistribution differs by up to {r['redistribute_max_abs_diff']:.1f}")
    return {"quota": rows}


def spherical_kmeans(x: np.ndarray, k: int, iters: int = 15, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = x[rng.choice(len(x), k, replace=False)].copy()
    for _ in range(iters):
        a = np.concatenate([np.argmax(x[i:i + 8192] @ c.T, axis=1) for i in range(0, len(x), 8192)])
        for j in range(k):
            s = x[a == j].sum(0)
            if np.linalg.norm(s) > 0:
                c[j] = s / np.linalg.norm(s)
    a = np.concatenate([np.argmax(x[i:i + 8192] @ c.T, axis=1) for i in range(0, len(x), 8192)])
    return c, a


def pixel_clusters(pool: Path, out: Path, k: int) -> Path:
    from curation_fakes import fake_clusters

    from stages.train.image_data import load_images

    s = load_images(pool, "train")
    x = s.images.reshape(len(s), -1).astype(np.float32) / 255
    x -= x.mean(0)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    c, a = spherical_kmeans(x, k)
    return fake_clusters(out, pool, a, 1 - np.einsum("ij,ij->i", x, c[a]), c)


def run(manifest: dict, client=None):
    from conftest import run_pipeline

    return run_pipeline(manifest, client)


def bench_scale(pool: Path | None) -> dict:
    from distributed import Client, LocalCluster

    from stages.imaging.tar_writer import TarShardWriter
    from stages.selections.store import pool_rows

    work = Path(tempfile.mkdtemp(prefix="prune-bench-"))
    result: dict = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        if pool is None:
            t0 = time.perf_counter()
            pool = run({"name": "c10", "output_dir": str(work / "shard"),
                        "source": {"kind": "tar", "path": str(DEFAULT_CIFAR)},
                        "stages": [{"name": "shard", "params": {"samples_per_shard": 10000}}]}, client)[0].path
            result["shard_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        clusters = pixel_clusters(pool, work / "clusters", 100)
        result["pixel_kmeans_s"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        res = run({"name": "p", "output_dir": str(work / "run"), "stages": [
            {"name": "dbp", "stage": "prune", "inputs": {"clusters": str(clusters)},
             "params": {"method": "dbp", "fraction": 0.5}},
            {"name": "export", "inputs": {"data": "dbp"}}]}, client)
        total = time.perf_counter() - t0
    m = {r.name: json.loads((r.path / "manifest.json").read_text()) for r in res}
    sel = next(r.path for r in res if r.name == "dbp")
    rows = pool_rows(sel, None, None, other_splits=True).to_pylist()
    floor_dir = work / "floor"
    floor_dir.mkdir()

    def floor() -> None:
        handles: dict = {}
        for start in range(0, len(rows), 10_000):
            with open(floor_dir / f"{start // 10_000:05d}.tar", "wb") as f, TarShardWriter(f) as tar:
                for r in rows[start:start + 10_000]:
                    src = handles.get((r["split"], r["shard"]))
                    if src is None:
                        src = handles[(r["split"], r["shard"])] = open(
                            pool / "shards" / r["split"] / f"{r['shard']:05d}.tar", "rb")
                    src.seek(r["offset"])
                    tar.write_sample(r["key"], {r["ext"]: src.read(r["bytes"]), "cls": str(r["label"]).encode()})
        for h in handles.values():
            h.close()

    t_floor, _ = timed(floor, 2)
    exp = m["export"]
    result.update({
        "pool_train": m["dbp"]["counts"]["in"], "kept": m["dbp"]["counts"]["out"],
        "exported": exp["counts"]["out"], "export_shards": exp["counts"]["shards"],
        "prune_and_export_wall_s": round(total, 2),
        "prune_timings": m["dbp"]["timings"], "export_timings": exp["timings"],
        "copy_floor_s": round(t_floor, 2), "load_1min": round(os.getloadavg()[0], 2)})
    run_s = exp["timings"].get("run") or exp["timings"].get("total")
    print(json.dumps(result, indent=2))
    if run_s:
        print(f"export run phase {run_s:.2f} s for {exp['counts']['out']} samples; "
              f"one-process copy floor {t_floor:.2f} s")
    return {"scale": result}


def bench_accuracy(work: Path | None) -> dict:
    from distributed import Client, LocalCluster

    work = work or Path(tempfile.mkdtemp(prefix="prune-acc-"))  # an earlier --work reuses every cached step
    net = {"epochs": 60, "network_kwargs": {"width": 32}, "normalization": {"kind": "pool"}}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        pool = run({"name": "d", "output_dir": str(work / "pool"), "source": {"kind": "sklearn-digits", "size": 32},
                    "stages": [{"name": "shard", "params": {"samples_per_shard": 500}}]}, client)[0].path
        clusters = pixel_clusters(pool, work / "clusters", 20)
        teacher = run({"name": "t", "output_dir": str(work / "teacher"), "stages": [
            {"name": "teacher", "inputs": {"data": str(pool)},
             "params": {"recipe": "standard-dd", "folds": 5, "overrides": {**net, "epochs": 30}}}]}, client)[0].path
        methods = {"random": ({"method": "random"}, {}),
                   "margin-hard": ({"method": "margin"}, {"teacher": str(teacher), "shards": str(pool)}),
                   "margin-easy": ({"method": "margin", "which_to_keep": "easy"}, {"teacher": str(teacher),
                                                                                   "shards": str(pool)}),
                   "margin-hard-balanced": ({"method": "margin", "class_balanced": True},
                                            {"teacher": str(teacher), "shards": str(pool)}),
                   "margin-easy-balanced": ({"method": "margin", "which_to_keep": "easy", "class_balanced": True},
                                            {"teacher": str(teacher), "shards": str(pool)}),
                   "ssp-hard": ({"method": "ssp"}, {"clusters": str(clusters)}),
                   "dbp": ({"method": "dbp"}, {"clusters": str(clusters)})}
        stages = []
        for frac in (0.5, 0.1):
            for name, (method, inputs) in methods.items():
                step = f"{name}-{int(frac * 100)}"
                stages.append({"name": step, "stage": "prune", "inputs": inputs or {"shards": str(pool)},
                               "params": {**method, "fraction": frac, "plots": False}})
                stages.append({"name": f"val-{step}", "stage": "validate", "inputs": {"train": step},
                               "params": {"recipe": "standard-dd", "overrides": net, "seeds": [0, 1, 2],
                                          "baseline": name == "random"}})
        t0 = time.perf_counter()
        res = run({"name": "acc", "output_dir": str(work / "run"), "stages": stages}, client)
    import pyarrow.parquet as pq

    table = {}
    paths = {r.name: r.path for r in res}
    for r in res:
        if not r.name.startswith("val-"):
            continue
        mt = json.loads((r.path / "metrics.json").read_text())
        labels = pq.read_table(paths[r.name[4:]] / "kept.parquet", columns=["label"]).column("label").to_numpy()
        table[r.name[4:]] = {"n_train": mt["n_train"], "top1_mean": round(mt["top1_mean"], 2),
                             "top1_std": round(mt["top1_std"], 2), "per_seed": mt["per_seed"],
                             "kept_per_class": np.bincount(labels, minlength=10).tolist()}
        if "random_baseline" in mt:
            b = mt["random_baseline"]
            table[r.name[4:] + " (validate's same-size random baseline)"] = {
                "n_train": b["n_train"], "top1_mean": round(b["top1_mean"], 2), "top1_std": round(b["top1_std"], 2)}
    for k, v in table.items():
        print(f"{k:50s} n={v['n_train']:5d}  top-1 {v['top1_mean']:6.2f} ± {v['top1_std']:.2f}  "
              f"{v.get('kept_per_class', '')}")
    oof = json.loads((teacher / "metrics.json").read_text())["oof_top1"]
    return {"accuracy": {"table": table, "teacher_oof_top1": oof, "recipe": "standard-dd", "overrides": net,
                         "seeds": [0, 1, 2], "total_s": round(time.perf_counter() - t0, 1)}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["quota", "scale", "accuracy"])
    ap.add_argument("--pool", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="accuracy: a directory to run in (and reuse)")
    args = ap.parse_args()
    os.environ.setdefault("DISTILLERY_CACHE_DIR", tempfile.mkdtemp(prefix="prune-bench-cache-"))
    out = {"quota": bench_quota, "scale": lambda: bench_scale(args.pool),
           "accuracy": lambda: bench_accuracy(args.work)}[args.what]()
    print("wrote", write_result(f"prune-{args.what}", out))


if __name__ == "__main__":
    main()
