"""The DAG runner: artifact ids, cache hits, one Dask task per shard, atomic commits, resume, manifests.

Resume works at task granularity: a task's files are renamed into place and then its ``.parts/<id>.json``
marker is written; a re-run plans the same tasks (the plan is cached in the artifact) and submits only
those without a marker. Outputs are deterministic, so an interrupted-then-resumed run is byte-identical
to an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from pipeline.artifacts import (
    Artifact, ArtifactManifest, FileEntry, PartRecord, code_version, compute_artifact_id, now_iso,
)
from pipeline.atomic import atomic_path, sha256_file, write_json
from pipeline.config import PipelineManifest, ResolvedStage, resolve
from pipeline.errors import DistilleryError
from pipeline.events import EventLog
from pipeline.plans import PLAN_FILE, load_plan, save_plan
from pipeline.progress import StageProgress
from pipeline.stage import CHECKPOINT_DIR, FinalizeContext, default_cache_dir, InputArtifact, PlanContext, Task, TaskContext, identity_params

RUN_FILE = "run.json"


class RunError(DistilleryError):
    pass


@dataclass(frozen=True)
class TaskSpec:
    """Everything a worker needs to run one task; small and picklable."""

    stage_cls: type  # pickled by reference: workers import the stage's module
    params: dict[str, Any]
    task: Task
    out_dir: str
    inputs: dict[str, str]
    cache_dir: str


def _worker_cache() -> dict[str, Any]:
    """Per-worker-process object cache, so models load once per worker and not once per task."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return _PROCESS_CACHE
    cache = getattr(worker, "_distillery_cache", None)
    if cache is None:
        cache = {}
        worker._distillery_cache = cache
    return cache


_PROCESS_CACHE: dict[str, Any] = {}  # used only outside a Dask worker (serial execution)


def execute_task(spec: TaskSpec) -> PartRecord:
    """Worker entry point: run one task unless it is already committed, then commit it atomically."""
    out_dir = Path(spec.out_dir)
    marker = out_dir / ".parts" / f"{spec.task.id}.json"
    if marker.is_file():
        return PartRecord.model_validate_json(marker.read_text())
    stage = spec.stage_cls()
    params = stage.Params.model_validate(spec.params)
    inputs = {k: InputArtifact(Path(v)) for k, v in spec.inputs.items()}
    ctx = TaskContext(out_dir, inputs, cache=_worker_cache(), task_id=spec.task.id, cache_dir=Path(spec.cache_dir))
    t0 = time.perf_counter()
    try:
        info = stage.run(spec.task, params, ctx) or {}
    except BaseException:
        ctx.discard()
        raise
    return ctx.commit(spec.task.id, info, time.perf_counter() - t0)


@dataclass
class StageResult:
    name: str
    stage: str
    artifact_id: str
    path: Path
    status: str  # cached | ran | skipped
    seconds: float = 0.0
    counts: dict[str, Any] = field(default_factory=dict)


