"""The DAG runner: artifact ids, cache hits, tasks on Dask, atomic commits, resume, failures, manifests.

* **Identity.** An artifact's id hashes the stage name and version, its parameters (``execution_only`` ones
  excluded), what ``Stage.identity`` adds (a resolved recipe), the input artifacts' ids, the source fingerprint and
  the stage's **code fingerprint** (``pipeline/fingerprint.py``). A cache hit can therefore never be stale.
* **Resume.** A task renames its files into place, then writes ``.parts/<task>.json`` (with the code fingerprint and
  library versions it ran with). A re-run loads the plan (JSON) and runs only tasks without a marker; markers written
  by other code or libraries are re-run, never mixed in. Phases run in order, each planned once the previous has
  committed.
* **Failures.** A task that raises an ordinary exception (a ``ValueError`` in the stage) fails deterministically and
  is not retried; transient failures (a lost worker, an ``OSError``) are, up to ``retries`` times. The other tasks
  still run; failed ones are listed with their errors in the artifact's ``failed.jsonl``; the run stops with a
  ``RunError`` naming them, and a re-run retries only them.
* **Never hangs.** With no worker for ``worker_timeout`` seconds (all died, or none ever joined) the run stops with
  one clear message; the committed tasks are kept.
* **One driver per run directory** (a lock), and nothing is created on disk for a stage until its cluster is up.
"""
from __future__ import annotations

import contextlib
import importlib
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.artifacts import Artifact, PartRecord, code_version, now_iso, step_identity
from pipeline.atomic import symlink, write_json
from pipeline.cluster import (
    ClusterError, load_config, profile_settings, task_resources, wait_any, worker_resources,
)
from pipeline.commit import finish_artifact
from pipeline.config import PipelineManifest, ResolvedStage, resolve
from pipeline.dag import downstream_counts, forced_closure, needed_by, run_dag
from pipeline.errors import DistilleryError
from pipeline.events import EventLog
from pipeline.lock import RunLock
from pipeline.plans import PLAN_FILE, load_plan, save_plan
from pipeline.progress import RunDisplay, StageProgress, progress_handler
from pipeline.stage import MAIN_PHASE, InputArtifact, PlanContext, Stage, Task, default_cache_dir, part_name
from pipeline.tasks import (  # noqa: F401  (execute_task, TaskSpec: re-exported for existing importers)
    PROGRESS_TOPIC, TaskSpec, _failure, code_mismatch, execute_task, is_transient, report_failures, stale_parts,
)

RUN_FILE = "run.json"
FAILED_FILE = "failed.jsonl"
DEFAULT_WORKER_TIMEOUT = 60.0


class RunError(DistilleryError):
    pass


@dataclass
class StageResult:
    name: str
    stage: str
    artifact_id: str
    path: Path
    status: str  # cached | ran | external
    seconds: float = 0.0
    counts: dict[str, Any] = field(default_factory=dict)


