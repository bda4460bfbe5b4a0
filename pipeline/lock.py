"""One driver per run directory: an exclusive ``flock`` on ``<run>/.lock``, released when the driver exits or dies.

A second driver on the same directory would plan the same tasks and race on the same files; it gets a clear error
naming the holder instead. The kernel drops the lock when the holding process dies (even ``kill -9``), so a stale
lock never needs cleaning by hand.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from pipeline.errors import DistilleryError

LOCK_FILE = ".lock"


class LockedError(DistilleryError):
    pass


class RunLock:
    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}" if holder
                   else "another process")
            raise LockedError(f"{self.path.parent}: run directory is in use by another distillery driver ({who}); "
                              "wait for it to finish or use another output_dir") from None
        from pipeline.artifacts import now_iso

        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso()}).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _read_holder(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}
