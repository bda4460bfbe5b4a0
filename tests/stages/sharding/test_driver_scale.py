"""The driver never holds a Python object per sample: planning a large synthetic table stays within a few hundred
bytes of RSS per row, and every task payload is a small pointer to its refs chunk (``.plan/refs/NNNNN.parquet``)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO


def plan_in_fresh_process(rows: int, tmp_path) -> dict:
    out = subprocess.run([sys.executable, str(REPO / "bench" / "plan_scale.py"), str(rows), "--work", str(tmp_path)],
                         capture_output=True, text=True, check=True, cwd=REPO)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(result)
    assert result["refs_in_tasks"] == rows and result["tasks"] == -(-rows * 15 // 16 // 10_000) + -(-rows // 16 // 10_000)
    assert result["largest_payload_bytes"] < 200
    assert (tmp_path / "artifact" / ".plan" / "refs" / "00000.parquet").is_file()
    return result


def test_planning_200k_rows_keeps_driver_memory_bounded(tmp_path):
    r = plan_in_fresh_process(200_000, tmp_path)
    assert r["rss_peak_growth_mib"] < 200, r  # a SampleRef + payload dict per row took 271 MiB here


@pytest.mark.slow
def test_planning_2_million_rows_keeps_driver_memory_bounded(tmp_path):
    r = plan_in_fresh_process(2_000_000, tmp_path)
    assert r["rss_peak_growth_mib"] < 1024, r  # measured ~570 MiB; per-sample objects would need several GiB
