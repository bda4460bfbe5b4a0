"""Shard-level progress for a stage across the cluster (rich), silent when disabled or not a terminal."""
from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class StageProgress:
    def __init__(self, name: str, n_tasks: int, n_items: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress: Progress | None = None
        self.name = name
        self.n_tasks = n_tasks
        self.n_items = n_items
        self.items_done = 0

    def __enter__(self) -> "StageProgress":
        if self.enabled:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TextColumn("tasks · {task.fields[items]} items"), TimeElapsedColumn(), TimeRemainingColumn(),
                console=Console(file=sys.stderr), transient=False,
            )
            self._progress.__enter__()
            self._task = self._progress.add_task(self.name, total=self.n_tasks, items=f"0/{self.n_items}")
        return self

    def advance(self, tasks: int, items: int) -> None:
        self.items_done += items
        if self._progress is not None:
            self._progress.update(self._task, advance=tasks, items=f"{self.items_done}/{self.n_items}")

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
