"""Benchmark: shard the CIFAR-10 JPEG archive (60k images) on the local Dask cluster.

Compares, in one run on one machine:
  * the I/O floor: GNU ``tar`` re-packing the same 60k files from an extracted copy (page-cache warm);
  * a naive single-process loop a user would write (tarfile + PIL verify + webdataset.ShardWriter);
  * our shard stage run serially in one process (no Dask), and end to end on the local cluster.

    python bench/shard.py [--archive ../shared/data/cifar10-jpeg.tar]
"""
from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CIFAR, best_of, write_result  # noqa: E402


def tar_floor(archive: Path, work: Path) -> float:
    src = work / "extracted"
    src.mkdir()
    subprocess.run(["tar", "-xf", str(archive), "-C", str(src)], check=True)
    return best_of(lambda: subprocess.run(["tar", "-cf", str(work / "floor.tar"), "-C", str(src), "."], check=True))


def naive_loop(archive: Path, work: Path) -> float:
    import webdataset as wds
    from PIL import Image

    out = work / "naive"
    out.mkdir()
    t0 = time.perf_counter()
    with tarfile.open(archive) as tf, wds.ShardWriter(str(out / "%05d.tar"), maxcount=10000, verbose=0) as sink:
        for i, m in enumerate(tf):
            if not m.isfile():
                continue
            data = tf.extractfile(m).read()
            Image.open(io.BytesIO(data)).load()
            sink.write({"__key__": f"{i:09d}", "jpg": data, "cls": m.name.split("/")[1]})
    return time.perf_counter() - t0


def serial_stage(archive: Path, work: Path) -> float:
    from pipeline.plans import roundtrip
    from pipeline.stage import PlanContext, TaskContext
    from stages.shard import ShardParams, ShardStage

    params = ShardParams.model_validate({"source": {"kind": "tar", "path": str(archive)}, "samples_per_shard": 10000,
                                         "sample_grid": False})
    out = work / "serial"
    out.mkdir()
    t0 = time.perf_counter()
    stage = ShardStage()
    tasks = roundtrip(stage.plan({}, params, PlanContext(out, {})))
    for t in tasks:
        ctx = TaskContext(out, {}, task_id=t.id)
        info = stage.run(t, params, ctx)
        ctx.commit(t.id, info, 0.0)
    return time.perf_counter() - t0


def pipeline_run(archive: Path, work: Path) -> tuple[float, dict]:
    from pipeline.config import PipelineManifest
    from pipeline.runner import Runner

    m = PipelineManifest.model_validate({
        "name": "bench-shard", "output_dir": str(work / "run"), "source": {"kind": "tar", "path": str(archive)},
        "stages": [{"name": "shard", "params": {"samples_per_shard": 10000}}]})
    t0 = time.perf_counter()
    with Runner(m, show_progress=False) as r:
        res = r.run()[0]
    wall = time.perf_counter() - t0
    from pipeline.artifacts import Artifact

    return wall, {"counts": res.counts, "timings": Artifact(res.path).manifest().timings}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--archive", type=Path, default=DEFAULT_CIFAR)
    args = ap.parse_args()
    if not args.archive.is_file():
        sys.exit(f"{args.archive}: CIFAR-10 archive not found")
    n = 60000
    with tempfile.TemporaryDirectory(prefix="bench-shard-") as tmp:
        work = Path(tmp)
        floor = tar_floor(args.archive, work)
        naive = naive_loop(args.archive, work)
        serial = serial_stage(args.archive, work)
        wall, info = pipeline_run(args.archive, work)
        shutil.rmtree(work / "extracted")
    steady = info["timings"]["plan_s"] + info["timings"]["run_s"] + info["timings"]["finalize_s"]
    rows = {
        "tar_floor_s": floor, "naive_single_process_s": naive, "stage_serial_s": serial,
        "pipeline_end_to_end_s": wall, "pipeline_stage_s": steady,
    }
    result = {
        "images": n, "seconds": {k: round(v, 3) for k, v in rows.items()},
        "images_per_s": {k.removesuffix("_s"): round(n / v) for k, v in rows.items()},
        "ratio_vs_tar_floor": {k.removesuffix("_s"): round(v / floor, 2) for k, v in rows.items()},
        "speedup_vs_naive": {k.removesuffix("_s"): round(naive / v, 2) for k, v in rows.items()},
        "stage_timings": info["timings"], "counts": info["counts"],
        "notes": "pipeline_end_to_end includes starting the LocalCluster; pipeline_stage is plan+run+finalize.",
    }
    for k, v in rows.items():
        print(f"{k:28s} {v:7.2f} s  {n / v:9.0f} img/s  {v / floor:5.2f}x tar floor  {naive / v:5.2f}x vs naive")
    print("wrote", write_result("shard", result))


if __name__ == "__main__":
    main()
