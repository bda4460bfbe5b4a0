"""Structured run events: one JSON object per line in ``<run_dir>/events.jsonl``, mirrored to logging.

Events arrive from the driver's thread and from the Dask client's event-loop thread (task progress), so writes
are serialised. The file is created on the first event, not before: a run that fails before doing anything
leaves no empty directory behind.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("distillery")


class EventLog:
    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()

    def emit(self, event: str, level: int = logging.INFO, **fields: Any) -> None:
        record = {"ts": round(time.time(), 3), "event": event, **fields}
        if self.path is not None:
            line = json.dumps(record, default=str) + "\n"
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as f:
                    f.write(line)
        log.log(level, "%s %s", event, " ".join(f"{k}={v}" for k, v in fields.items()))
