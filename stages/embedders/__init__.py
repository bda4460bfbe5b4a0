"""Embedders: models that turn images (and captions) into L2-normalised vectors, one file each, one registry;
``store.py`` is the embeddings artifact format every consumer reads, ``batches.py`` the loader the stage uses.

    create_embedder("open_clip:ViT-B-32:laion2b_s34b_b79k")   # model + preprocessing + description
    resolve_embedder(spec).check()                            # driver side: nothing loaded
"""
from __future__ import annotations

import importlib
import pkgutil

from stages.embedders.base import (
    EMBEDDERS, Embedder, EmbedderError, Member, Spec, create_embedder, parse_spec, preset_names, resolve_embedder,
)

_LIBRARIES = {"base", "store", "batches"}
for _m in pkgutil.iter_modules(__path__):
    if _m.name not in _LIBRARIES:
        importlib.import_module(f"{__name__}.{_m.name}")

__all__ = ["EMBEDDERS", "Embedder", "EmbedderError", "Member", "Spec", "create_embedder", "parse_spec",
           "preset_names", "resolve_embedder"]
