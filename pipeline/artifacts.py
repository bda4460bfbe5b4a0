"""Artifacts: immutable directories named by a content id, each with a ``manifest.json``.

An artifact directory holds the stage's files, ``.parts/<task>.json`` markers of committed tasks (so a
killed run resumes from the last finished task) and, once finalized, ``manifest.json``. The manifest is
written last: its presence with ``status == "complete"`` is what makes an artifact complete.
"""
from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pipeline.atomic import canonical_hash, write_json

MANIFEST = "manifest.json"
PARTS_DIR = ".parts"
TMP_DIR = ".tmp"
SCHEMA_VERSION = 2  # 2: artifacts declare their kind

# What an artifact is, for its consumers: they dispatch on the kind, never on the producing stage's name.
ARTIFACT_KINDS = ("shards", "embeddings", "clusters", "selection", "labels", "synthetic-set", "model", "experts",
                  "metrics")


class FileEntry(BaseModel):
    path: str = Field(description="path relative to the artifact directory")
    sha256: str
    bytes: int


class PartRecord(BaseModel):
    """What one committed task left behind."""

    model_config = ConfigDict(extra="allow")
    task: str
    phase: str = "main"
    files: list[FileEntry] = []
    seconds: float = 0.0
    info: dict[str, Any] = {}
    code: dict[str, Any] = Field(default_factory=dict, description="code fingerprint and library versions of "
                                                                   "the worker that wrote the part")


class ArtifactManifest(BaseModel):
    """The schema of every artifact's ``manifest.json`` (exported to manifests/schema/)."""

    model_config = ConfigDict(extra="allow")
    schema_version: int = SCHEMA_VERSION
    artifact_id: str = Field(description="sha256 of stage, version, params (execution-only ones excluded), "
                                         "input ids, source fingerprint and code fingerprint")
    stage: str = Field(description="registry name of the stage type")
    kind: str = Field("", description="what the artifact is: " + ", ".join(ARTIFACT_KINDS))
    name: str = Field(description="name of the stage in the pipeline manifest")
    stage_version: str
    status: Literal["complete"] = "complete"
    params: dict[str, Any]
    inputs: dict[str, str] = Field(default_factory=dict, description="input name -> artifact id")
    fingerprint: str = ""
    code_fingerprint: str = Field("", description="sha256 of the stage's code closure (in the artifact id)")
    code_version: str
    created: str
    counts: dict[str, Any] = Field(default_factory=dict)
    parts: list[PartRecord] = Field(default_factory=list)
    files: list[FileEntry] = Field(default_factory=list, description="files written by finalize")
    timings: dict[str, float] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)


def compute_artifact_id(
    stage: str, version: str, params: dict[str, Any], inputs: dict[str, str], fingerprint: str = "", code: str = ""
) -> str:
    return canonical_hash({"stage": stage, "version": version, "params": params, "inputs": inputs,
                           "fingerprint": fingerprint, "code": code})


def step_identity(step: Any, ids: dict[str, str]) -> tuple[str, dict[str, str], str, str]:
    """(artifact id, input ids, source fingerprint, code fingerprint) of a resolved step whose inputs have the
    artifact ids ``ids`` (by step name or path): its stage name and version, parameters (``execution_only`` ones
    excluded), what ``Stage.identity`` adds, the input ids, the source fingerprint and the stage's code."""
    from pipeline.fingerprint import code_fingerprint
    from pipeline.stage import identity_params

    stage = step.stage()
    input_ids = {k: ids[v] for k, v in step.inputs.items()}
    params = identity_params(step.params)
    extra = stage.identity(step.params)
    if extra:
        params = {**params, "__identity__": extra}
    fp = stage.fingerprint(step.params)
    code = code_fingerprint(step.stage_cls.__module__)
    return compute_artifact_id(stage.name, stage.version, params, input_ids, fp, code), input_ids, fp, code


@lru_cache(maxsize=1)
def code_version() -> str:
    """``git describe`` of the source tree when it is a checkout, else the installed package version."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=here, capture_output=True, text=True, timeout=5,
        )
        if out.returncode == 0 and out.stdout.strip():
            return f"git:{out.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return f"distillery=={version('distillery')}"
    except Exception:  # noqa: BLE001 - not installed: still traceable by hash
        return "unknown"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Artifact:
    """A handle on an artifact directory (complete or not)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def parts_dir(self) -> Path:
        return self.path / PARTS_DIR

    @property
    def tmp_dir(self) -> Path:
        return self.path / TMP_DIR

    def is_complete(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> ArtifactManifest:
        try:
            return ArtifactManifest.model_validate_json(self.manifest_path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: not a complete artifact (no {MANIFEST})") from None

    def committed_parts(self) -> dict[str, PartRecord]:
        out: dict[str, PartRecord] = {}
        if self.parts_dir.is_dir():
            for p in self.parts_dir.glob("*.json"):
                out[p.stem] = PartRecord.model_validate_json(p.read_text())
        return out

    def write_manifest(self, manifest: ArtifactManifest) -> None:
        write_json(self.manifest_path, manifest.model_dump(mode="json", by_alias=True))

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r})"


def read_manifest(path: str | os.PathLike[str]) -> ArtifactManifest:
    p = Path(path)
    return Artifact(p.parent if p.name == MANIFEST else p).manifest()


def manifest_json_schema() -> dict[str, Any]:
    return ArtifactManifest.model_json_schema()


def load_json(path: str | os.PathLike[str]) -> Any:
    with open(path) as f:
        return json.load(f)
