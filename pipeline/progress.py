"""Progress of a stage across the cluster (rich): one bar for its tasks, one line per running task that reports
progress from inside (``ctx.progress``: epochs, iterations, images). Silent when disabled."""
from __future__ import annotations

import sys
import threading
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn


def format_metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


class StageProgress:
    def __init__(self, name: str, n_tasks: int, n_items: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self.name = name
        self.n_tasks = n_tasks
        self.n_items = n_items
        self.items_done = 0
        self._rows: dict[str, TaskID] = {}
        self._lock = threading.Lock()  # task progress arrives on the client's event-loop thread

    def __enter__(self) -> "StageProgress":
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[items]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=Console(file=sys.stderr), transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.name, total=self.n_tasks, items=f"tasks · 0/{self.n_items} items")
        return self

    def advance(self, tasks: int, items: int) -> None:
        with self._lock:
            self.items_done += items
            if self._progress is not None:
                self._progress.update(self._task, advance=tasks, items=f"tasks · {self.items_done}/{self.n_items} items")

    def task_progress(self, task_id: str, done: int, total: int, metrics: dict[str, Any]) -> None:
        with self._lock:
            if self._progress is None:
                return
            row = self._rows.get(task_id)
            if row is None:
                row = self._rows[task_id] = self._progress.add_task(f"  {task_id}", total=total, items="")
            self._progress.update(row, completed=done, total=total, items=format_metrics(metrics))

    def task_done(self, task_id: str) -> None:
        with self._lock:
            row = self._rows.pop(task_id, None)
            if row is not None and self._progress is not None:
                self._progress.remove_task(row)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            for row in self._rows.values():
                self._progress.remove_task(row)
            self._progress.__exit__(*exc)
