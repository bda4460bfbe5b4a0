"""``distillery report``: one self-contained page whose pictures load in a real browser."""
from __future__ import annotations

import base64
import re
import shutil
import subprocess

import pytest

from conftest import make_tree, run_pipeline
from pipeline.report import build_report, write_report


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, client):
    tmp = tmp_path_factory.mktemp("report")
    make_tree(tmp / "src", per_class=12, size=32)
    small = {"epochs": 3, "network_kwargs": {"width": 8, "norm": "instancenorm"}}
    run_pipeline({"name": "report-demo", "output_dir": str(tmp / "run"), "source": {"kind": "folder", "path": str(tmp / "src")},
                  "stages": [{"name": "shard", "params": {"samples_per_shard": 10}},
                             {"name": "val", "stage": "validate", "inputs": {"train": "shard"},
                              "params": {"recipe": "standard-dd", "overrides": small, "seeds": [0],
                                         "subset": {"ipc": 2}}}]}, client)
    return tmp / "run"


def test_report_has_every_stage_its_counts_and_embedded_pictures(run_dir):
    page = build_report(run_dir)
    assert page.startswith("<!doctype html>") and "report-demo" in page
    for stage in ("shard", "val"):
        assert f'id="{stage}"' in page
    assert "Results: test top-1" in page and "subset: the run itself is a random subset" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2  # the shard's sample grid and the validation curves
    for data in images:
        assert base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in page and "https://" not in page, "self-contained: nothing to fetch"


@pytest.mark.skipif(shutil.which("chromium") is None, reason="headless Chromium not installed (apt install chromium)")
def test_report_pictures_load_in_headless_chromium(run_dir, tmp_path):
    page = write_report(run_dir, tmp_path / "report.html").read_text()
    probe = page.replace("</body>", "<script>window.addEventListener('load',()=>{document.body.dataset.loaded="
                                    "[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length;"
                                    "document.body.dataset.total=document.images.length});</script></body>")
    (tmp_path / "probe.html").write_text(probe)
    out = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                          "--dump-dom", (tmp_path / "probe.html").as_uri()], capture_output=True, text=True,
                         timeout=120)
    loaded = re.search(r'data-loaded="(\d+)"', out.stdout)
    total = re.search(r'data-total="(\d+)"', out.stdout)
    assert loaded and total, out.stderr[-2000:]
    assert int(total.group(1)) == 2 and loaded.group(1) == total.group(1)
