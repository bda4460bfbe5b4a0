"""Source adapters. Every module in this package registers its adapter; adding one is one file."""
from __future__ import annotations

import importlib
import pkgutil

from stages.sources.base import (
    REF_SCHEMA, SOURCES, SPLIT_NAMES, Scan, Source, SourceError, SourceParams, create_source,
)

_LIBRARIES = {"base", "columns", "tree", "fingerprints"}
for _m in pkgutil.iter_modules(__path__):
    if _m.name not in _LIBRARIES:
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["REF_SCHEMA", "SOURCES", "SPLIT_NAMES", "Scan", "Source", "SourceError", "SourceParams", "create_source"]
