"""The one stage contract. A stage never touches Dask; the runner does everything else.

    plan(inputs, params, ctx)      -> list[Task]   # driver: one task per shard / cluster / global step
    run(task, params, ctx)         -> dict         # worker: writes outputs through ctx.output(...)
    finalize(parts, params, ctx)   -> Summary      # driver: counts, metrics, tables, plots

The runner gives a stage artifact ids, caching, resume (committed tasks are skipped), atomic commit of each
task's files, retries, progress, cluster scheduling with the declared ``resources`` and ``manifest.json``.
"""
from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Generic, Sequence, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from pipeline.artifacts import PARTS_DIR, Artifact, ArtifactManifest, FileEntry, PartRecord
from pipeline.atomic import atomic_path, sha256_file
from pipeline.registry import Registry

R = TypeVar("R")
EXECUTION_ONLY = "execution_only"


class StageParams(BaseModel):
    """Base of every stage's ``Params``: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


P = TypeVar("P", bound=StageParams)


def execution_only(default: Any = None, **kw: Any) -> Any:
    """A parameter that changes how a stage runs (device, progress, plots), never what its outputs mean:
    it is recorded in the manifest but left out of the artifact id, so changing it reuses the cache."""
    extra = dict(kw.pop("json_schema_extra", None) or {})
    extra[EXECUTION_ONLY] = True
    return Field(default, json_schema_extra=extra, **kw)


def identity_params(params: StageParams) -> dict[str, Any]:
    """The parameters that enter the artifact id: everything except ``execution_only`` fields."""
    data = params.model_dump(mode="json")
    for name, info in type(params).model_fields.items():
        extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
        if extra.get(EXECUTION_ONLY):
            data.pop(name, None)
    return data


@dataclass(frozen=True)
class Task:
    """One unit of work: ``id`` is filesystem-safe and unique within the stage; ``payload`` is picklable."""

    id: str
    payload: Any = None
    size: int = 1  # samples (or another unit) the task covers, for progress


@dataclass
class Summary:
    """What ``finalize`` reports; the runner writes it into the manifest."""

    counts: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)  # written by finalize, relative to the artifact


class InputArtifact:
    """An upstream artifact as a stage sees it: its directory and manifest."""

    def __init__(self, path: Path) -> None:
        self.artifact = Artifact(path)
        self.path = path

    @property
    def manifest(self) -> ArtifactManifest:
        return self.artifact.manifest()


Mapper = Callable[[Callable[[Any], R], Sequence[Any]], list[R]]


def _serial_map(fn: Callable[[Any], R], items: Sequence[Any]) -> list[R]:
    return [fn(x) for x in items]


CHECKPOINT_DIR = ".ckpt"
MAIN_PHASE = "main"


def part_name(phase: str, task_id: str) -> str:
    """Name of a task's commit marker (``.parts/<name>.json``); phases other than the main one prefix it."""
    return task_id if phase == MAIN_PHASE else f"{phase}.{task_id}"
CACHE_ENV = "DISTILLERY_CACHE_DIR"


