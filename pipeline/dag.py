"""The DAG of a run's steps, as pure functions: which steps a target needs, how far ``--force`` reaches, which step
goes first, and the scheduler that runs ready steps concurrently. The runner supplies what running one step means."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Protocol, TypeVar

R = TypeVar("R")


class Step(Protocol):
    name: str
    inputs: dict[str, str]  # input name -> the step (or artifact path) it reads


S = TypeVar("S", bound=Step)


def downstream_counts(steps: Sequence[Step]) -> dict[str, int]:
    """How many steps depend on each step, directly or through others (steps come in topological order)."""
    below: dict[str, set[str]] = {s.name: set() for s in steps}
    for step in reversed(steps):
        for up in step.inputs.values():
            if up in below:
                below[up] |= below[step.name] | {step.name}
    return {name: len(v) for name, v in below.items()}


def needed_by(steps: Sequence[S], targets: Sequence[str]) -> list[S]:
    """The steps the ``targets`` need, themselves included, in the given order; a name that is no step is a
    ``KeyError`` naming it."""
    names = [s.name for s in steps]
    for name in targets:
        if name not in names:
            raise KeyError(name)
    needed = set(targets)
    for step in reversed(steps):
        if step.name in needed:
            needed.update(step.inputs.values())
    return [s for s in steps if s.name in needed]


def forced_closure(steps: Sequence[Step], forced: set[str]) -> set[str]:
    """``forced`` plus every step downstream of one (a re-run stage changes what its consumers read)."""
    out = set(forced)
    for step in steps:
        if any(u in out for u in step.inputs.values()):
            out.add(step.name)
    return out


def run_dag(steps: Sequence[S], done: dict[str, Any], run_one: Callable[[S], R], parallel: int,
            priority: dict[str, int], on_done: Callable[[S, R], None]) -> dict[str, Any]:
    """Run ``steps`` in threads, every step whose inputs are in ``done`` as soon as one of ``parallel`` slots is
    free, the step with more steps downstream first (ties: manifest order). On a failure no new step starts; the
    running ones finish, then the first error is raised. Returns ``done`` with every step's result added."""
    pending = list(steps)
    running: dict[Future[R], S] = {}
    error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="stage") as pool:
        while pending or running:
            if error is None:
                ready = [s for s in pending if all(u in done for u in s.inputs.values())]
                for step in sorted(ready, key=lambda s: -priority.get(s.name, 0)):  # stable: else in order
                    if len(running) >= parallel:
                        break
                    pending.remove(step)
                    running[pool.submit(run_one, step)] = step
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                step = running.pop(fut)
                try:
                    res = fut.result()
                except BaseException as e:  # noqa: BLE001 - re-raised once the running steps finish
                    error = error or e
                    continue
                done[step.name] = res
                on_done(step, res)
    if error is not None:
        raise error
    return done
