"""What runs on a worker: one task of a stage (``execute_task``), its per-worker model cache and throttled progress,
and how the driver reads a task's outcome (transient or not, the failure record, code that differs)."""
from __future__ import annotations

import contextlib
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.artifacts import PartRecord
from pipeline.fingerprint import code_fingerprint, library_versions
from pipeline.stage import InputArtifact, Task, TaskContext, part_name

PROGRESS_TOPIC = "distillery-progress"


@dataclass(frozen=True)
class TaskSpec:
    """Everything a worker needs to run one task; small and picklable."""

    stage_cls: type  # pickled by reference: workers import the stage's module
    params: dict[str, Any]
    task: Task
    phase: str
    out_dir: str
    inputs: dict[str, str]
    cache_dir: str
    progress_key: str  # tags this stage's progress events


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


def _progress_reporter(key: str, min_interval: float = 0.5) -> Callable[[str, int, int, dict[str, Any]], None] | None:
    """On a Dask worker: publish ``ctx.progress`` to the driver (throttled); elsewhere: nothing to report to."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return None
    last = [0.0]

    def report(task_id: str, done: int, total: int, metrics: dict[str, Any]) -> None:
        now = time.monotonic()
        if done < total and now - last[0] < min_interval:
            return
        last[0] = now
        worker.log_event(PROGRESS_TOPIC, {"key": key, "task": task_id, "done": done, "total": total,
                                          "metrics": metrics})

    return report


def task_code(stage_cls: type) -> dict[str, Any]:
    return {"fingerprint": code_fingerprint(stage_cls.__module__), "libraries": library_versions()}


def execute_task(spec: TaskSpec) -> PartRecord:
    """Worker entry point: run one task unless it is already committed, then commit it atomically."""
    out_dir = Path(spec.out_dir)
    marker = out_dir / ".parts" / f"{part_name(spec.phase, spec.task.id)}.json"
    if marker.is_file():
        return PartRecord.model_validate_json(marker.read_text())
    stage = spec.stage_cls()
    params = stage.Params.model_validate(spec.params)
    inputs = {k: InputArtifact(Path(v)) for k, v in spec.inputs.items()}
    ctx = TaskContext(out_dir, inputs, cache=_worker_cache(), task_id=spec.task.id, cache_dir=Path(spec.cache_dir),
                      progress=_progress_reporter(spec.progress_key), phase=spec.phase)
    t0 = time.perf_counter()
    try:
        info = stage.run(spec.task, params, ctx) or {}
    except BaseException:
        ctx.discard()
        raise
    return ctx.commit(spec.task.id, info, time.perf_counter() - t0, code=task_code(spec.stage_cls))


def is_transient(err: BaseException) -> bool:
    """Worth retrying: infrastructure trouble (lost workers, I/O, timeouts), not a bug or a bad input."""
    try:
        from distributed.comm.core import CommClosedError
        from distributed.scheduler import KilledWorker

        infra: tuple[type[BaseException], ...] = (KilledWorker, CommClosedError)
    except ImportError:  # pragma: no cover
        infra = ()
    return isinstance(err, (OSError, TimeoutError, ConnectionError, *infra))


def _failure(task: Task, phase: str, err: BaseException, fut: Any, attempts: int) -> dict[str, Any]:
    tb = ""
    with contextlib.suppress(Exception):
        tb = "".join(traceback.format_tb(fut.traceback()))
    return {"task": task.id, "phase": phase, "attempts": attempts, "error": f"{type(err).__name__}: {err}",
            "traceback": tb}


def _differences(part_code: dict[str, Any], code: str, libs: dict[str, str]) -> list[str]:
    out = []
    if part_code.get("fingerprint") != code:
        out.append("code")
    theirs = part_code.get("libraries") or {}
    out.extend(f"{k} ({theirs.get(k)} -> {libs.get(k)})" for k in sorted(libs.keys() | theirs.keys())
               if theirs.get(k) != libs.get(k))
    return out


def _json_line(obj: dict[str, Any]) -> str:
    import json

    return json.dumps(obj, sort_keys=True, default=str) + "\n"


def stale_parts(committed: dict[str, PartRecord], code: str) -> tuple[dict[str, PartRecord], list[str]]:
    """(the committed parts written by other stage code or library versions, what differs): they are re-run,
    never mixed into an artifact with parts from this code."""
    libs = library_versions()
    stale = {n: r for n, r in committed.items()
             if r.code and (r.code.get("fingerprint") != code or r.code.get("libraries") != libs)}
    return stale, sorted({k for r in stale.values() for k in _differences(r.code, code, libs)})


def code_mismatch(task: Task, phase: str, attempts: int, part_code: dict[str, Any], code: str) -> dict[str, Any]:
    """The failure record of a task whose worker ran other code for the stage than the driver planned with."""
    return {"task": task.id, "phase": phase, "attempts": attempts,
            "error": f"worker ran different code for this stage (code fingerprint "
                     f"{part_code.get('fingerprint', '')[:12]}, driver {code[:12]}): update the workers' installation"}


def report_failures(step: str, failed_file: Path, tasks: list[Task], failures: dict[str, dict[str, Any]]) -> str:
    """Write ``failures`` (in plan order) to ``failed_file`` as JSON lines; the one-paragraph error for the run."""
    from pipeline.atomic import write_text

    order = {t.id: i for i, t in enumerate(tasks)}
    failures = dict(sorted(failures.items(), key=lambda kv: order[kv[0]]))
    write_text(failed_file, "".join(_json_line(f) for f in failures.values()))
    listed = "; ".join(f"{tid}: {f['error']}" for tid, f in list(failures.items())[:5])
    more = f" (and {len(failures) - 5} more)" if len(failures) > 5 else ""
    return (f"stage {step}: {len(failures)} of {len(tasks)} tasks failed: {listed}{more}. The other tasks are "
            f"committed; details in {failed_file}; re-run to retry only the failed ones")
