"""Pipeline manifests: YAML files that define a run, validated by pydantic.

Errors name the file and the field (``manifests/x.yaml: stages[shard].params.samples_per_shard: ...``),
and every stage's parameters are validated against its ``Params`` model before any work starts.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import DistilleryError
from pipeline.stage import STAGES, Stage, StageParams


class ManifestError(DistilleryError, ValueError):
    """A pipeline manifest (or an override) is invalid; the message names the file and the field."""


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="unique name of this step; also the artifact's directory prefix")
    stage: str | None = Field(None, description="stage type in the registry (default: name)")
    inputs: dict[str, str] | list[str] | None = Field(
        None, description="input name -> upstream step or an existing artifact directory; a list binds in the "
                          "stage's input order; default: previous step"
    )
    params: dict[str, Any] = Field(default_factory=dict)
    resources: dict[str, float] | None = Field(
        None, description="per-task resources, replacing the stage's own (e.g. {GPU: 0.25} for a small model; "
                          "memory in bytes is checked against the workers' limits)")

    @property
    def stage_type(self) -> str:
        return self.stage or self.name


class ClusterSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    profile: str = Field("local", description="profile in dask_config.yaml: local, address, slurm, local-gpu, ...")
    config: Path | None = Field(None, description="dask_config.yaml to read profiles from")
    options: dict[str, Any] = Field(default_factory=dict, description="overrides of the profile's settings")


class PipelineManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    source: dict[str, Any] | None = Field(None, description="raw data source; 'kind' picks the adapter")
    output_dir: Path
    cache_dir: Path | None = Field(None, description="derived, re-computable data (decoded images); default "
                                                     "$DISTILLERY_CACHE_DIR or ~/.cache/distillery")
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    parallel_stages: int = Field(4, ge=1, description="independent stages that may run at once (their tasks "
                                                       "share the cluster)")
    stages: list[StageSpec]

    @field_validator("stages")
    @classmethod
    def _unique_names(cls, v: list[StageSpec]) -> list[StageSpec]:
        seen: set[str] = set()
        for s in v:
            if s.name in seen:
                raise ValueError(f"stage name '{s.name}' appears twice")
            seen.add(s.name)
        if not v:
            raise ValueError("a pipeline needs at least one stage")
        return v


class ResolvedStage(BaseModel):
    """A step with its stage class, validated params and bound inputs (input name -> step name)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    spec: StageSpec
    stage_cls: Any
    params: Any
    inputs: dict[str, str]

    @property
    def name(self) -> str:
        return self.spec.name

    def stage(self) -> Stage:
        return self.stage_cls()


def _fmt_loc(loc: tuple[Any, ...], stage_names: list[str]) -> str:
    parts: list[str] = []
    for i, item in enumerate(loc):
        if isinstance(item, int):
            if parts and parts[-1] == "stages" and item < len(stage_names):
                parts[-1] = f"stages[{stage_names[item]}]"
            else:
                parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
        else:
            parts.append(str(item))
    return ".".join(parts)


def _format_error(e: Any, where: str, prefix: str, stage_names: list[str]) -> str:
    loc = _fmt_loc(tuple(e["loc"]), stage_names)
    loc = f"{prefix}.{loc}" if prefix and loc else (prefix or loc)
    got = e.get("input")
    got_s = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
    return f"{where}: {loc}: {e['msg']}{got_s}"


def format_validation_error(err: ValidationError, where: str, prefix: str = "", stage_names: list[str] | None = None) -> str:
    return "\n".join(_format_error(e, where, prefix, stage_names or []) for e in err.errors())


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ManifestError(f"override '{text}' is not of the form key=value")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ManifestError(f"override {key.strip()}: value {value!r} is not valid YAML ({problem})") from None
    return key.strip().split("."), parsed


