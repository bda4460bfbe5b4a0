"""Faults: deterministic failures are listed and not retried, transient ones are; one driver per run directory;
no worker or no scheduler stops a run quickly with one line; nothing is left behind by a run that did nothing."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import dummy_stages  # noqa: F401  (registers flaky)
from conftest import REPO, make_tree, run_pipeline
from pipeline.runner import RunError


def flaky(tmp: Path, **params) -> dict:
    flags = tmp / "flags"
    flags.mkdir(exist_ok=True)
    return {"name": "f", "output_dir": str(tmp / "run"),
            "stages": [{"name": "flaky", "params": {"flag_dir": str(flags), **params}}]}


def attempts(tmp: Path, task: str) -> int:
    return len(list((tmp / "flags").glob(f"attempt-{task}-*")))


def events(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]


def test_deterministic_failure_is_listed_not_retried_and_rerun_alone(tmp_path, client):
    m = flaky(tmp_path, tasks=6, bad=[2, 4], transient=[1])
    (tmp_path / "flags" / "fail").write_text("")
    with pytest.raises(RunError, match=r"stage flaky: 2 of 6 tasks failed: t2: ValueError: bad value in task t2; "
                                       r"t4: ValueError"):
        run_pipeline(m, client)
    art = next((tmp_path / "run").glob("flaky-*"))
    failed = [json.loads(x) for x in (art / "failed.jsonl").read_text().splitlines()]
    assert [(f["task"], f["attempts"]) for f in failed] == [("t2", 1), ("t4", 1)]
    assert "raise ValueError" in failed[0]["traceback"]
    assert attempts(tmp_path, "t2") == 1 and attempts(tmp_path, "t4") == 1, "a ValueError is not retried"
    assert attempts(tmp_path, "t1") == 2, "an OSError is retried"
    assert sorted(p.stem for p in (art / ".parts").glob("*.json")) == ["t0", "t1", "t3", "t5"]
    assert not (art / "manifest.json").exists()
    ev = events(tmp_path / "run")
    assert [e["task"] for e in ev if e["event"] == "task_failed"] == ["t2", "t4"] or \
        sorted(e["task"] for e in ev if e["event"] == "task_failed") == ["t2", "t4"]
    assert any(e["event"] == "task_retry" and e["task"] == "t1" for e in ev)
    status = cli("status", str(tmp_path / "run"))
    assert "failed (4/6 tasks, 2 failed" in status.stdout.replace("\n", " "), status.stdout
    # the progress a task reports from inside reaches events.jsonl
    assert any(e["event"] == "task_progress" and e["done"] == 2 and e["metrics"] == {"step": "done"} for e in ev)
    # fixed: a re-run runs only the two failed tasks
    (tmp_path / "flags" / "fail").unlink()
    res = run_pipeline(m, client)[0]
    assert res.status == "ran" and res.path == art and not (art / "failed.jsonl").exists()
    assert [attempts(tmp_path, f"t{i}") for i in range(6)] == [1, 2, 2, 1, 2, 1]


def test_parts_from_other_library_versions_are_rerun_not_mixed(tmp_path, client):
    m = flaky(tmp_path, tasks=3, bad=[1])
    (tmp_path / "flags" / "fail").write_text("")
    with pytest.raises(RunError):
        run_pipeline(m, client)
    art = next((tmp_path / "run").glob("flaky-*"))
    marker = art / ".parts" / "t0.json"
    rec = json.loads(marker.read_text())
    assert rec["code"]["fingerprint"] and rec["code"]["libraries"]["numpy"]
    rec["code"]["libraries"]["numpy"] = "0.0.1"  # written under another numpy
    marker.write_text(json.dumps(rec))
    (tmp_path / "flags" / "fail").unlink()
    run_pipeline(m, client)
    stale = [e for e in events(tmp_path / "run") if e["event"] == "parts_stale"]
    assert stale and stale[-1]["parts"] == ["t0"] and "numpy (0.0.1 -> " in stale[-1]["differs"][0]
    assert attempts(tmp_path, "t0") == 2 and attempts(tmp_path, "t2") == 1


def test_second_driver_on_a_run_directory_gets_a_clear_error(tmp_path, client):
    from pipeline.lock import LockedError, RunLock

    m = flaky(tmp_path, tasks=1)
    with RunLock(tmp_path / "run"):
        with pytest.raises(LockedError, match=r"in use by another distillery driver \(pid \d+ on .* since "):
            run_pipeline(m, client)
    run_pipeline(m, client)  # released: runs


def _scheduler(tmp: Path) -> tuple[subprocess.Popen, str]:
    sched = tmp / "scheduler.json"
    proc = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--scheduler-file", str(sched),
                             "--host", "127.0.0.1", "--port", "0", "--dashboard-address", ":0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO / "tests")})  # unpickles the dummy stages
    t0 = time.time()
    while not sched.exists() and time.time() - t0 < 60:
        time.sleep(0.1)
    return proc, json.loads(sched.read_text())["address"]


def test_no_worker_stops_the_run_within_the_timeout(tmp_path):
    proc, address = _scheduler(tmp_path)
    try:
        m = flaky(tmp_path, tasks=2)
        m["cluster"] = {"profile": "address", "options": {"address": address, "worker_timeout": 3}}
        t0 = time.time()
        with pytest.raises(RunError, match="no Dask worker for 3 s"):
            run_pipeline(m, client=None)
        assert time.time() - t0 < 30
        assert not list((tmp_path / "run").glob("flaky-*")), "nothing was committed: no artifact directory left"
        assert any(e["event"] == "no_workers_timeout" for e in events(tmp_path / "run"))
    finally:
        proc.kill()
        proc.wait()


def cli(*args: str, cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, "COLUMNS": "200"})


def test_wrong_scheduler_address_is_one_line_an_event_and_no_debris(tmp_path):
    import yaml

    make_tree(tmp_path / "src", per_class=2, corrupt=False)
    m = {"name": "w", "output_dir": str(tmp_path / "run"), "source": {"kind": "folder", "path": str(tmp_path / "src")},
         "stages": [{"name": "shard"}],
         "cluster": {"profile": "address", "options": {"address": "tcp://127.0.0.1:9", "connect_timeout": "2s"}}}
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(m))
    r = cli("run", str(path), "--no-progress")
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) <= 2 and "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in r.stderr, r.stderr
    assert not list((tmp_path / "run").glob("shard-*"))
    assert any(e["event"] == "cluster_failed" for e in events(tmp_path / "run"))


def test_malformed_override_and_bad_fields_are_one_line(tmp_path):
    r = cli("run", str(REPO / "manifests" / "quickstart.yaml"), "stages.shard.resize={mode: max_side")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) <= 2, r.stderr
    assert "stages.shard.resize" in r.stderr and "not valid YAML" in r.stderr
    r = cli("run", str(REPO / "manifests" / "quickstart.yaml"), "stages.shard.resize={mode: sideways}",
            f"output_dir={tmp_path / 'out'}")
    assert r.returncode == 2 and "stages[shard].params.resize.mode" in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_runner_works_from_a_plain_script_without_main_guard(tmp_path):
    script = tmp_path / "drive.py"
    script.write_text(f"""
import sys
sys.path.insert(0, {str(REPO / 'tests')!r})
import dummy_stages
from pipeline.config import PipelineManifest
from pipeline.runner import Runner
m = PipelineManifest.model_validate({{"name": "s", "output_dir": {str(tmp_path / 'run')!r},
    "cluster": {{"options": {{"n_workers": 2, "worker_timeout": 90}}}},
    "stages": [{{"name": "flaky", "params": {{"tasks": 3, "flag_dir": {str(tmp_path)!r}}}}}]}})
with Runner(m, show_progress=False) as r:
    print("done", r.run()[0].status)
""")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert r.returncode == 0 and "done ran" in r.stdout, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
