"""Artifact identity: what changes outputs changes the id (parameters, code), what does not (execution-only
settings, comments) does not."""
from __future__ import annotations

import sys
import textwrap

import pytest

import dummy_stages  # noqa: F401
from pipeline import fingerprint
from pipeline.config import PipelineManifest
from pipeline.runner import Runner


def artifact_id(tmp_path, stage: str, params: dict) -> str:
    m = PipelineManifest.model_validate({"name": "i", "output_dir": str(tmp_path / "run"),
                                         "stages": [{"name": "s", "stage": stage, "params": params}]})
    runner = Runner(m, client=object(), show_progress=False)
    return runner.identify(runner.steps[0], {})[0]


def test_execution_only_parameters_do_not_change_the_id(tmp_path):
    base = artifact_id(tmp_path, "device-probe", {"tasks": 2})
    assert artifact_id(tmp_path, "device-probe", {"tasks": 2, "note": "run on the big box"}) == base
    assert artifact_id(tmp_path, "device-probe", {"tasks": 3}) != base


@pytest.fixture
def plugin(tmp_path, monkeypatch):
    """A plug-in package on sys.path whose stage imports a helper module."""
    root = tmp_path / "plugsrc"
    pkg = root / "myplug"
    (pkg / "family").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "family" / "__init__.py").write_text("")
    (pkg / "family" / "member.py").write_text("def scale(x):\n    return 2 * x\n")
    (pkg / "helper.py").write_text("def f(x):\n    return x + 1\n")
    (pkg / "other.py").write_text("def g(x):\n    return x\n")
    (pkg / "stage.py").write_text("from myplug.helper import f\nfrom myplug.family import member\n")
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(fingerprint, "PLUGIN_PACKAGES", (*fingerprint.PLUGIN_PACKAGES, "myplug"))
    yield pkg
    for name in [m for m in sys.modules if m.startswith("myplug")]:
        del sys.modules[name]


def test_code_fingerprint_follows_imports_and_ignores_comments(plugin):
    fp = fingerprint.code_fingerprint
    assert set(fingerprint.closure("myplug.stage")) == {
        "myplug.stage", "myplug.helper", "myplug.family", "myplug.family.member"}
    base = fp("myplug.stage")
    (plugin / "helper.py").write_text('"""Docstring."""\n# a comment\ndef f(x):\n    """Add one."""\n'
                                      "    return x + 1  # still one\n")
    assert fp("myplug.stage") == base, "comments, docstrings and formatting do not change the fingerprint"
    (plugin / "other.py").write_text("def g(x):\n    return -x\n")
    assert fp("myplug.stage") == base, "a module the stage does not import does not count"
    (plugin / "helper.py").write_text("def f(x):\n    return x + 2\n")
    changed = fp("myplug.stage")
    assert changed != base, "editing imported code changes the fingerprint"
    (plugin / "family" / "extra.py").write_text("X = 1\n")
    assert fp("myplug.stage") != changed, "a family counts whole: its members are found through a registry"


def test_code_fingerprint_enters_the_artifact_id(tmp_path, monkeypatch):
    base = artifact_id(tmp_path, "device-probe", {"tasks": 2})
    monkeypatch.setattr(fingerprint, "code_fingerprint", lambda module: "edited")
    assert artifact_id(tmp_path, "device-probe", {"tasks": 2}) != base
