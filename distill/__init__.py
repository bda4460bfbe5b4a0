"""Dataset distillation on top of ``stages``: expert trajectories and their buffer format, the matching core and
the methods (MTT, TESLA, CDA, DataDAM, FYI). Nothing in ``stages`` imports this package."""
from __future__ import annotations


def register_stages() -> None:
    """Import this package's top-level modules, registering the stages among them (``distillery.plugins``)."""
    from pipeline.registry import import_modules

    import_modules(__name__, __path__)
