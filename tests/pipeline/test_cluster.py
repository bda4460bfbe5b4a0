"""Cluster profiles, worker resources and per-worker model caching."""
from __future__ import annotations

import json
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
    assert f"read train (1438 samples): {(out / 'shard').resolve()}/shards/train/" in sh.stdout.replace("\n", "")
    assert 'wds.WebDataset("' + str((out / "shard").resolve()) in sh.stdout.replace("\n", "")
    # the curation half of the quickstart: every stage accounts for its rows, DBP keeps exactly half of what dedup
    # kept, export holds exactly the selection (plus the test split), the probe ranks it
    man = {d: json.loads((out / d / "manifest.json").read_text()) for d in
           ("embed", "cluster", "dedup", "dbp", "export", "validate-dbp", "probe")}
    for d in ("embed", "cluster", "dedup", "dbp"):
        c = man[d]["counts"]
        assert c["in"] == c["out"] + c["rejected"], (d, c)
    assert man["embed"]["counts"]["in"] == 1797 and man["cluster"]["counts"]["in"] == 1438
    assert man["dbp"]["counts"]["in"] == man["dedup"]["counts"]["out"]
    assert man["dbp"]["counts"]["out"] == round(0.5 * man["dedup"]["counts"]["out"])
    assert man["export"]["counts"]["out"] == man["dbp"]["counts"]["out"] + 359
    assert man["validate-dbp"]["metrics"]["n_train"] == man["dbp"]["counts"]["out"]
    assert man["validate-dbp"]["metrics"]["random_baseline"]["n_train"] == man["dbp"]["counts"]["out"]
    assert 50 < man["probe"]["metrics"]["linear_top1"] <= 100
    rep = subprocess.run([*cli, "report", str(out)], capture_output=True, text=True)
    html = (out / "report.html").read_text()
    probe_top1 = format(man["probe"]["metrics"]["linear_top1"], ".4g")
    assert rep.returncode == 0 and "Cheap evaluations" in html and probe_top1 in html
    bad = subprocess.run([*cli, "run", str(tmp_path / "nope.yaml")], capture_output=True, text=True)
    assert bad.returncode == 2 and "nope.yaml" in bad.stderr and "not found" in bad.stderr


def test_worker_specs_pin_one_gpu_per_worker_and_hide_gpus_from_the_rest():
    from pipeline.cluster import worker_specs

    specs = worker_specs(3, 1, "1GiB", ["0", "3"])
    env = {k: s["worker_kwargs"]["env"]["CUDA_VISIBLE_DEVICES"] for k, s in specs.items()}
    res = {k: s["worker_kwargs"]["resources"] for k, s in specs.items()}
    assert env == {"0": "0", "1": "3", "2": ""}
    assert res == {"0": {"GPU": 1}, "1": {"GPU": 1}, "2": None}


def test_gpu_tasks_spread_one_per_device_and_resource_amounts_are_checked(tmp_path):
    """Two (pretend) GPUs and three workers: GPU tasks only run on the two GPU workers, never two at a time on one
    device; a task asking for more than any worker offers is a clear error, not a hang."""
    from pipeline.runner import RunError

    cluster = {"profile": "local", "options": {"n_workers": 3, "gpus": ["0", "1"], "worker_timeout": 30}}
    m = {"name": "g", "output_dir": str(tmp_path / "run"), "cluster": cluster,
         "stages": [{"name": "probe", "stage": "device-probe", "params": {"tasks": 6, "sleep": 0.4}}]}
    import os

    os.environ["PYTHONPATH"] = str(REPO / "tests")  # the workers unpickle the dummy stage
    try:
        res = run_pipeline(m, client=None)[0]
        from pipeline.artifacts import Artifact

        runs = Artifact(res.path).manifest().metrics["runs"]
        assert {r["device"] for r in runs} <= {"0", "1"} and len(runs) == 6
        for dev in ("0", "1"):
            spans = sorted((r["start"], r["end"]) for r in runs if r["device"] == dev)
            assert all(a_end <= b_start + 1e-3 for (_, a_end), (b_start, _) in zip(spans, spans[1:])), \
                f"two tasks overlapped on GPU {dev}"
        m["stages"][0]["resources"] = {"GPU": 2}
        m["stages"][0]["params"]["tasks"] = 1
        with pytest.raises(RunError, match=r"needs GPU=2 but the largest worker offers GPU=1"):
            run_pipeline(m, client=None)
        m["stages"][0]["resources"] = {"memory": 1e15}
        with pytest.raises(RunError, match=r"needs memory=1e\+15 but the largest worker offers memory="):
            run_pipeline(m, client=None)
    finally:
        os.environ.pop("PYTHONPATH", None)
