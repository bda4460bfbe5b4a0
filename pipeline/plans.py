"""A stage's plan on disk: its tasks as JSON (never pickle: a plan sits in a directory a user may point at).

A task's payload must be plain JSON data. Every task runs with its payload as read back from JSON, on the first
run and on a resume alike, so both see identical types (lists, not tuples; string keys).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.atomic import write_text
from pipeline.errors import DistilleryError
from pipeline.stage import Task

PLAN_FILE = ".plan.json"
PLAN_FORMAT = "distillery.plan.v1"


class PlanError(DistilleryError):
    pass


def encode_plan(tasks: list[Task], where: str) -> str:
    ids = [t.id for t in tasks]
    if len(set(ids)) != len(ids):
        raise PlanError(f"{where}: plan produced duplicate task ids")
    try:
        return json.dumps({"format": PLAN_FORMAT, "tasks": [{"id": t.id, "size": t.size, "payload": t.payload}
                                                            for t in tasks]}, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise PlanError(f"{where}: task payloads must be plain JSON data ({e})") from None


def decode_plan(text: str, where: str) -> list[Task]:
    try:
        data = json.loads(text)
    except ValueError as e:
        raise PlanError(f"{where}: unreadable plan ({e}); delete it to re-plan") from None
    if not isinstance(data, dict) or data.get("format") != PLAN_FORMAT:
        raise PlanError(f"{where}: not a {PLAN_FORMAT} plan; delete it to re-plan")
    return [Task(id=t["id"], payload=t["payload"], size=t["size"]) for t in data["tasks"]]


def save_plan(tasks: list[Task], path: Path) -> list[Task]:
    """Write the plan atomically; returns the tasks as read back (what workers will see)."""
    text = encode_plan(tasks, str(path))
    write_text(path, text)
    return decode_plan(text, str(path))


def load_plan(path: Path) -> list[Task]:
    return decode_plan(path.read_text(), str(path))


def roundtrip(tasks: list[Task], where: str = "<plan>") -> list[Task]:
    """The tasks as a resumed run would see them (for running a stage without the runner)."""
    return decode_plan(encode_plan(tasks, where), where)


def plan_size(path: Path) -> int | None:
    """Number of tasks in a saved plan, or None when there is none."""
    if not path.is_file():
        return None
    try:
        return len(json.loads(path.read_text())["tasks"])
    except (ValueError, KeyError, TypeError):
        return None