class Runner:
    """Runs a pipeline manifest. The Dask client is started lazily: a fully cached run starts none."""

    def __init__(self, manifest: PipelineManifest, *, where: str = "<manifest>", overrides: Sequence[str] = (),
                 profile: str | None = None, client: Any = None, show_progress: bool = True,
                 retries: int = 2) -> None:
        self.manifest = manifest
        self.where = where
        self.overrides = list(overrides)
        self.profile = profile or manifest.cluster.profile
        self.out_dir = Path(manifest.output_dir).resolve()
        self.steps = resolve(manifest, where)
        self._client = client
        self._stack = contextlib.ExitStack()
        self.show_progress = show_progress
        self.retries = retries
        self.events = EventLog(self.out_dir / "events.jsonl")
        self.cache_dir = Path(manifest.cache_dir).resolve() if manifest.cache_dir else default_cache_dir()

    # -- cluster -----------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            from pipeline.cluster import open_client

            self._client = self._stack.enter_context(
                open_client(self.profile, self.manifest.cluster.config, self.manifest.cluster.options)
            )
            self.events.emit("cluster_started", profile=self.profile, dashboard=getattr(self._client, "dashboard_link", ""))
        return self._client

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        futures = self.client.map(fn, list(items), pure=False, retries=self.retries)
        return self.client.gather(futures)

    # -- DAG ---------------------------------------------------------------------------------------
    def selected(self, until: str | None) -> list[ResolvedStage]:
        if until is None:
            return self.steps
        names = [s.name for s in self.steps]
        if until not in names:
            raise RunError(f"--until {until}: no such stage (have: {', '.join(names)})")
        needed = {until}
        for step in reversed(self.steps):
            if step.name in needed:
                needed.update(step.inputs.values())
        return [s for s in self.steps if s.name in needed]

    def run(self, until: str | None = None, force: Sequence[str] = ()) -> list[StageResult]:
        names = {s.name for s in self.steps}
        for f in force:
            if f not in names:
                raise RunError(f"--force {f}: no such stage (have: {', '.join(sorted(names))})")
        forced = set(force)
        results: dict[str, StageResult] = self.external_inputs()
        run_record: dict[str, Any] = {
            "manifest": self.manifest.model_dump(mode="json"), "manifest_path": self.where,
            "overrides": self.overrides, "order": [s.name for s in self.steps], "started": now_iso(),
            "code_version": code_version(), "stages": {},
        }
        selected = self.selected(until)
        for step in selected:  # fail on a missing source before any work starts
            step.stage().validate(step.params)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.events.emit("run_started", manifest=self.where, stages=[s.name for s in self.steps])
        for step in selected:
            upstream_forced = any(u in forced for u in step.inputs.values())
            if upstream_forced:
                forced.add(step.name)  # force propagates downstream
            def started(path: Path, artifact_id: str, name: str = step.name) -> None:
                run_record["stages"][name] = {"artifact_id": artifact_id, "path": str(path), "status": "running"}
                write_json(self.out_dir / RUN_FILE, run_record)

            res = self.run_stage(step, results, force=step.name in forced, on_start=started)
            results[step.name] = res
            run_record["stages"][step.name] = {
                "artifact_id": res.artifact_id, "path": str(res.path), "status": res.status,
                "seconds": round(res.seconds, 3), "counts": res.counts,
            }
            write_json(self.out_dir / RUN_FILE, run_record)
        run_record["finished"] = now_iso()
        write_json(self.out_dir / RUN_FILE, run_record)
        self.events.emit("run_finished", stages={k: v.status for k, v in results.items()})
        return [r for r in results.values() if r.status != "external"]

    def external_inputs(self) -> dict[str, StageResult]:
        """Artifacts named by directory in ``inputs:`` (made by another run, or by hand in our format)."""
        names = {s.name for s in self.steps}
        out: dict[str, StageResult] = {}
        for step in self.steps:
            for path in step.inputs.values():
                if path not in names and path not in out:
                    m = Artifact(Path(path)).manifest()
                    out[path] = StageResult(path, m.stage, m.artifact_id, Path(path), "external", 0.0, m.counts)
        return out

    def artifact_dir(self, step: ResolvedStage, artifact_id: str) -> Path:
        return self.out_dir / f"{step.name}-{artifact_id[:12]}"

    def identify(self, step: ResolvedStage, results: dict[str, StageResult]) -> tuple[str, dict[str, str], str]:
        stage = step.stage()
        input_ids = {k: results[v].artifact_id for k, v in step.inputs.items()}
        params = identity_params(step.params)
        extra = stage.identity(step.params)
        if extra:
            params = {**params, "__identity__": extra}
        fp = stage.fingerprint(step.params)
        return compute_artifact_id(stage.name, stage.version, params, input_ids, fp), input_ids, fp

    def run_stage(self, step: ResolvedStage, results: dict[str, StageResult], force: bool = False,
                  on_start: Callable[[Path, str], None] | None = None) -> StageResult:
        stage = step.stage()
        t0 = time.perf_counter()
        artifact_id, input_ids, fingerprint = self.identify(step, results)
        path = self.artifact_dir(step, artifact_id)
        art = Artifact(path)
        if force and path.exists():
            self.events.emit("stage_forced", stage=step.name, artifact=path.name)
            shutil.rmtree(path)
        if art.is_complete():
            self._link(step.name, path)
            m = art.manifest()
            self.events.emit("stage_cached", stage=step.name, artifact=path.name)
            return StageResult(step.name, stage.name, artifact_id, path, "cached", 0.0, m.counts)

        inputs = {k: InputArtifact(results[v].path) for k, v in step.inputs.items()}
        path.mkdir(parents=True, exist_ok=True)
        if on_start is not None:
            on_start(path, artifact_id)
        self.events.emit("stage_started", stage=step.name, artifact=path.name)

        tp = time.perf_counter()
        tasks = self._plan(stage, step, inputs, path)
        plan_s = time.perf_counter() - tp

        done = art.committed_parts()
        pending = [t for t in tasks if t.id not in done]
        if done:
            self.events.emit("stage_resumed", stage=step.name, committed=len(done), pending=len(pending))
        if art.tmp_dir.exists():  # leftovers of killed tasks
            shutil.rmtree(art.tmp_dir)

        tr = time.perf_counter()
        parts = dict(done)
        parts.update(self._execute(stage, step, tasks, pending, inputs, path))
        run_s = time.perf_counter() - tr

        tf = time.perf_counter()
        ordered = [parts[t.id] for t in tasks]
        fctx = FinalizeContext(out_dir=path, inputs=inputs, cache_dir=self.cache_dir)
        summary = stage.finalize(ordered, step.params, fctx)
        files = [FileEntry(path=f, sha256=sha256_file(path / f), bytes=(path / f).stat().st_size) for f in summary.files]
        finalize_s = time.perf_counter() - tf

        manifest = ArtifactManifest(
            artifact_id=artifact_id, stage=stage.name, kind=stage.output_kind, name=step.name,
            stage_version=stage.version,
            params=step.params.model_dump(mode="json"), inputs=input_ids, fingerprint=fingerprint,
            code_version=code_version(), created=now_iso(), counts=summary.counts, parts=ordered, files=files,
            timings={"plan_s": round(plan_s, 3), "run_s": round(run_s, 3), "finalize_s": round(finalize_s, 3),
                     "task_s_sum": round(sum(p.seconds for p in ordered), 3)},
            metrics=summary.metrics,
        )
        for scratch in (art.tmp_dir, path / CHECKPOINT_DIR):
            if scratch.exists():
                shutil.rmtree(scratch)
        art.write_manifest(manifest)
        self._link(step.name, path)
        seconds = time.perf_counter() - t0
        self.events.emit("stage_finished", stage=step.name, artifact=path.name, seconds=round(seconds, 2),
                         counts=summary.counts)
        return StageResult(step.name, stage.name, artifact_id, path, "ran", seconds, summary.counts)

    def _plan(self, stage: Any, step: ResolvedStage, inputs: dict[str, InputArtifact], path: Path) -> list[Task]:
        plan_path = path / PLAN_FILE
        if plan_path.is_file():
            return load_plan(plan_path)
        tasks = stage.plan(inputs, step.params, PlanContext(out_dir=path, inputs=inputs, map=self._map,
                                                            cache_dir=self.cache_dir))
        return save_plan(tasks, plan_path)

    def _execute(self, stage: Any, step: ResolvedStage, tasks: list[Task], pending: list[Task],
                 inputs: dict[str, InputArtifact], path: Path) -> dict[str, PartRecord]:
        if not pending:
            return {}
        from distributed import as_completed

        client = self.client
        resources = dict(stage.resources) or None
        if resources:
            from pipeline.cluster import cluster_has_resource

            missing = [r for r in resources if not cluster_has_resource(client, r)]
            if missing:
                self.events.emit("resources_unavailable", stage=step.name, missing=missing,
                                 note="running on workers without them")
                resources = None
        specs = [
            TaskSpec(step.stage_cls, step.params.model_dump(mode="json"), t, str(path),
                     {k: str(v.path) for k, v in inputs.items()}, str(self.cache_dir))
            for t in pending
        ]
        keys = [f"{step.name}-{path.name[-12:]}-{t.id}" for t in pending]
        futures = client.map(execute_task, specs, key=keys, resources=resources, retries=self.retries, pure=False)
        out: dict[str, PartRecord] = {}
        total = sum(t.size for t in tasks)
        done_size = total - sum(t.size for t in pending)
        with StageProgress(step.name, len(tasks), total, enabled=self.show_progress) as bar:
            bar.advance(len(tasks) - len(pending), done_size)
            by_key = dict(zip(keys, pending))
            for fut in as_completed(futures):
                task = by_key[fut.key]
                try:
                    rec = fut.result()
                except Exception as e:
                    for f in futures:
                        f.cancel()
                    self.events.emit("task_failed", stage=step.name, task=task.id, error=repr(e))
                    raise RunError(f"stage {step.name}, task {task.id}: {type(e).__name__}: {e}") from e
                out[task.id] = rec
                bar.advance(1, task.size)
        return out

    def _link(self, name: str, path: Path) -> None:
        """``<run>/<stage>`` -> the current artifact, switched atomically."""
        link = self.out_dir / name
        tmp = self.out_dir / f".{name}.link-{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        os.symlink(path.name, tmp)
        os.replace(tmp, link)
