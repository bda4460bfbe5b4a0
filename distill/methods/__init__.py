"""Distillation methods, one file each, registered in ``DISTILL_METHODS`` (importing this package loads them all)."""
from __future__ import annotations

from distill.methods.base import DISTILL_METHODS, DistillContext, DistillMethod, MethodParams, MethodState, SetOutput
from pipeline.registry import import_modules

import_modules(__name__, __path__)

__all__ = ["DISTILL_METHODS", "DistillContext", "DistillMethod", "MethodParams", "MethodState", "SetOutput"]
