"""The pool: the shards artifact whose rows every derived artifact (embeddings, clusters, selections, labels)
talks about. Derived artifacts record it in ``metrics["pool"]`` so images can always be found again."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import InputError


def _manifest(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / "manifest.json").read_text())
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: not a complete artifact ({e})") from None


def pool_record(artifact: Path) -> dict[str, str]:
    """``{"artifact_id", "path"}`` of the pool behind ``artifact`` (itself when it is a shards artifact)."""
    pool = find_pool(artifact)
    return {"artifact_id": _manifest(pool)["artifact_id"], "path": str(pool.resolve())}


def find_pool(artifact: Path) -> Path:
    """The shards artifact behind ``artifact``; checks that the recorded path still holds that artifact."""
    m = _manifest(artifact)
    if m.get("kind") == "shards":
        return artifact
    rec = (m.get("metrics") or {}).get("pool")
    if not rec:
        raise InputError(f"{artifact}: a '{m.get('kind')}' artifact that records no pool (metrics.pool)")
    path = Path(rec["path"])
    if not (path / "manifest.json").is_file() or _manifest(path).get("artifact_id") != rec["artifact_id"]:
        raise InputError(f"{artifact}: its pool {rec['artifact_id'][:12]} is no longer at {path}; pass the shards "
                         "artifact explicitly (input 'shards')")
    return path
