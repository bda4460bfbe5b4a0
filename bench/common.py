"""Shared benchmark plumbing: machine description and JSON results under bench/results/."""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_CIFAR = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "cifar10-jpeg.tar"


def machine() -> dict[str, Any]:
    import psutil

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
                            "python": platform.python_version(), "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        pass
    return info


def cpu_busy(seconds: float = 1.0) -> float:
    """Fraction of all cores busy during ``seconds`` while this benchmark sleeps: other people's work."""
    def snap() -> tuple[int, int]:
        fields = [int(x) for x in open("/proc/stat").readline().split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait

    t0, i0 = snap()
    time.sleep(seconds)
    t1, i1 = snap()
    return round(1 - (i1 - i0) / max(t1 - t0, 1), 2)


def machine_load() -> dict[str, float]:
    """How busy the shared machine is just before a measurement: the 1-minute load average and the busy fraction
    of the cores in the last second (other people's work)."""
    return {"load_1min": round(os.getloadavg()[0], 2), "others_busy": cpu_busy()}


def best_of(fn: Callable[[], Any], repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def write_result(name: str, result: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine(), **result}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return path
