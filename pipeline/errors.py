"""User-facing errors: each one is a single clear line that names the file, field or task at fault.

The CLI prints any ``DistilleryError`` as one line and exits 2; everything else is a bug and keeps its traceback.
Plug-in packages derive their own input errors (a bad source, a bad artifact) from ``InputError``.
"""
from __future__ import annotations


class DistilleryError(Exception):
    """Base of the errors a user can fix: bad manifests, inputs, clusters or failed tasks."""


class InputError(DistilleryError, ValueError):
    """An input (a source, an artifact, a file a user pointed at) is unusable; the message names it."""
