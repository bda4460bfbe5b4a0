"""Benchmark: SemDeDup's pairwise step, similarities per second, on one cluster-sized set of unit embeddings.

* ``batched``: ours (``stages.clustering.semdedup.pairwise_pass``): M_j = max_{i<j} S_ij by batch x batch blocks of
  torch matrix products over the strict upper triangle (memory batch^2, whatever the cluster size);
* ``batched + exact rule``: the same pass also building connected components for three thresholds;
* ``per-row loop``: what a straightforward implementation does, one matrix-vector product per member against all
  earlier members (numpy, same threads);
* ``per-pair loop``: a Python loop over pairs (timed on a smaller cluster; its rate does not depend on size);
* ``whole matrix``: the released code's computation (torch: the full n x n matrix, ``triu(diagonal=1)``, column
  max), for reference: it needs n^2 floats of memory (its zeros below the diagonal are harmless here, every
  similarity in a cluster-like set being positive).

Every method's M_j is checked against the whole-matrix one. Pairs are n(n-1)/2 per cluster.

    python bench/dedup.py [--n 8000,30000] [--dim 512]

At 8,000 x 512 the cluster (16 MB float32) fits in this machine's 32 MiB L3 and a per-row loop is nearly as fast;
at 30,000 (61 MB) it does not.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import best_of, machine_load, write_result  # noqa: E402


def cluster(n: int, d: int, seed: int = 0) -> np.ndarray:
    """A cluster-like set: unit vectors around one direction, a tenth of them near-copies of others."""
    from stages.clustering.kmeans import unit_rows

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)) + 2 * rng.normal(size=d)
    dup = rng.random(n) < 0.1
    x[dup] = x[rng.integers(0, n, dup.sum())] + 0.05 * rng.normal(size=(dup.sum(), d))
    return unit_rows(x)


def whole_matrix(e: np.ndarray) -> np.ndarray:
    import torch

    t = torch.from_numpy(e)
    m = torch.triu(t @ t.T, diagonal=1).max(0)[0].numpy()
    m[0] = -np.inf
    return m


def per_row(e: np.ndarray) -> np.ndarray:
    m = np.full(len(e), -np.inf, dtype=np.float32)
    for j in range(1, len(e)):
        m[j] = (e[:j] @ e[j]).max()
    return m


def per_pair(e: np.ndarray) -> np.ndarray:
    m = np.full(len(e), -np.inf, dtype=np.float32)
    rows = [r for r in e.astype(np.float64)]
    for j in range(1, len(e)):
        best = -2.0
        for i in range(j):
            s = float(np.dot(rows[i], rows[j]))
            if s > best:
                best = s
        m[j] = best
    return m


def measure(n: int, args: argparse.Namespace) -> dict:
    from stages.clustering.semdedup import pairwise_pass, reference_max_similarity

    e = cluster(n, args.dim)
    pairs = n * (n - 1) // 2
    ref, _ = reference_max_similarity(e[:args.check_n])  # M_j of the first rows depends on those rows only
    out: dict = {"n": n, "pairs": pairs, "methods": {}, "load": {}}

    def record(name: str, seconds: float, m: np.ndarray, n_pairs: int = pairs) -> None:
        k = min(len(m), len(ref))
        err = float(np.abs(m[1:k] - ref[1:k]).max())
        if err > 1e-4:
            raise SystemExit(f"{name}: M_j differs from the whole-matrix reference by {err}")
        out["methods"][name] = {"seconds": round(seconds, 4), "pairs_per_s": round(n_pairs / seconds),
                                "max_abs_error": err}
        print(f"n={n:6d} {name:28s} {seconds:8.3f} s  {n_pairs / seconds:14,.0f} pairs/s")

    res: list = [None]
    out["load"]["batched"] = machine_load()
    t = best_of(lambda: res.__setitem__(0, pairwise_pass(e, batch=args.batch)))
    record("batched", t, res[0].max_sim)
    out["load"]["batched_exact"] = machine_load()
    t = best_of(lambda: res.__setitem__(0, pairwise_pass(e, [0.99, 0.95, 0.9], batch=args.batch)))
    record("batched + exact rule", t, res[0].max_sim)
    if n <= args.whole_max:
        out["load"]["whole_matrix"] = machine_load()
        t = best_of(lambda: res.__setitem__(0, whole_matrix(e)))
        record("whole matrix (n^2 memory)", t, res[0])
    out["load"]["per_row"] = machine_load()
    t = best_of(lambda: res.__setitem__(0, per_row(e)), repeat=1)
    record("per-row loop", t, res[0])
    small = e[:args.pair_n]
    out["load"]["per_pair"] = machine_load()
    t = best_of(lambda: res.__setitem__(0, per_pair(small)), repeat=1)
    record("per-pair loop", t, res[0], args.pair_n * (args.pair_n - 1) // 2)
    rates = {k: v["pairs_per_s"] for k, v in out["methods"].items()}
    out["speedup_vs_per_row"] = round(rates["batched"] / rates["per-row loop"], 1)
    out["speedup_vs_per_pair"] = round(rates["batched"] / rates["per-pair loop"], 1)
    out["exact_rule_overhead"] = round(out["methods"]["batched + exact rule"]["seconds"]
                                       / out["methods"]["batched"]["seconds"], 2)
    print(f"n={n}: batched {out['speedup_vs_per_row']}x the per-row loop, {out['speedup_vs_per_pair']}x the "
          "per-pair loop")
    return out


def main() -> None:
    import torch

    ap = argparse.ArgumentParser()
    ap.add_argument("--n", default="8000,30000", help="cluster sizes, comma-separated")
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--pair-n", type=int, default=600, help="cluster size for the per-pair Python loop")
    ap.add_argument("--check-n", type=int, default=4000, help="rows checked against the float64 whole-matrix M_j")
    ap.add_argument("--whole-max", type=int, default=16000, help="largest n for the whole-matrix method")
    args = ap.parse_args()
    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    sizes = [measure(int(n), args) for n in args.n.split(",")]
    print(write_result("dedup", {"dim": args.dim, "batch": args.batch, "threads": threads, "device": "cpu",
                                 "sizes": sizes}))


if __name__ == "__main__":
    main()