def apply_overrides(raw: dict[str, Any], overrides: list[str], where: str) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides. ``stages.<name>.<key>`` addresses a step's params
    (``stages.<name>.inputs`` / ``.stage`` address the step itself)."""
    for text in overrides:
        path, value = parse_override(text)
        node: Any = raw
        if path[0] == "stages" and len(path) >= 3:
            steps = {s.get("name"): s for s in raw.get("stages", []) if isinstance(s, dict)}
            if path[1] not in steps:
                raise ManifestError(f"{where}: override '{text}': no stage named '{path[1]}' (have: {', '.join(steps)})")
            node = steps[path[1]]
            path = path[2:] if path[2] in ("inputs", "stage", "params") else ["params", *path[2:]]
        for key in path[:-1]:
            if not isinstance(node, dict):
                raise ManifestError(f"{where}: override '{text}': '{key}' is not a mapping")
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return raw


def load_manifest(path: str | os.PathLike[str], overrides: list[str] | None = None) -> PipelineManifest:
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: pipeline manifest not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ManifestError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ManifestError(f"{path}: a pipeline manifest is a mapping with name, output_dir, stages")
    raw = apply_overrides(raw, overrides or [], str(path))
    names = [s.get("name", "?") for s in raw.get("stages", []) if isinstance(s, dict)]
    try:
        return PipelineManifest.model_validate(raw)
    except ValidationError as e:
        raise ManifestError(format_validation_error(e, str(path), stage_names=names)) from None


def resolve(manifest: PipelineManifest, where: str = "<manifest>") -> list[ResolvedStage]:
    """Look up every step's stage type, validate its params and bind its inputs."""
    resolved: list[ResolvedStage] = []
    known: set[str] = set()
    for i, spec in enumerate(manifest.stages):
        try:
            cls = STAGES.get(spec.stage_type)
        except KeyError as e:
            raise ManifestError(f"{where}: stages[{spec.name}].stage: {e}") from None
        raw_params = dict(spec.params)
        injected = cls.takes_source and "source" not in raw_params
        if injected:
            if manifest.source is None:
                raise ManifestError(f"{where}: stages[{spec.name}]: stage '{cls.name}' needs a top-level 'source:'")
            raw_params["source"] = manifest.source
        try:
            params: StageParams = cls.Params.model_validate(raw_params)
        except ValidationError as e:
            lines = []
            for one in e.errors():  # the top-level source is reported where the user wrote it: ``source.path``
                from_source = injected and one["loc"][:1] == ("source",)
                lines.append(_format_error(one, where, "" if from_source else f"stages[{spec.name}].params", []))
            raise ManifestError("\n".join(lines)) from None
        inputs = _bind_inputs(spec, cls, resolved, where)
        for key, up in inputs.items():
            if up in known:
                kind = next(r.stage_cls.output_kind for r in resolved if r.name == up)
            elif (Path(up) / "manifest.json").is_file():  # an existing artifact directory
                inputs[key] = str(Path(up).resolve())
                kind = _artifact_kind(Path(up), f"{where}: stages[{spec.name}].inputs.{key}")
            else:
                raise ManifestError(f"{where}: stages[{spec.name}].inputs.{key}: '{up}' is neither an earlier stage "
                                    "nor a complete artifact directory")
            accepted = cls.input_kinds.get(key, ())
            if accepted and kind not in accepted:
                raise ManifestError(f"{where}: stages[{spec.name}].inputs.{key}: '{up}' is a '{kind}' artifact; "
                                    f"stage '{cls.name}' takes {' or '.join(repr(k) for k in accepted)} there")
        known.add(spec.name)
        resolved.append(ResolvedStage(spec=spec, stage_cls=cls, params=params, inputs=inputs))
    return resolved


def _artifact_kind(path: Path, where: str) -> str:
    import json

    try:
        kind = json.loads((path / "manifest.json").read_text()).get("kind", "")
    except (OSError, ValueError) as e:
        raise ManifestError(f"{where}: {path}/manifest.json is unreadable ({e})") from None
    if not kind:
        raise ManifestError(f"{where}: {path} was made by an older version of distillery (its manifest declares no "
                            "kind): re-run the stage that made it")
    return str(kind)


def _bind_inputs(spec: StageSpec, cls: type[Stage[Any]], earlier: list[ResolvedStage], where: str) -> dict[str, str]:
    names = list(cls.input_names())
    if spec.inputs is None:
        if not names or (not earlier and not cls.required_inputs()):
            return {}
        if not earlier:
            raise ManifestError(f"{where}: stages[{spec.name}]: stage '{cls.name}' needs inputs {names}")
        return {names[0]: earlier[-1].name}
    if isinstance(spec.inputs, list):
        if len(spec.inputs) > len(names):
            raise ManifestError(f"{where}: stages[{spec.name}].inputs: '{cls.name}' takes {names}")
        bound = dict(zip(names, spec.inputs))
    else:
        unknown = set(spec.inputs) - set(names)
        if unknown:
            raise ManifestError(f"{where}: stages[{spec.name}].inputs: unknown {sorted(unknown)}; '{cls.name}' "
                                f"takes {names}")
        bound = dict(spec.inputs)
    missing = [n for n in cls.required_inputs() if n not in bound]
    if missing:
        raise ManifestError(f"{where}: stages[{spec.name}].inputs: '{cls.name}' needs {missing} (takes {names})")
    return bound
