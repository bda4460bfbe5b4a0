"""Stages with phases: a global fit, per-shard assignment into key partitions, one task per key; resume."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

import dummy_stages  # noqa: F401  (registers phased-groups)
from conftest import make_tree, run_pipeline


def manifest(tmp, src, **params):
    return {"name": "ph", "output_dir": str(tmp / "run"), "source": {"kind": "folder", "path": str(src)},
            "stages": [{"name": "shard", "params": {"samples_per_shard": 4}},
                       {"name": "groups", "stage": "phased-groups", "params": params}]}


def events(run_dir):
    return [json.loads(x) for x in (run_dir / "events.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    src = tmp_path_factory.mktemp("phases") / "src"
    make_tree(src, per_class=5, splits=("train",), corrupt=False)
    return src


@pytest.mark.parametrize("buckets", [None, 2])
def test_three_phases_group_every_row_once(src, tmp_path, client, buckets):
    shard, groups = run_pipeline(manifest(tmp_path, src, groups=3, buckets=buckets), client)
    index = pq.read_table(shard.path / "index.parquet").to_pylist()
    m = json.loads((groups.path / "manifest.json").read_text())
    phases = [p["phase"] for p in m["parts"]]
    assert phases[0] == "fit" and set(phases) == {"fit", "assign", "group"}
    assert phases == sorted(phases, key=["fit", "assign", "group"].index), "parts come in phase order"
    assert m["counts"]["in"] == m["counts"]["out"] == len(index)
    offset = json.loads((groups.path / "fit.json").read_text())["offset"]
    seen = {}
    for f in sorted((groups.path / "groups").glob("*.json")):
        for uid, g in json.loads(f.read_text()):
            assert uid not in seen, "every row lands in exactly one group task"
            seen[uid] = g
    want = {r["uid"]: (r["label"] - offset) % 3 for r in index}
    assert seen == want
    n_group_tasks = sum(p == "group" for p in phases)
    assert n_group_tasks == (3 if buckets is None else 2)


def test_resume_reruns_only_missing_tasks_and_replans_after_earlier_phase_changes(src, tmp_path, client):
    shard, groups = run_pipeline(manifest(tmp_path, src), client)
    art = groups.path
    ref = {f.name: f.read_bytes() for f in (art / "groups").glob("*.json")}
    run_dir = tmp_path / "run"
    # a killed run: the manifest and one group-phase marker are missing
    (art / "manifest.json").unlink()
    (art / ".parts" / "group.g1.json").unlink()
    run_pipeline(manifest(tmp_path, src), client)
    resumed = [e for e in events(run_dir) if e["event"] == "stage_resumed"]
    assert resumed[-1]["phase"] == "group" and resumed[-1]["pending"] == 1
    assert {f.name: f.read_bytes() for f in (art / "groups").glob("*.json")} == ref
    # an assign task re-ran: the group phase is planned again and all of its tasks re-run
    (art / "manifest.json").unlink()
    (art / ".parts" / "assign.s000.json").unlink()
    before = (art / ".plan.group.json").stat().st_mtime_ns
    run_pipeline(manifest(tmp_path, src), client)
    assert (art / ".plan.group.json").stat().st_mtime_ns != before
    group_started = [e for e in events(run_dir) if e["event"] == "stage_resumed"]
    assert group_started[-1]["phase"] == "assign"
    assert {f.name: f.read_bytes() for f in (art / "groups").glob("*.json")} == ref
