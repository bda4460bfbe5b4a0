"""Benchmark (and test helper): plan the shard stage on a synthetic N-row table source in a fresh process.

The listed files need not exist (run, they would become ``missing file`` rejects): this measures the driver
alone, its wall time and its peak RSS growth while planning (sampled every 10 ms with psutil).

    python bench/plan_scale.py 2000000 [--work DIR]     # prints one JSON line
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def synthetic_table(n: int, path: Path) -> None:
    """``img/<i>.jpg`` with 512 classes, every 16th row in the test split."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    idx = pa.array(np.arange(n))
    pq.write_table(pa.table({
        "path": pc.binary_join_element_wise("img/", pc.cast(idx, pa.string()), ".jpg", ""),
        "label": pc.cast(pc.bit_wise_and(idx, 511), pa.string()),
        "split": pc.if_else(pc.equal(pc.bit_wise_and(idx, 15), 0), "test", "train"),
    }), path)


def measure(n: int, work: Path) -> dict:
    import psutil

    from pipeline.stage import PlanContext
    from stages.shard import ShardParams, ShardStage

    synthetic_table(n, work / "table.parquet")
    proc = psutil.Process()
    base = proc.memory_info().rss
    peak = [base]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    params = ShardParams.model_validate({"source": {"kind": "table", "path": str(work / "table.parquet")},
                                         "samples_per_shard": 10_000})
    t0 = time.perf_counter()
    tasks = ShardStage().plan({}, params, PlanContext(work / "artifact", {}))
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    return {"rows": n, "tasks": len(tasks), "plan_s": round(seconds, 2),
            "plan_s_per_million": round(seconds / n * 1e6, 2), "rss_before_mib": round(base / 2**20),
            "rss_peak_growth_mib": round((peak[0] - base) / 2**20),
            "rss_growth_bytes_per_row": round((peak[0] - base) / n),
            "largest_payload_bytes": max(len(json.dumps(t.payload)) for t in tasks),
            "refs_in_tasks": sum(t.size for t in tasks)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("rows", type=int)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="plan-scale-") as tmp:
        print(json.dumps(measure(args.rows, args.work or Path(tmp))))


if __name__ == "__main__":
    main()
