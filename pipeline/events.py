"""Structured run events: one JSON object per line in ``<run_dir>/events.jsonl``, mirrored to logging."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("distillery")


class EventLog:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        record = {"ts": round(time.time(), 3), "event": event, **fields}
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, default=str) + "\n")
        log.log(level, "%s %s", event, " ".join(f"{k}={v}" for k, v in fields.items()))
