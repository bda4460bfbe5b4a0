"""Distillation checkpoints: everything an interrupted run needs to continue to the same synthetic set.

One file per run, named by a hash of the run's identity *and the library versions* (a checkpoint written by another
torch may replay differently, so it is never silently reused), inside the task's phase-qualified checkpoint
directory. Holds the iteration, the method state (images, learned lr, optimiser states, the method's generator),
torch's global CPU and CUDA generator states and the history so far. Written atomically.
"""
from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import torch

from pipeline.atomic import atomic_path

CHECKPOINT_FORMAT = "distillery.distill-checkpoint.v1"


def library_versions() -> dict[str, str]:
    return {"torch": torch.__version__, "python": platform.python_version()}


def checkpoint_path(directory: str | Path, identity: dict[str, Any]) -> Path:
    key = json.dumps({"identity": identity, "versions": library_versions(), "format": CHECKPOINT_FORMAT},
                     sort_keys=True, default=str)
    return Path(directory) / f"distill-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def save_checkpoint(path: Path, iteration: int, state: dict[str, Any], history: dict[str, Any]) -> None:
    payload = {"format": CHECKPOINT_FORMAT, "iteration": iteration, "state": state, "history": history,
               "cpu_rng": torch.get_rng_state(),
               "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint at ``path`` (global generators restored), or None when there is none."""
    if not path.is_file():
        return None
    d = torch.load(path, map_location="cpu", weights_only=True)
    if d.get("format") != CHECKPOINT_FORMAT:
        return None
    torch.set_rng_state(d["cpu_rng"])
    if d["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(d["cuda_rng"])
    return d
