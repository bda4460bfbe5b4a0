"""Cluster profiles, worker resources and per-worker model caching."""
from __future__ import annotations

import subprocess
import sys

import pytest

import dummy_stages  # noqa: F401
from conftest import REPO, run_pipeline
from pipeline.cluster import ClusterError, load_config, open_client, profile_settings


def test_repo_config_has_all_profiles():
    cfg = load_config(REPO / "dask_config.yaml")
    for name in ("local", "address", "slurm", "local-gpu"):
        assert profile_settings(name, cfg)["kind"] == name
    slurm = profile_settings("slurm", cfg, {"queue": "gpu", "jobs": 2})
    assert slurm["queue"] == "gpu" and slurm["worker_extra_args"] == ["--resources", "GPU=1"]
    with pytest.raises(ClusterError, match="no cluster profile 'nope'"):
        profile_settings("nope", cfg)


def test_optional_backends_fail_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)
    with pytest.raises(ClusterError, match="dask-jobqueue"):
        with open_client("slurm", REPO / "dask_config.yaml"):
            pass
    monkeypatch.delenv("DASK_SCHEDULER_ADDRESS", raising=False)
    with pytest.raises(ClusterError, match="needs an address"):
        with open_client("address", REPO / "dask_config.yaml"):
            pass


def test_gpu_stage_runs_on_cpu_cluster_and_models_load_once_per_worker(tmp_path, client):
    res = run_pipeline({"name": "g", "output_dir": str(tmp_path / "run"),
                        "stages": [{"name": "m", "stage": "model-per-worker", "params": {"tasks": 12}}]}, client)[0]
    from pipeline.artifacts import Artifact

    models = Artifact(res.path).manifest().metrics["models"]
    n_workers = len(client.scheduler_info()["workers"])
    assert 1 <= len(models) <= n_workers < 12, models
    events = (tmp_path / "run" / "events.jsonl").read_text()
    assert "resources_unavailable" in events


def test_cli_run_status_show(tmp_path):
    out = tmp_path / "q"
    cli = [sys.executable, "-m", "pipeline.cli"]
    r = subprocess.run([*cli, "run", str(REPO / "manifests" / "quickstart.yaml"), f"output_dir={out}", "--no-progress"],
                       capture_output=True, text=True, env={"COLUMNS": "200", **__import__("os").environ})
    assert r.returncode == 0, r.stderr
    assert "1797" in r.stdout
    s = subprocess.run([*cli, "status", str(out)], capture_output=True, text=True, env={"COLUMNS": "200", **__import__("os").environ})
    assert "done" in s.stdout and "1797" in s.stdout
    sh = subprocess.run([*cli, "show", str(out / "shard")], capture_output=True, text=True)
    assert sh.returncode == 0 and "sklearn-digits" in sh.stdout
    bad = subprocess.run([*cli, "run", str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert bad.returncode == 2 and "nope.yaml" in bad.stderr and "not found" in bad.stderr
