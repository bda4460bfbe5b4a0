"""Progress of a run (rich): one display for the whole run, one bar per running stage phase, one row per running
task that reports progress from inside (``ctx.progress``: epochs, iterations, images). Independent stages run
at the same time, so rows come and go from several threads. Silent when disabled."""
from __future__ import annotations

import sys
import threading
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn


def format_metrics(metrics: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


class RunDisplay:
    """The run's one live display (rich allows one at a time); stage bars and task rows attach to it."""

    def __init__(self, enabled: bool = True) -> None:
        self.lock = threading.Lock()
        self.progress: Progress | None = None
        if enabled:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("{task.fields[items]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=Console(file=sys.stderr), transient=False,
            )

    def __enter__(self) -> "RunDisplay":
        if self.progress is not None:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def stage(self, name: str, n_tasks: int, n_items: int) -> "StageProgress":
        return StageProgress(self, name, n_tasks, n_items)


class StageProgress:
    """One stage phase: a bar over its tasks (and items), plus transient rows for tasks reporting progress."""

    def __init__(self, display: RunDisplay, name: str, n_tasks: int, n_items: int) -> None:
        self.display = display
        self.name = name
        self.n_tasks = n_tasks
        self.n_items = n_items
        self.items_done = 0
        self._rows: dict[str, TaskID] = {}
        self._bar: TaskID | None = None

    def __enter__(self) -> "StageProgress":
        p = self.display.progress
        if p is not None:
            with self.display.lock:
                self._bar = p.add_task(self.name, total=self.n_tasks, items=f"tasks · 0/{self.n_items} items")
        return self

    def advance(self, tasks: int, items: int) -> None:
        p = self.display.progress
        with self.display.lock:
            self.items_done += items
            if p is not None and self._bar is not None:
                p.update(self._bar, advance=tasks, items=f"tasks · {self.items_done}/{self.n_items} items")

    def task_progress(self, task_id: str, done: int, total: int, metrics: dict[str, Any]) -> None:
        p = self.display.progress
        if p is None:
            return
        with self.display.lock:
            row = self._rows.get(task_id)
            if row is None:
                row = self._rows[task_id] = p.add_task(f"  {self.name} {task_id}", total=total, items="")
            p.update(row, completed=done, total=total, items=format_metrics(metrics))

    def task_done(self, task_id: str) -> None:
        p = self.display.progress
        with self.display.lock:
            row = self._rows.pop(task_id, None)
            if row is not None and p is not None:
                p.remove_task(row)

    def __exit__(self, *exc: Any) -> None:
        p = self.display.progress
        if p is not None:
            with self.display.lock:
                for row in self._rows.values():
                    p.remove_task(row)
                self._rows.clear()


def progress_handler(bar: StageProgress, emit: Any, every_s: float = 5.0) -> Any:
    """A handler for the workers' ``ctx.progress`` reports of one stage phase: every report to its display row,
    one per task every ``every_s`` seconds (and the last) to ``emit(task=, done=, total=, metrics=)``."""
    import time

    last: dict[str, float] = {}

    def handler(msg: dict[str, Any]) -> None:
        task, done, total = msg["task"], msg["done"], msg["total"]
        bar.task_progress(task, done, total, msg.get("metrics") or {})
        now = time.monotonic()
        if done >= total or now - last.get(task, 0.0) >= every_s:
            last[task] = now
            emit(task=task, done=done, total=total, metrics=msg.get("metrics") or {})

    return handler
