"""The DAG runner: caching, invalidation downstream, --until, --force, manifest validation errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import dummy_stages  # noqa: F401  (registers count-labels)
from conftest import REPO, make_tree, run_pipeline
from pipeline.config import ManifestError, PipelineManifest, load_manifest, resolve
from pipeline.runner import RunError


def two_stage(tmp: Path, src: Path) -> dict:
    return {"name": "dag", "output_dir": str(tmp / "run"), "source": {"kind": "folder", "path": str(src)},
            "stages": [{"name": "shard", "params": {"samples_per_shard": 5}},
                       {"name": "count", "stage": "count-labels", "params": {"scale": 1}}]}


def test_cache_invalidation_until_and_force(tmp_path, client):
    src = tmp_path / "src"
    make_tree(src, per_class=4, corrupt=False)
    m = two_stage(tmp_path, src)
    first = {r.name: r for r in run_pipeline(m, client)}
    assert [r.status for r in first.values()] == ["ran", "ran"]
    assert first["count"].counts["in"] == first["shard"].counts["out"]
    assert json.loads((first["count"].path / "manifest.json").read_text())["inputs"] == {"shards": first["shard"].artifact_id}

    assert [r.status for r in run_pipeline(m, client)] == ["cached", "cached"]
    # a downstream parameter re-runs only downstream
    r = {x.name: x for x in run_pipeline(m, client, overrides=["stages.count.scale=2"])}
    assert (r["shard"].status, r["count"].status) == ("cached", "ran")
    # an upstream parameter changes every id downstream
    r = {x.name: x for x in run_pipeline(m, client, overrides=["stages.shard.samples_per_shard=6"])}
    assert (r["shard"].status, r["count"].status) == ("ran", "ran")
    assert r["count"].artifact_id != first["count"].artifact_id
    # --until stops after the named stage
    r = run_pipeline(m, client, until="shard", overrides=["stages.shard.samples_per_shard=7"])
    assert [x.name for x in r] == ["shard"]
    # --until repeated: every named step and what they need; an unknown name fails before anything runs
    r = run_pipeline(m, client, until=["count", "shard"])
    assert [x.name for x in r] == ["shard", "count"]
    with pytest.raises(RunError, match="--until nope: no such stage"):
        run_pipeline(m, client, until=["shard", "nope"])
    # --force re-runs the stage and what depends on it
    r = run_pipeline(m, client, force=["shard"])
    assert [x.status for x in r] == ["ran", "ran"]
    # the run dir links each stage to its current artifact, and records the run
    run_dir = Path(m["output_dir"])
    assert (run_dir / "count").resolve() == r[1].path
    rec = json.loads((run_dir / "run.json").read_text())
    assert rec["order"] == ["shard", "count"] and rec["stages"]["count"]["status"] == "ran"


def test_manifest_errors_name_file_and_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noutput_dir: out\nsource: {kind: folder, path: .}\n"
                   "stages:\n  - name: shard\n    params: {samples_per_shard: lots}\n")
    from pipeline.config import resolve

    with pytest.raises(ManifestError) as e:
        resolve(load_manifest(bad), str(bad))
    assert str(bad) in str(e.value) and "stages[shard].params.samples_per_shard" in str(e.value)

    bad.write_text("name: x\noutput_dir: out\nstages:\n  - name: shard\n    params: {bogus_option: 1}\n")
    with pytest.raises(ManifestError, match="needs a top-level 'source:'"):
        resolve(load_manifest(bad), str(bad))
    bad.write_text("name: x\noutput_dir: out\nsource: {kind: folder, path: .}\n"
                   "stages:\n  - name: shard\n    params: {bogus_option: 1}\n")
    with pytest.raises(ManifestError, match=r"stages\[shard\]\.params\.bogus_option: Extra inputs"):
        resolve(load_manifest(bad), str(bad))
    bad.write_text("name: x\noutput_dir: out\nsource: {kind: folder, pth: .}\nstages:\n  - name: shard\n")
    with pytest.raises(ManifestError, match=r"bad.yaml: source.pth: Extra inputs are not permitted"):
        resolve(load_manifest(bad), str(bad))
    bad.write_text("name: x\nstages: []\n")
    with pytest.raises(ManifestError, match="output_dir: Field required"):
        load_manifest(bad)
    bad.write_text("name: x\noutput_dir: o\nstages:\n  - name: a\n    stage: nope\n")
    with pytest.raises(ManifestError, match=r"unknown stage 'nope'; available: .*shard"):
        resolve(load_manifest(bad), str(bad))
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "missing.yaml")
    with pytest.raises(ManifestError, match="no stage named 'zzz'"):
        load_manifest(REPO / "manifests" / "quickstart.yaml", ["stages.zzz.x=1"])


def test_overrides_parse_yaml_values(tmp_path):
    m = load_manifest(REPO / "manifests" / "quickstart.yaml",
                      ["output_dir=/tmp/elsewhere", "stages.shard.samples_per_shard=17", "stages.shard.dedup=false",
                       "cluster.profile=address"])
    assert str(m.output_dir) == "/tmp/elsewhere"
    assert m.stages[0].params["samples_per_shard"] == 17 and m.stages[0].params["dedup"] is False
    assert m.cluster.profile == "address"


def test_artifact_manifest_schema_is_current():
    """manifests/schema/artifact_manifest.schema.json is generated from the model: keep them in sync."""
    from pipeline.artifacts import manifest_json_schema

    path = REPO / "manifests" / "schema" / "artifact_manifest.schema.json"
    assert json.loads(path.read_text()) == manifest_json_schema(), "run: distillery schema --out " + str(path)


def test_inputs_can_name_existing_artifacts(tmp_path, client):
    src = tmp_path / "src"
    make_tree(src, per_class=3, corrupt=False)
    shard = run_pipeline(two_stage(tmp_path / "a", src), client, until="shard")[0]
    m = {"name": "ext", "output_dir": str(tmp_path / "b"),
         "stages": [{"name": "count", "stage": "count-labels", "inputs": {"shards": str(shard.path)}}]}
    res = run_pipeline(m, client)
    assert [r.name for r in res] == ["count"] and res[0].counts["in"] == shard.counts["out"]
    assert json.loads((res[0].path / "manifest.json").read_text())["inputs"] == {"shards": shard.artifact_id}
    m["stages"][0]["inputs"] = {"shards": str(tmp_path / "nothing-here")}
    with pytest.raises(ManifestError, match="neither an earlier stage nor a complete artifact"):
        run_pipeline(m, client)


def test_independent_stages_run_at_the_same_time_and_a_failure_stops_only_what_follows(tmp_path, client):
    import dummy_stages  # noqa: F401  (device-probe, flaky)
    from pipeline.artifacts import Artifact
    from pipeline.runner import RunError

    probe = {"stage": "device-probe", "params": {"tasks": 1, "sleep": 1.5}}
    m = {"name": "par", "output_dir": str(tmp_path / "run"),
         "stages": [{"name": "a", **probe}, {"name": "b", **{**probe, "params": {"tasks": 1, "sleep": 1.6}}}]}
    a, b = run_pipeline(m, client)
    ra = Artifact(a.path).manifest().metrics["runs"][0]
    rb = Artifact(b.path).manifest().metrics["runs"][0]
    assert ra["start"] < rb["end"] and rb["start"] < ra["end"], "independent stages overlap in time"

    flags = tmp_path / "flags"
    flags.mkdir()
    (flags / "fail").write_text("")
    m = {"name": "par2", "output_dir": str(tmp_path / "run2"), "stages": [
        {"name": "bad", "stage": "flaky", "params": {"tasks": 1, "bad": [0], "flag_dir": str(flags)}},
        {"name": "fine", **probe},
        {"name": "after", "stage": "flaky", "inputs": {"after": "bad"}, "params": {"tasks": 1, "flag_dir": str(flags)}},
    ]}
    with pytest.raises(RunError, match="stage bad: 1 of 1 tasks failed"):
        run_pipeline(m, client)
    rec = json.loads((tmp_path / "run2" / "run.json").read_text())
    assert rec["stages"]["bad"]["status"] == "failed" and rec["stages"]["fine"]["status"] == "ran"
    assert "after" not in rec["stages"], "a step downstream of a failure never starts"


def test_steps_feeding_more_steps_go_first():
    """Concurrent stages share the cluster: the step with more steps downstream (the critical path) gets the higher
    task priority and is started first among ready steps."""
    from pipeline.dag import downstream_counts

    m = PipelineManifest.model_validate({"name": "p", "output_dir": "/tmp/unused", "stages": [
        {"name": "a", "stage": "flaky"},
        {"name": "side", "stage": "flaky", "inputs": {"after": "a"}},
        {"name": "b", "stage": "flaky", "inputs": {"after": "a"}},
        {"name": "c", "stage": "flaky", "inputs": {"after": "b"}},
        {"name": "d", "stage": "flaky", "inputs": {"after": "c"}}]})
    counts = downstream_counts(resolve(m, "test"))
    assert counts == {"a": 4, "side": 0, "b": 2, "c": 1, "d": 0}