def default_cache_dir() -> Path:
    """Where derived, re-computable data (decoded image caches, fitted transforms) lives: never inside an
    artifact, which is immutable once committed. ``$DISTILLERY_CACHE_DIR``, else ``~/.cache/distillery``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else Path.home() / ".cache" / "distillery"


@dataclass
class PlanContext:
    """Driver-side context. ``map`` runs a pure function over items on the cluster (e.g. scan a source)."""

    out_dir: Path
    inputs: dict[str, InputArtifact]
    map: Mapper = _serial_map
    cache_dir: Path = field(default_factory=lambda: default_cache_dir())
    phase: str = MAIN_PHASE
    previous: dict[str, list[PartRecord]] = field(default_factory=dict)  # parts of the phases already run


ProgressFn = Callable[[str, int, int, dict[str, Any]], None]  # (task id, done, total, metrics)


class TaskContext:
    """Worker-side context: where to write, a per-worker object cache (models load once per worker), a checkpoint
    directory that survives a kill, the declared cache location and a progress reporter."""

    def __init__(self, out_dir: Path, inputs: dict[str, InputArtifact], cache: dict[str, Any] | None = None, *,
                 task_id: str = "task", cache_dir: Path | None = None, progress: ProgressFn | None = None,
                 phase: str = MAIN_PHASE):
        self.out_dir = out_dir
        self.inputs = inputs
        self.task_id = task_id
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        self._outputs: list[tuple[Path, Path]] = []
        self._cache = cache if cache is not None else {}
        self._progress = progress
        self.phase = phase
        self.tmp_dir = out_dir / ".tmp"

    @property
    def checkpoint_dir(self) -> Path:
        """``<artifact>/.ckpt/<task>/``: a long task saves its state here and resumes from it after a kill.
        The runner removes ``.ckpt`` once the artifact is complete."""
        path = self.out_dir / CHECKPOINT_DIR / self.task_id
        path.mkdir(parents=True, exist_ok=True)
        return path

    def progress(self, done: int, total: int, **metrics: Any) -> None:
        """Report progress inside a task (epochs, iterations, images): the driver's display and events.jsonl."""
        if self._progress is not None:
            self._progress(self.task_id, int(done), int(total), metrics)

    def output(self, relpath: str) -> Path:
        """A temporary path for ``relpath``; it is renamed into place when the task commits.

        Files commit in the order they were requested, so request the done-marker last.
        """
        final = self.out_dir / relpath
        final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"{uuid.uuid4().hex}-{final.name}"  # unique across hosts, processes, threads
        self._outputs.append((tmp, final))
        return tmp

    def cached(self, key: str, factory: Callable[[], R]) -> R:
        if key not in self._cache:
            self._cache[key] = factory()
        return self._cache[key]

    def commit(self, task_id: str, info: dict[str, Any], seconds: float,
               code: dict[str, Any] | None = None) -> PartRecord:
        files = []
        for tmp, final in self._outputs:
            if not tmp.exists():
                raise FileNotFoundError(f"task {task_id}: output {final.name} was requested but never written")
            files.append(
                FileEntry(path=str(final.relative_to(self.out_dir)), sha256=sha256_file(tmp), bytes=tmp.stat().st_size)
            )
        for tmp, final in self._outputs:
            os.replace(tmp, final)
        record = PartRecord(task=task_id, phase=self.phase, files=files, seconds=round(seconds, 4), info=info,
                            code=code or {})
        with atomic_path(self.out_dir / PARTS_DIR / f"{part_name(self.phase, task_id)}.json") as p:
            p.write_text(record.model_dump_json(indent=2))
        return record

    def discard(self) -> None:
        for tmp, _ in self._outputs:
            if tmp.exists():
                tmp.unlink()
        self._outputs.clear()


@dataclass
class FinalizeContext:
    out_dir: Path
    inputs: dict[str, InputArtifact]
    cache_dir: Path = field(default_factory=lambda: default_cache_dir())

    def path(self, relpath: str) -> Path:
        p = self.out_dir / relpath
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


class Stage(Generic[P]):
    """Base class of all stages. Subclasses set ``name``, ``version``, ``Params``, ``resources``, the kinds of
    artifact they read (``input_kinds``) and the kind they write (``output_kind``)."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Params: ClassVar[type[StageParams]] = StageParams
    resources: ClassVar[dict[str, float]] = {}
    # input name -> accepted artifact kinds (empty: any), in binding order; ``inputs:`` binds them to steps
    input_kinds: ClassVar[dict[str, tuple[str, ...]]] = {}
    optional_inputs: ClassVar[tuple[str, ...]] = ()  # the first input is required unless listed here
    output_kind: ClassVar[str] = ""
    # whether the pipeline manifest's top-level ``source:`` is injected as ``params.source``
    takes_source: ClassVar[bool] = False
    # A stage with several phases (fit on a sample, then assign every shard; write partitions keyed by a column,
    # then one task per key) plans each phase after the previous one has committed: ``ctx.phase`` names it in
    # plan and run, ``PlanContext.previous`` holds the earlier phases' parts, finalize gets every part.
    phases: ClassVar[tuple[str, ...]] = (MAIN_PHASE,)

    @classmethod
    def input_names(cls) -> tuple[str, ...]:
        return tuple(cls.input_kinds)

    @classmethod
    def required_inputs(cls) -> tuple[str, ...]:
        """Inputs a step must bind: the first one unless a stage says otherwise (``optional_inputs``)."""
        return tuple(n for n in cls.input_names()[:1] if n not in cls.optional_inputs)

    def validate(self, params: P) -> None:
        """Cheap checks of external inputs, run for every stage before any stage starts work."""

    def fingerprint(self, params: P) -> str:
        """Identity of external inputs (a source's files) folded into the artifact id."""
        return ""

    def identity(self, params: P) -> dict[str, Any]:
        """What else determines the outputs besides the parameters as written (e.g. the resolved contents of a
        recipe named in them); folded into the artifact id."""
        return {}

    def plan(self, inputs: dict[str, InputArtifact], params: P, ctx: PlanContext) -> list[Task]:
        raise NotImplementedError

    def run(self, task: Task, params: P, ctx: TaskContext) -> dict[str, Any]:
        raise NotImplementedError

    def finalize(self, parts: list[PartRecord], params: P, ctx: FinalizeContext) -> Summary:
        return Summary()


STAGES: Registry[type[Stage[Any]]] = Registry("stage", entry_point_group="distillery.stages",
                                              plugin_group="distillery.plugins")
