"""The one stage contract. A stage never touches Dask; the runner does everything else.

    plan(inputs, params, ctx)      -> list[Task]   # driver: one task per shard / cluster / global step
    run(task, params, ctx)         -> dict         # worker: writes outputs through ctx.output(...)
    finalize(parts, params, ctx)   -> Summary      # driver: counts, metrics, tables, plots

The runner gives a stage artifact ids, caching, resume (committed tasks are skipped), atomic commit of each
task's files, retries, progress, cluster scheduling with the declared ``resources`` and ``manifest.json``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Sequence, TypeVar

from pydantic import BaseModel, ConfigDict

from pipeline.artifacts import Artifact, ArtifactManifest, FileEntry, PartRecord
from pipeline.atomic import atomic_path, sha256_file
from pipeline.registry import Registry

R = TypeVar("R")


class StageParams(BaseModel):
    """Base of every stage's ``Params``: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid")


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


@dataclass
class PlanContext:
    """Driver-side context. ``map`` runs a pure function over items on the cluster (e.g. scan a source)."""

    out_dir: Path
    inputs: dict[str, InputArtifact]
    map: Mapper = _serial_map


class TaskContext:
    """Worker-side context: where to write, and a per-worker object cache (models load once per worker)."""

    def __init__(self, out_dir: Path, inputs: dict[str, InputArtifact], cache: dict[str, Any] | None = None):
        self.out_dir = out_dir
        self.inputs = inputs
        self._outputs: list[tuple[Path, Path]] = []
        self._cache = cache if cache is not None else {}
        self.tmp_dir = out_dir / ".tmp"

    def output(self, relpath: str) -> Path:
        """A temporary path for ``relpath``; it is renamed into place when the task commits.

        Files commit in the order they were requested, so request the done-marker last.
        """
        final = self.out_dir / relpath
        final.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"{os.getpid()}-{len(self._outputs)}-{final.name}"
        self._outputs.append((tmp, final))
        return tmp

    def cached(self, key: str, factory: Callable[[], R]) -> R:
        if key not in self._cache:
            self._cache[key] = factory()
        return self._cache[key]

    def commit(self, task_id: str, info: dict[str, Any], seconds: float) -> PartRecord:
        files = []
        for tmp, final in self._outputs:
            if not tmp.exists():
                raise FileNotFoundError(f"task {task_id}: output {final.name} was requested but never written")
            files.append(
                FileEntry(path=str(final.relative_to(self.out_dir)), sha256=sha256_file(tmp), bytes=tmp.stat().st_size)
            )
        for tmp, final in self._outputs:
            os.replace(tmp, final)
        record = PartRecord(task=task_id, files=files, seconds=round(seconds, 4), info=info)
        with atomic_path(self.out_dir / ".parts" / f"{task_id}.json") as p:
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

    def path(self, relpath: str) -> Path:
        p = self.out_dir / relpath
        p.parent.mkdir(parents=True, exist_ok=True)
        return p


class Stage:
    """Base class of all stages. Subclasses set ``name``, ``version``, ``Params`` and ``resources``."""

    name: ClassVar[str]
    version: ClassVar[str] = "1"
    Params: ClassVar[type[StageParams]] = StageParams
    resources: ClassVar[dict[str, float]] = {}
    # names of inputs the stage needs, in order; the manifest's ``inputs:`` binds them to stages
    input_names: ClassVar[tuple[str, ...]] = ()
    # whether the pipeline manifest's top-level ``source:`` is injected as ``params.source``
    takes_source: ClassVar[bool] = False

    def validate(self, params: StageParams) -> None:
        """Cheap checks of external inputs, run for every stage before any stage starts work."""

    def fingerprint(self, params: StageParams) -> str:
        """Identity of external inputs (a source's files) folded into the artifact id."""
        return ""

    def plan(self, inputs: dict[str, InputArtifact], params: StageParams, ctx: PlanContext) -> list[Task]:
        raise NotImplementedError

    def run(self, task: Task, params: StageParams, ctx: TaskContext) -> dict[str, Any]:
        raise NotImplementedError

    def finalize(self, parts: list[PartRecord], params: StageParams, ctx: FinalizeContext) -> Summary:
        return Summary()


STAGES: Registry[type[Stage]] = Registry("stage", entry_point_group="distillery.stages")
