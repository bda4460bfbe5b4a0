"""Label sources (a registry, ``LABEL_SOURCES`` / ``create_label_source``; one file each: zero-shot, teacher,
neighbours, combine), confident learning (``confident.py``) and the labels artifact format (``store.py``).

    create_label_source({"source": "teacher"}).probs(rows, inputs, classes)   # (n, C), row-aligned with rows
"""
from __future__ import annotations

import importlib

from stages.labeling.base import LABEL_SOURCES, LabelSource, SourceParams, create_label_source

# the member modules, named (the folder also holds libraries: store, confident, base, label maps, ...)
_MEMBERS = ("zero_shot", "teacher", "neighbours", "combine")
for _m in _MEMBERS:
    importlib.import_module(f"{__name__}.{_m}")

__all__ = ["LABEL_SOURCES", "LabelSource", "SourceParams", "create_label_source"]
