"""Finishing an artifact once every task of every phase has committed: the stage's ``finalize``, the hashes of the
files it wrote, ``manifest.json`` (written last: its presence marks the artifact complete) and the scratch
directories removed."""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from pipeline.artifacts import Artifact, ArtifactManifest, FileEntry, PartRecord, code_version, now_iso
from pipeline.atomic import sha256_file
from pipeline.stage import CHECKPOINT_DIR, FinalizeContext, InputArtifact, Stage, Summary


def finish_artifact(stage: Stage[Any], step: Any, path: Path, inputs: dict[str, InputArtifact],
                    parts: list[PartRecord], identity: tuple[str, dict[str, str], str, str],
                    timings: dict[str, float], cache_dir: Path) -> Summary:
    """Finalize ``step`` (a resolved step) into the complete artifact at ``path``; ``identity`` is its
    (artifact id, input ids, source fingerprint, code fingerprint); ``timings`` gains ``finalize_s`` and
    ``task_s_sum``."""
    artifact_id, input_ids, fingerprint, code = identity
    t0 = time.perf_counter()
    summary = stage.finalize(parts, step.params, FinalizeContext(out_dir=path, inputs=inputs, cache_dir=cache_dir))
    files = [FileEntry(path=f, sha256=sha256_file(path / f), bytes=(path / f).stat().st_size) for f in summary.files]
    timings = {**{k: round(v, 3) for k, v in timings.items()}, "finalize_s": round(time.perf_counter() - t0, 3),
               "task_s_sum": round(sum(p.seconds for p in parts), 3)}
    manifest = ArtifactManifest(
        artifact_id=artifact_id, stage=stage.name, kind=stage.output_kind, name=step.name,
        stage_version=stage.version, params=step.params.model_dump(mode="json"), inputs=input_ids,
        fingerprint=fingerprint, code_fingerprint=code, code_version=code_version(), created=now_iso(),
        counts=summary.counts, parts=parts, files=files, timings=timings, metrics=summary.metrics)
    art = Artifact(path)
    for scratch in (art.tmp_dir, path / CHECKPOINT_DIR):
        if scratch.exists():
            shutil.rmtree(scratch)
    art.write_manifest(manifest)
    return summary
