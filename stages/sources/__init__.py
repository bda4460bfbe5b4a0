"""Source adapters. Every module in this package registers its adapter; adding one is one file."""
from __future__ import annotations

import importlib
import pkgutil

from stages.sources.base import SOURCES, SampleRef, Source, SourceError, SourceParams, make_source

for _m in pkgutil.iter_modules(__path__):
    if _m.name != "base":
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["SOURCES", "SampleRef", "Source", "SourceError", "SourceParams", "make_source"]
