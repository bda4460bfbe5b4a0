"""Pruning methods, one file each, behind one registry (``PRUNERS``, ``create_pruner``): random, ssp, dbp,
clip-score, margin. ``base.py`` is the contract, ``quota.py`` DBP's exact QP allocation and rounding,
``clusters.py`` cluster geometry, ``step.py`` one prune step around a method (pool, chain, tables),
``plots.py`` the stage's figures."""
from __future__ import annotations

import importlib
import pkgutil

from stages.pruning.base import PRUNERS, Candidates, Decision, Pruner, PrunerParams, Target, create_pruner

_LIBRARIES = {"base", "quota", "clusters", "plots", "step"}
for _m in pkgutil.iter_modules(__path__):
    if _m.name not in _LIBRARIES:
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["PRUNERS", "Candidates", "Decision", "Pruner", "PrunerParams", "Target", "create_pruner"]