class Runner:
    """Runs a pipeline manifest. The Dask client is started lazily: a fully cached run starts none."""

    def __init__(self, manifest: PipelineManifest, *, where: str = "<manifest>", overrides: Sequence[str] = (),
                 profile: str | None = None, client: Any = None, show_progress: bool = True,
                 retries: int = 2, worker_timeout: float | None = None,
                 parallel_stages: int | None = None) -> None:
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
        self.worker_timeout = worker_timeout if worker_timeout is not None else self._configured_worker_timeout()
        self.parallel_stages = max(1, parallel_stages or manifest.parallel_stages)
        self.display = RunDisplay(enabled=False)
        self._client_lock = threading.Lock()
        self._record_lock = threading.Lock()
        self._progress_handlers: dict[str, Callable[[dict[str, Any]], None]] = {}
        self._identities: dict[Any, tuple[str, dict[str, str], str, str]] = {}
        self._subscribed = False
        self._priority = downstream_counts(self.steps)

    def _configured_worker_timeout(self) -> float:
        try:
            settings = profile_settings(self.profile, load_config(self.manifest.cluster.config),
                                        self.manifest.cluster.options)
        except ClusterError:
            return DEFAULT_WORKER_TIMEOUT
        return float(settings.get("worker_timeout", DEFAULT_WORKER_TIMEOUT))

    # -- cluster -----------------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        with self._client_lock:  # stages run in threads: one cluster for all of them
            if self._client is None:
                from pipeline.cluster import open_client

                try:
                    self._client = self._stack.enter_context(
                        open_client(self.profile, self.manifest.cluster.config, self.manifest.cluster.options))
                except ClusterError as e:
                    self.events.emit("cluster_failed", profile=self.profile, error=str(e))
                    raise
                self.events.emit("cluster_started", profile=self.profile,
                                 dashboard=getattr(self._client, "dashboard_link", ""))
            if not self._subscribed and hasattr(self._client, "subscribe_topic"):
                self._client.subscribe_topic(PROGRESS_TOPIC, self._on_progress)  # one, dispatched per stage phase
                self._subscribed = True
            return self._client

    def _on_progress(self, event: Any) -> None:
        msg = event[1] if isinstance(event, tuple) and len(event) == 2 else event
        if isinstance(msg, dict):
            handler = self._progress_handlers.get(msg.get("key", ""))
            if handler is not None:
                handler(msg)

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _map(self, fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        """Plan-time fan-out on the cluster (scanning a source), with the same no-worker watchdog as tasks."""
        futures = self.client.map(fn, list(items), pure=False, retries=self.retries)
        remaining = set(futures)
        while remaining:
            remaining -= self._wait_any(list(remaining), futures)
        try:
            return self.client.gather(futures)
        except Exception as e:
            raise RunError(f"planning step {getattr(fn, '__name__', fn)} failed: {type(e).__name__}: {e}") from e

    def _wait_any(self, futures: list[Any], cancel_on_timeout: Sequence[Any]) -> set[Any]:
        """Futures among ``futures`` that finished; raises ``RunError`` after ``worker_timeout`` without workers."""
        try:
            return wait_any(self.client, futures, self.worker_timeout,
                            lambda: self.events.emit("no_workers", timeout_s=self.worker_timeout))
        except ConnectionError as e:
            raise RunError(f"{e}; committed tasks are kept, re-run to resume") from None
        except TimeoutError as e:
            for f in cancel_on_timeout:
                f.cancel()
            self.events.emit("no_workers_timeout", timeout_s=self.worker_timeout)
            raise RunError(f"{e}; the run stops here: committed tasks are kept, re-run to resume") from None

    # -- DAG ---------------------------------------------------------------------------------------
    def selected(self, until: str | Sequence[str] | None) -> list[ResolvedStage]:
        """The steps ``until`` (one step name or several) needs, itself included; every step when it is None."""
        if until is None or (not isinstance(until, str) and not until):
            return self.steps
        try:
            return needed_by(self.steps, [until] if isinstance(until, str) else list(until))
        except KeyError as e:
            raise RunError(f"--until {e.args[0]}: no such stage (have: {', '.join(s.name for s in self.steps)})") \
                from None

    def run(self, until: str | Sequence[str] | None = None, force: Sequence[str] = ()) -> list[StageResult]:
        names = {s.name for s in self.steps}
        for f in force:
            if f not in names:
                raise RunError(f"--force {f}: no such stage (have: {', '.join(sorted(names))})")
        selected = self.selected(until)
        for step in selected:  # fail on a missing source before any work starts
            step.stage().validate(step.params)
        with RunLock(self.out_dir), RunDisplay(self.show_progress) as display:
            self.display = display
            try:
                return self._run_locked(selected, set(force))
            finally:
                self.display = RunDisplay(enabled=False)

    def _run_locked(self, selected: list[ResolvedStage], forced: set[str]) -> list[StageResult]:
        """Run the selected steps as a DAG (``pipeline/dag.py``): up to ``parallel_stages`` at once, their tasks
        sharing the cluster; on a failure no new step starts, running ones finish."""
        results: dict[str, StageResult] = self.external_inputs()
        record: dict[str, Any] = {
            "manifest": self.manifest.model_dump(mode="json"), "manifest_path": self.where,
            "overrides": self.overrides, "order": [s.name for s in self.steps], "started": now_iso(),
            "code_version": code_version(), "stages": {},
        }
        forced = forced_closure(selected, forced)  # decided before anything runs
        self.events.emit("run_started", manifest=self.where, stages=[s.name for s in self.steps])
        if self._needs_cluster(selected, forced, results):
            self.client  # noqa: B018 - started here: its context must be entered and left in this thread

        def note(name: str, **info: Any) -> None:
            with self._record_lock:
                record["stages"][name] = {**record["stages"].get(name, {}), **info}
                write_json(self.out_dir / RUN_FILE, record)

        def one(step: ResolvedStage) -> StageResult:
            def started(path: Path, artifact_id: str) -> None:
                note(step.name, artifact_id=artifact_id, path=str(path), status="running")

            try:
                return self.run_stage(step, results, force=step.name in forced, on_start=started)
            except DistilleryError as e:
                self.events.emit("run_failed", stage=step.name, error=str(e))
                if step.name in record["stages"]:
                    note(step.name, status="failed")
                raise

        def finished(step: ResolvedStage, res: StageResult) -> None:
            note(step.name, artifact_id=res.artifact_id, path=str(res.path), status=res.status,
                 seconds=round(res.seconds, 3), counts=res.counts)

        run_dag(selected, results, one, self.parallel_stages, self._priority, finished)
        record["finished"] = now_iso()
        with self._record_lock:
            write_json(self.out_dir / RUN_FILE, record)
        self.events.emit("run_finished", stages={k: v.status for k, v in results.items()})
        return [results[s.name] for s in selected if s.name in results]

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

    def identify(self, step: ResolvedStage, results: dict[str, StageResult]) -> tuple[str, dict[str, str], str, str]:
        """(artifact id, input ids, source fingerprint, code fingerprint) of a step."""
        return self._identify(step, {k: r.artifact_id for k, r in results.items()})

    def _identify(self, step: ResolvedStage, ids: dict[str, str]) -> tuple[str, dict[str, str], str, str]:
        key = (step.name, tuple(sorted((k, ids[v]) for k, v in step.inputs.items())))
        if key not in self._identities:
            self._identities[key] = step_identity(step, ids)
        return self._identities[key]

    def _needs_cluster(self, selected: list[ResolvedStage], forced: set[str],
                       results: dict[str, StageResult]) -> bool:
        """Whether any selected step has work to do. Ids depend on inputs' ids, never on their outputs, so the
        whole DAG's ids are known before anything runs."""
        ids = {k: r.artifact_id for k, r in results.items()}
        for step in selected:
            ids[step.name] = self._identify(step, ids)[0]
            if step.name in forced or not Artifact(self.artifact_dir(step, ids[step.name])).is_complete():
                return True
        return False

    def run_stage(self, step: ResolvedStage, results: dict[str, StageResult], force: bool = False,
                  on_start: Callable[[Path, str], None] | None = None) -> StageResult:
        stage = step.stage()
        t0 = time.perf_counter()
        artifact_id, input_ids, fingerprint, code = self.identify(step, results)
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

        self.client  # noqa: B018 - the cluster must be up before anything is written for this stage
        inputs = {k: InputArtifact(results[v].path) for k, v in step.inputs.items()}
        created = not path.exists()
        path.mkdir(parents=True, exist_ok=True)
        if on_start is not None:
            on_start(path, artifact_id)
        self.events.emit("stage_started", stage=step.name, artifact=path.name)
        try:
            ordered, plan_s, run_s = self._run_phases(stage, step, inputs, path, code)
        except BaseException:
            if created and not art.committed_parts():
                shutil.rmtree(path, ignore_errors=True)  # failed before any work: leave no debris
            raise

        summary = finish_artifact(stage, step, path, inputs, ordered, (artifact_id, input_ids, fingerprint, code),
                                  {"plan_s": plan_s, "run_s": run_s}, self.cache_dir)
        self._link(step.name, path)
        seconds = time.perf_counter() - t0
        self.events.emit("stage_finished", stage=step.name, artifact=path.name, seconds=round(seconds, 2),
                         counts=summary.counts)
        return StageResult(step.name, stage.name, artifact_id, path, "ran", seconds, summary.counts)

    def _run_phases(self, stage: Stage[Any], step: ResolvedStage, inputs: dict[str, InputArtifact], path: Path,
                    code: str) -> tuple[list[PartRecord], float, float]:
        """Plan and run each phase in order; returns every part (phase order, then plan order) and timings."""
        art = Artifact(path)
        (path / FAILED_FILE).unlink(missing_ok=True)
        if art.tmp_dir.exists():  # leftovers of killed tasks
            shutil.rmtree(art.tmp_dir)
        committed = self._usable_parts(step, art, code)
        previous: dict[str, list[PartRecord]] = {}
        ordered: list[PartRecord] = []
        plan_s = run_s = 0.0
        earlier_ran = False
        for phase in stage.phases:
            plan_path = path / (PLAN_FILE if phase == MAIN_PHASE else f".plan.{phase}.json")
            if earlier_ran:  # an earlier phase changed: what this phase planned before no longer holds
                plan_path.unlink(missing_ok=True)
                for name in [n for n, r in committed.items() if r.phase == phase]:
                    (art.parts_dir / f"{name}.json").unlink(missing_ok=True)
                    committed.pop(name)
            tp = time.perf_counter()
            tasks = self._plan(stage, step, inputs, path, phase, previous, plan_path)
            plan_s += time.perf_counter() - tp
            pending = [t for t in tasks if part_name(phase, t.id) not in committed]
            if pending and len(pending) < len(tasks):
                self.events.emit("stage_resumed", stage=step.name, phase=phase, committed=len(tasks) - len(pending),
                                 pending=len(pending))
            tr = time.perf_counter()
            done = {t.id: committed[part_name(phase, t.id)] for t in tasks if part_name(phase, t.id) in committed}
            done.update(self._execute(stage, step, phase, tasks, pending, inputs, path, code))
            run_s += time.perf_counter() - tr
            previous[phase] = [done[t.id] for t in tasks]
            ordered.extend(previous[phase])
            earlier_ran = earlier_ran or bool(pending)
        return ordered, plan_s, run_s

    def _usable_parts(self, step: ResolvedStage, art: Artifact, code: str) -> dict[str, PartRecord]:
        """Committed parts, minus those written by other code or library versions (re-run, never mixed in)."""
        committed = art.committed_parts()
        stale, diff = stale_parts(committed, code)
        if stale:
            self.events.emit("parts_stale", stage=step.name, parts=sorted(stale), differs=diff)
            from pipeline.events import log

            log.warning("stage %s: %d committed task(s) were written by different %s; re-running them",
                        step.name, len(stale), " and ".join(diff))
            for name in stale:
                (art.parts_dir / f"{name}.json").unlink(missing_ok=True)
                committed.pop(name)
        return committed

    def _plan(self, stage: Stage[Any], step: ResolvedStage, inputs: dict[str, InputArtifact], path: Path,
              phase: str, previous: dict[str, list[PartRecord]], plan_path: Path) -> list[Task]:
        if plan_path.is_file():
            return load_plan(plan_path)
        ctx = PlanContext(out_dir=path, inputs=inputs, map=self._map, cache_dir=self.cache_dir, phase=phase,
                          previous=dict(previous))
        return save_plan(stage.plan(inputs, step.params, ctx), plan_path)

    def _resources(self, stage: Stage[Any], step: ResolvedStage) -> dict[str, float] | None:
        """The task resources to ask Dask for, checked against what the workers offer."""
        wanted = dict(step.spec.resources if step.spec.resources is not None else stage.resources)
        if not wanted:
            return None
        try:
            out, skipped = task_resources(wanted, worker_resources(self.client), step.name)
        except ClusterError as e:
            raise RunError(str(e)) from None
        if skipped:
            self.events.emit("resources_unavailable", stage=step.name, missing=skipped,
                             note="no worker offers a GPU: running on CPU workers")
        return out

    def _execute(self, stage: Stage[Any], step: ResolvedStage, phase: str, tasks: list[Task], pending: list[Task],
                 inputs: dict[str, InputArtifact], path: Path, code: str) -> dict[str, PartRecord]:
        if not pending:
            return {}
        client = self.client
        resources = self._resources(stage, step)
        key = f"{path.name}:{phase}"
        params = step.params.model_dump(mode="json")
        in_paths = {k: str(v.path) for k, v in inputs.items()}

        def submit(task: Task, attempt: int) -> Any:
            spec = TaskSpec(step.stage_cls, params, task, phase, str(path), in_paths, str(self.cache_dir), key)
            # unique per submission: Dask would hand back a cached result or error for a key it still holds
            # stages run concurrently: a task whose step feeds more steps goes first (the critical path: an embed
            # waiting behind a dozen validations would hold back everything downstream of it)
            return client.submit(execute_task, spec, key=f"{step.name}-{phase}-{task.id}-{uuid.uuid4().hex[:12]}",
                                 resources=resources, pure=False, priority=self._priority.get(step.name, 0))

        with contextlib.suppress(Exception):  # workers import the stage's code now, not inside the first task
            client.run(importlib.import_module, step.stage_cls.__module__)
        label = step.name if phase == MAIN_PHASE else f"{step.name}:{phase}"
        out: dict[str, PartRecord] = {}
        failures: dict[str, dict[str, Any]] = {}
        attempts = {t.id: 1 for t in pending}
        total = sum(t.size for t in tasks)
        with self.display.stage(label, len(tasks), total) as bar, self._progress_events(key, step.name, bar):
            bar.advance(len(tasks) - len(pending), total - sum(t.size for t in pending))
            running = {submit(t, 1): t for t in pending}
            while running:
                for fut in self._wait_any(list(running), list(running)):
                    task = running.pop(fut)
                    bar.task_done(task.id)
                    try:
                        rec = fut.result()
                    except Exception as e:  # noqa: BLE001 - classified and reported below
                        if is_transient(e) and attempts[task.id] <= self.retries:
                            attempts[task.id] += 1
                            self.events.emit("task_retry", stage=step.name, task=task.id, attempt=attempts[task.id],
                                             error=f"{type(e).__name__}: {e}")
                            running[submit(task, attempts[task.id])] = task
                            continue
                        failures[task.id] = _failure(task, phase, e, fut, attempts[task.id])
                        self.events.emit("task_failed", stage=step.name, task=task.id, error=failures[task.id]["error"],
                                         attempts=attempts[task.id])
                        continue
                    if rec.code and rec.code.get("fingerprint") != code:
                        failures[task.id] = code_mismatch(task, phase, attempts[task.id], rec.code, code)
                        (path / ".parts" / f"{part_name(phase, task.id)}.json").unlink(missing_ok=True)
                        continue
                    out[task.id] = rec
                    bar.advance(1, task.size)
        if failures:
            raise RunError(report_failures(step.name, path / FAILED_FILE, tasks, failures))
        return out

    @contextlib.contextmanager
    def _progress_events(self, key: str, stage_name: str, bar: StageProgress) -> Any:
        """Route the workers' progress reports for this stage phase to its display rows and events.jsonl."""
        self._progress_handlers[key] = progress_handler(
            bar, lambda **kw: self.events.emit("task_progress", stage=stage_name, **kw))
        try:
            yield
        finally:
            self._progress_handlers.pop(key, None)

    def _link(self, name: str, path: Path) -> None:
        """``<run>/<stage>`` -> the current artifact, switched atomically."""
        symlink(self.out_dir / name, path.name)
