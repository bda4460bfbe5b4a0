"""Curation stages (one thin module per DAG stage) and the plug-in families they share with distillation:
sources, imaging, train (the reference trainer), and later embedders, pruning and labeling."""
from __future__ import annotations


def register_stages() -> None:
    """Import every top-level module of this package: each holds one stage and registers it with
    ``@STAGES.register()``. Called by the stage registry (entry point ``distillery.plugins: stages``)."""
    from pipeline.registry import import_modules

    import_modules(__name__, __path__)
