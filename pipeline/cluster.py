"""Dask clusters from named profiles in ``dask_config.yaml``: local, address, slurm, local-gpu.

* ``local`` starts an in-process scheduler and one worker **subprocess** per core (``python -m dask spec``), not
  multiprocessing children: a plain script that drives the ``Runner`` without an ``if __name__ == "__main__"``
  guard works, because no worker re-imports the user's script.
* GPUs: a worker that owns a GPU sees exactly one device (``CUDA_VISIBLE_DEVICES``) and offers the ``GPU`` resource;
  the other workers see none. GPU tasks are therefore spread one per device, never N trainings on ``cuda:0``.
  On a machine without GPUs the runner drops GPU resource requests, so the same manifests run anywhere.
* Connecting never hangs: a wrong scheduler address is one clear ``ClusterError`` after ``connect_timeout``.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import yaml

from pipeline.errors import DistilleryError

log = logging.getLogger(__name__)

CONFIG_ENV = "DISTILLERY_DASK_CONFIG"
_FALLBACK = {"default-profile": "local", "profiles": {"local": {"kind": "local"}}}
# settings the runner reads (not passed to Dask): seconds without any worker before a run gives up
RUNNER_SETTINGS = ("worker_timeout",)


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


def visible_gpus(setting: Any = "auto") -> list[str]:
    """GPU ids this machine offers: a list in the profile, else ``CUDA_VISIBLE_DEVICES``, else ``nvidia-smi -L``."""
    if isinstance(setting, (list, tuple)):
        return [str(g) for g in setting]
    if isinstance(setting, int):
        return [str(i) for i in range(setting)]
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU ")]


def worker_specs(n_workers: int, threads: int, memory_limit: Any, gpus: list[str],
                 resources: dict[str, float] | None = None, death_timeout: float = 60) -> dict[str, dict[str, Any]]:
    """One spec per worker; the first ``len(gpus)`` workers each own one GPU, the rest see none."""
    specs = {}
    for i in range(n_workers):
        owns = i < len(gpus)
        res = dict(resources or {})
        if owns:
            res["GPU"] = 1
        specs[str(i)] = {"name": str(i), "worker_kwargs": {
            "nthreads": threads, "memory_limit": memory_limit, "resources": res or None, "host": "127.0.0.1",
            "death_timeout": death_timeout, "env": {"CUDA_VISIBLE_DEVICES": gpus[i] if owns else ""},
        }}
    return specs


def _auto_local(settings: dict[str, Any]) -> dict[str, Any]:
    import psutil

    n = settings.get("n_workers", "auto")
    n_workers = (os.cpu_count() or 1) if n in (None, "auto") else int(n)
    mem = settings.get("memory_limit", "auto")
    if mem in (None, "auto"):
        mem = int(psutil.virtual_memory().total * 0.9 / max(n_workers, 1))
    return {"n_workers": n_workers, "threads": int(settings.get("threads_per_worker", 1)), "memory_limit": mem,
            "gpus": visible_gpus(settings.get("gpus", "auto")), "resources": settings.get("resources"),
            "dashboard_address": settings.get("dashboard_address", ":0")}


@contextlib.contextmanager
def open_client(profile: str | None = None, config_path: str | os.PathLike[str] | None = None,
                options: dict[str, Any] | None = None) -> Iterator[Any]:
    """Yield a ``distributed.Client`` for the profile; tear down what we started on exit."""
    import dask

    config = load_config(config_path)
    settings = {k: v for k, v in profile_settings(profile, config, options).items() if k not in RUNNER_SETTINGS}
    kind = settings.pop("kind")
    with dask.config.set(_flatten(config.get("dask") or {})):
        if kind == "local":
            with _subprocess_cluster(_auto_local(settings)) as client:
                yield client
        elif kind == "address":
            with _connect(settings) as client:
                yield client
        elif kind == "slurm":
            with _slurm(settings) as client:
                yield client
        elif kind == "local-gpu":
            with _local_gpu(settings) as client:
                yield client
        else:
            raise ClusterError(f"unknown cluster kind '{kind}'")


@contextlib.contextmanager
def _connect(settings: dict[str, Any]) -> Iterator[Any]:
    from distributed import Client

    address = settings.get("address") or os.environ.get("DASK_SCHEDULER_ADDRESS")
    if not address or str(address).startswith("$"):
        raise ClusterError("profile 'address' needs an address (cluster.options.address or DASK_SCHEDULER_ADDRESS)")
    timeout = settings.get("connect_timeout", settings.get("timeout", "20s"))
    try:
        client = Client(address, timeout=timeout)
    except (OSError, asyncio.TimeoutError, TimeoutError) as e:
        raise ClusterError(f"cannot reach the Dask scheduler at {address} within {timeout} "
                           f"({type(e).__name__}); is it running, and is the address right?") from None
    with client:
        yield client


@contextlib.contextmanager
def _subprocess_cluster(kw: dict[str, Any]) -> Iterator[Any]:
    from distributed import Client, Scheduler, SpecCluster

    specs = worker_specs(kw["n_workers"], kw["threads"], kw["memory_limit"], kw["gpus"], kw.get("resources"))
    scheduler = {"cls": Scheduler, "options": {"host": "127.0.0.1", "port": 0,
                                              "dashboard": kw.get("dashboard_address") is not None,
                                              "dashboard_address": kw.get("dashboard_address") or ":0"}}
    workers = {name: {"cls": _WorkerProcess, "options": spec} for name, spec in specs.items()}
    try:
        cluster = SpecCluster(workers=workers, scheduler=scheduler, name="distillery-local")
    except Exception as e:  # noqa: BLE001 - a failed start is one line for the user, details in the log
        log.debug("local cluster failed to start", exc_info=True)
        raise ClusterError(f"the local Dask cluster failed to start: {type(e).__name__}: {e}") from None
    with _QuietTeardown() as quiet, cluster, Client(cluster) as client:
        try:
            try:  # resource checks need every worker's declaration: wait until all have joined
                client.wait_for_workers(len(specs), timeout=kw.get("start_timeout", 120))
            except (TimeoutError, asyncio.TimeoutError):
                raise ClusterError(f"only {n_workers(client)} of {len(specs)} local Dask workers started within "
                                   f"{kw.get('start_timeout', 120)} s") from None
            yield client
        finally:  # close workers through the scheduler first: killed subprocesses log connection tracebacks
            with contextlib.suppress(Exception):
                client.retire_workers(close_workers=True, remove=False)
            quiet.silence()


class _QuietTeardown:
    """The in-process scheduler logs every worker stream it cancels while closing as an ERROR with a traceback;
    during teardown those are expected, so they are silenced, and the loggers restored afterwards."""

    NAMES = ("distributed.scheduler", "distributed.core", "distributed.comm", "distributed.deploy.spec")

    def __enter__(self) -> "_QuietTeardown":
        self._levels = {n: logging.getLogger(n).level for n in self.NAMES}
        return self

    def silence(self) -> None:
        for name in self.NAMES:
            logging.getLogger(name).setLevel(logging.CRITICAL)

    def __exit__(self, *exc: Any) -> None:
        for name, level in self._levels.items():
            logging.getLogger(name).setLevel(level)


def _worker_process_base() -> type:
    from distributed.deploy.subprocess import SubprocessWorker

    return SubprocessWorker


class _WorkerProcess(_worker_process_base()):  # type: ignore[misc]
    """``python -m dask spec`` running a Nanny, with the parent's Dask config (which ``dask.config.set`` changed
    in this process only) and ``sys.path`` passed through the environment, as multiprocessing's spawn would: a
    stage defined in a module next to the driving script is importable on the workers too."""

    async def _start(self) -> None:
        import dask

        path = [p for p in sys.path if p and os.path.isdir(p)]
        env = {**os.environ, "DASK_INTERNAL_INHERIT_CONFIG": dask.config.serialize(dask.config.config),
               "PYTHONPATH": os.pathsep.join(path)}
        cmd = [sys.executable, "-m", "dask", "spec", self.scheduler, "--spec",
               json.dumps({"cls": self.worker_class, "opts": {**self.worker_kwargs, "name": self.name}})]
        self.process = await asyncio.create_subprocess_exec(*cmd, env=env)


@contextlib.contextmanager
def _slurm(settings: dict[str, Any]) -> Iterator[Any]:
    try:
        from dask_jobqueue import SLURMCluster
    except ImportError:
        raise ClusterError("profile 'slurm' needs dask-jobqueue: pip install 'distillery[slurm]'") from None
    from distributed import Client

    jobs = int(settings.pop("jobs", 1))
    kw = {k: v for k, v in settings.items() if v is not None}
    with SLURMCluster(**kw) as cluster, Client(cluster) as client:
        cluster.scale(jobs=jobs)
        yield client


@contextlib.contextmanager
def _local_gpu(settings: dict[str, Any]) -> Iterator[Any]:
    """One worker per GPU, each pinned to its device: dask-cuda when installed, else our own worker specs."""
    from distributed import Client

    try:
        from dask_cuda import LocalCUDACluster
    except ImportError:
        LocalCUDACluster = None
    if LocalCUDACluster is not None:
        with LocalCUDACluster(threads_per_worker=int(settings.get("threads_per_worker", 1)),
                              resources={"GPU": 1}) as cluster, Client(cluster) as client:
            yield client
        return
    gpus = visible_gpus(settings.get("gpus", "auto"))
    if not gpus:
        raise ClusterError("profile 'local-gpu' found no CUDA device; use the 'local' profile")
    log.warning("dask-cuda not installed: one worker per GPU, pinned with CUDA_VISIBLE_DEVICES")
    kw = {**_auto_local({**settings, "n_workers": len(gpus)}), "gpus": gpus}
    with _subprocess_cluster(kw) as client:
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


def worker_resources(client: Any) -> list[dict[str, float]]:
    """What each connected worker offers: its declared resources plus ``memory`` (its memory limit, bytes)."""
    out = []
    for w in client.scheduler_info(n_workers=-1).get("workers", {}).values():
        res = dict(w.get("resources") or {})
        if w.get("memory_limit"):
            res["memory"] = float(w["memory_limit"])
        out.append(res)
    return out


def n_workers(client: Any) -> int:
    return len(client.scheduler_info(n_workers=-1).get("workers", {}))


def task_resources(wanted: dict[str, float], offered: list[dict[str, float]], step: str) -> tuple[
        dict[str, float] | None, list[str]]:
    """(the Dask resources to ask for, the wanted ones no worker offers and that are skipped). A missing GPU is
    skipped (the task runs on CPU workers); any other shortfall is a ``ClusterError`` naming the step. Memory is
    checked against the workers' limits, never asked for as a Dask resource."""
    out: dict[str, float] = {}
    skipped: list[str] = []
    for res, amount in wanted.items():
        best = max((w.get(res, 0.0) for w in offered), default=0.0)
        if best == 0 and res == "GPU":
            skipped.append(res)
            continue
        if best < amount:
            raise ClusterError(f"stage {step}: a task needs {res}={amount:g} but the largest worker offers "
                               f"{res}={best:g}; lower stages[{step}].resources or add bigger workers")
        if res != "memory":
            out[res] = amount
    return out or None, skipped


def wait_any(client: Any, futures: list[Any], worker_timeout: float, on_no_workers: Any = None) -> set[Any]:
    """The futures among ``futures`` that finished. Never hangs: a ``TimeoutError`` (naming the scheduler) after
    ``worker_timeout`` seconds without a single worker, or a ``ConnectionError`` when the scheduler is gone;
    ``on_no_workers()`` is called once when the workers disappear."""
    from distributed import wait

    no_workers_since: float | None = None
    while True:
        try:
            return set(wait(futures, timeout=1.0, return_when="FIRST_COMPLETED").done)
        except TimeoutError:
            pass
        if getattr(client, "status", "running") not in ("running", "connecting"):
            raise ConnectionError("lost the connection to the Dask scheduler")
        if n_workers(client) > 0:
            no_workers_since = None
            continue
        now = time.monotonic()
        if no_workers_since is None:
            no_workers_since = now
            if on_no_workers is not None:
                on_no_workers()
        elif now - no_workers_since > worker_timeout:
            where = getattr(getattr(client, "scheduler", None), "address", "")
            raise TimeoutError(f"no Dask worker for {worker_timeout:.0f} s (all died, or none ever joined {where})")
