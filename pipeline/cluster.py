"""Dask clusters from named profiles in ``dask_config.yaml``: local, address, slurm, local-gpu.

GPU stages ask for the ``GPU`` worker resource. Every profile that has GPUs gives its workers that
resource; on a CPU-only LocalCluster the runner drops resource requests, so the same code runs anywhere.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any, Iterator

import yaml

from pipeline.errors import DistilleryError

log = logging.getLogger(__name__)

CONFIG_ENV = "DISTILLERY_DASK_CONFIG"
_FALLBACK = {"default-profile": "local", "profiles": {"local": {"kind": "local"}}}


class ClusterError(DistilleryError):
    pass


def find_config(path: str | os.PathLike[str] | None = None) -> Path | None:
    candidates = [path, os.environ.get(CONFIG_ENV), "dask_config.yaml",
                  Path(__file__).resolve().parent.parent / "dask_config.yaml"]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    if path:
        raise ClusterError(f"{path}: dask config not found")
    return None


def load_config(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    found = find_config(path)
    if found is None:
        return {"distillery": _FALLBACK, "dask": {}}
    text = os.path.expandvars(found.read_text())
    data = yaml.safe_load(text) or {}
    data.setdefault("distillery", _FALLBACK)
    data["_path"] = str(found)
    return data


def profile_settings(name: str | None, config: dict[str, Any], options: dict[str, Any] | None = None) -> dict[str, Any]:
    section = config["distillery"]
    name = name or section.get("default-profile", "local")
    profiles = section.get("profiles", {})
    if name not in profiles:
        raise ClusterError(
            f"{config.get('_path', 'dask config')}: no cluster profile '{name}' (have: {', '.join(profiles)})"
        )
    settings = {**profiles[name], **(options or {})}
    settings.setdefault("kind", name)
    return settings


def _auto_local(settings: dict[str, Any]) -> dict[str, Any]:
    import psutil

    n = settings.get("n_workers", "auto")
    n_workers = (os.cpu_count() or 1) if n in (None, "auto") else int(n)
    mem = settings.get("memory_limit", "auto")
    if mem in (None, "auto"):
        mem = int(psutil.virtual_memory().total * 0.9 / max(n_workers, 1))
    return {
        "n_workers": n_workers,
        "threads_per_worker": int(settings.get("threads_per_worker", 1)),
        "memory_limit": mem,
        "processes": bool(settings.get("processes", True)),
        "dashboard_address": settings.get("dashboard_address", ":0"),
        "resources": settings.get("resources"),
    }


@contextlib.contextmanager
def open_client(profile: str | None = None, config_path: str | os.PathLike[str] | None = None,
                options: dict[str, Any] | None = None) -> Iterator[Any]:
    """Yield a ``distributed.Client`` for the profile; tear down what we started on exit."""
    import dask
    from distributed import Client, LocalCluster

    config = load_config(config_path)
    settings = profile_settings(profile, config, options)
    kind = settings["kind"]
    with dask.config.set(_flatten(config.get("dask") or {})):
        if kind == "local":
            kw = _auto_local(settings)
            with LocalCluster(**{k: v for k, v in kw.items() if v is not None}) as cluster, Client(cluster) as client:
                yield client
        elif kind == "address":
            address = settings.get("address") or os.environ.get("DASK_SCHEDULER_ADDRESS")
            if not address or address.startswith("$"):
                raise ClusterError("profile 'address' needs an address (cluster.options.address or DASK_SCHEDULER_ADDRESS)")
            with Client(address, timeout=settings.get("timeout", "30s")) as client:
                yield client
        elif kind == "slurm":
            try:
                from dask_jobqueue import SLURMCluster
            except ImportError:
                raise ClusterError("profile 'slurm' needs dask-jobqueue: pip install 'distillery[slurm]'") from None
            jobs = int(settings.pop("jobs", 1))
            kw = {k: v for k, v in settings.items() if k != "kind" and v is not None}
            with SLURMCluster(**kw) as cluster, Client(cluster) as client:
                cluster.scale(jobs=jobs)
                yield client
        elif kind == "local-gpu":
            with _local_gpu(settings) as client:
                yield client
        else:
            raise ClusterError(f"unknown cluster kind '{kind}'")


@contextlib.contextmanager
def _local_gpu(settings: dict[str, Any]) -> Iterator[Any]:
    from distributed import Client, LocalCluster

    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        LocalCUDACluster = None
    if LocalCUDACluster is not None:
        with LocalCUDACluster(threads_per_worker=int(settings.get("threads_per_worker", 1)),
                              resources={"GPU": 1}) as cluster, Client(cluster) as client:
            yield client
        return
    import torch

    n_gpu = torch.cuda.device_count()
    if n_gpu == 0:
        raise ClusterError("profile 'local-gpu' found no CUDA device; use the 'local' profile")
    log.warning("dask-cuda not installed: one LocalCluster worker per GPU without device pinning")
    with LocalCluster(n_workers=n_gpu, threads_per_worker=1, resources={"GPU": 1}) as cluster, Client(cluster) as client:
        yield client


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``: dask.config.set replaces whole subtrees given nested dicts."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def cluster_has_resource(client: Any, resource: str) -> bool:
    info = client.scheduler_info()
    return any(resource in (w.get("resources") or {}) for w in info.get("workers", {}).values())
