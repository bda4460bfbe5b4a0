"""The distillation loop any method runs in: iterations, progress, checkpoints, the loss and quick-eval curves.

Resuming from a checkpoint continues with the same state, generator and history, so a run killed at any point
ends with the same synthetic set as an uninterrupted one (tests/distill/test_mtt.py, tests/distill/test_stage.py).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from distill.checkpoint import load_checkpoint, save_checkpoint
from distill.methods.base import DistillContext, DistillMethod, MethodParams, MethodState

QuickEval = Callable[[MethodState, int], float]  # (state, iteration) -> test top-1 (%)
Progress = Callable[[int, int, dict[str, Any]], None]


def run_loop(method: DistillMethod[Any], params: MethodParams, ctx: DistillContext, state: MethodState, *,
             checkpoint: Path | None = None, checkpoint_every: int = 50, progress: Progress | None = None,
             quick_eval: QuickEval | None = None, eval_every: int = 0,
             stop_after: int | None = None) -> dict[str, Any]:
    """Run ``params.iterations`` iterations (continuing a checkpoint when one exists); returns the history:
    ``{"iterations": [per-iteration metrics], "evals": [[iteration, top1], ...], "resumed_from": int}``.
    ``stop_after`` ends the call after that many iterations of this session (tests simulate a kill with it)."""
    history: dict[str, Any] = {"iterations": [], "evals": [], "resumed_from": 0}
    first = 0
    saved = load_checkpoint(checkpoint) if checkpoint is not None else None
    if saved is not None:
        state.load_state_dict(saved["state"])
        history = saved["history"]
        first = history["resumed_from"] = int(saved["iteration"])
    total = params.iterations
    done_here = 0
    for it in range(first, total):
        metrics = method.step(state, params, ctx, it)
        history["iterations"].append({"iteration": it + 1, **metrics})
        if quick_eval is not None and eval_every and ((it + 1) % eval_every == 0 or it + 1 == total):
            history["evals"].append([it + 1, quick_eval(state, it + 1)])
        last = it + 1 == total
        if checkpoint is not None and ((it + 1) % checkpoint_every == 0 or last):
            save_checkpoint(checkpoint, it + 1, state.state_dict(), history)
        if progress is not None:
            shown = {k: round(v, 5) for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}
            progress(it + 1, total, shown)
        done_here += 1
        if stop_after is not None and done_here >= stop_after and not last:
            break
    return history
