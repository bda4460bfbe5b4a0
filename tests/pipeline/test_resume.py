"""Resume: kill -9 the driver, or a worker of a real `dask scheduler`, mid-stage; the finished result is
complete and byte-identical to an uninterrupted run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import make_tree, run_pipeline, tree_bytes


def manifest(tmp: Path, src: Path, **extra) -> dict:
    return {"name": "resume", "output_dir": str(tmp / "run"), "source": {"kind": "folder", "path": str(src)},
            "stages": [{"name": "shard", "params": {"samples_per_shard": 3}}], **extra}


def parts_done(run_dir: Path) -> tuple[int, bool]:
    arts = list(run_dir.glob("shard-*"))
    if not arts:
        return 0, False
    return len(list((arts[0] / ".parts").glob("*.json"))), (arts[0] / "manifest.json").exists()


def wait_for_parts(run_dir: Path, n: int, proc_alive=lambda: True, timeout: float = 120) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        done, complete = parts_done(run_dir)
        assert not complete, "the stage finished before it could be interrupted"
        if done >= n:
            return
        assert proc_alive(), "the run died on its own"
        time.sleep(0.005)
    raise TimeoutError("no progress")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    src = tmp_path_factory.mktemp("resume") / "src"
    info = make_tree(src, per_class=40, size=96)  # 250 samples -> 84 tasks of 3
    return src, info


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory, client):
    src, _ = source
    res = run_pipeline(manifest(tmp_path_factory.mktemp("ref"), src), client)[0]
    return tree_bytes(res.path), res


def test_kill9_driver_then_rerun_is_identical(source, reference, tmp_path):
    src, info = source
    m = manifest(tmp_path, src, cluster={"profile": "local", "options": {"n_workers": 2}})
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(m))
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(path), "--no-progress"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_parts(tmp_path / "run", 4, lambda: proc.poll() is None)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the driver, its scheduler and its workers
        proc.wait()
    done, complete = parts_done(tmp_path / "run")
    assert 4 <= done < 84 and not complete
    status = subprocess.run([sys.executable, "-m", "pipeline.cli", "status", str(tmp_path / "run")],
                            capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    assert "partial" in status.stdout, status.stdout
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    art = next((tmp_path / "run").glob("shard-*"))
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    resumed = [e for e in events if e["event"] == "stage_resumed"]
    assert resumed and resumed[-1]["committed"] >= done  # only the remaining shards were run
    assert tree_bytes(art) == reference[0]
    m_ = json.loads((art / "manifest.json").read_text())
    assert m_["counts"]["in"] == info["n"] == m_["counts"]["out"] + m_["counts"]["rejected"]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", *args], start_new_session=True,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


def test_address_profile_survives_killed_worker(source, reference, tmp_path):
    src, _ = source
    sched_file = tmp_path / "scheduler.json"
    procs = [_start(["distributed.cli.dask_scheduler", "--scheduler-file", str(sched_file), "--host", "127.0.0.1",
                     "--port", "0", "--dashboard-address", ":0"], tmp_path / "scheduler.log")]
    try:
        t0 = time.time()
        while not sched_file.exists() and time.time() - t0 < 60:
            time.sleep(0.1)
        for i in range(2):
            procs.append(_start(["distributed.cli.dask_worker", "--scheduler-file", str(sched_file),
                                 "--nthreads", "1", "--name", f"w{i}", "--host", "127.0.0.1"], tmp_path / f"w{i}.log"))
        address = json.loads(sched_file.read_text())["address"]
        from distributed import Client

        with Client(address, timeout="60s") as c:
            c.wait_for_workers(2, timeout=60)
        m = manifest(tmp_path, src, cluster={"profile": "address", "options": {"address": address}})
        result: dict = {}

        def drive() -> None:
            try:
                result["res"] = run_pipeline(m, client=None)
            except BaseException as e:  # noqa: BLE001 - reported below
                result["err"] = e

        th = threading.Thread(target=drive)
        th.start()
        wait_for_parts(tmp_path / "run", 6)
        os.killpg(procs[1].pid, signal.SIGKILL)  # one worker (nanny + process) dies mid-stage
        procs[1].wait()
        th.join(timeout=300)
        assert "err" not in result, result.get("err")
        res = result["res"][0]
        assert res.status == "ran"
        assert tree_bytes(res.path) == reference[0]
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
