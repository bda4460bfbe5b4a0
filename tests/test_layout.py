"""The layout's rules: dependencies point one way, stages register once and declare kinds, consumers use kinds."""
from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

from conftest import REPO
from pipeline.artifacts import ARTIFACT_KINDS
from pipeline.stage import STAGES


def imported_packages(package: str) -> dict[str, set[str]]:
    """file -> top-level packages it imports (anywhere in the file, including inside functions)."""
    out = {}
    for path in sorted((REPO / package).rglob("*.py")):
        tops = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                tops.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                tops.add(node.module.split(".")[0])
        out[str(path.relative_to(REPO))] = tops
    return out


def test_dependencies_point_one_way():
    for f, tops in imported_packages("pipeline").items():
        assert not tops & {"stages", "distill"}, f"{f} imports {tops & {'stages', 'distill'}}"
    for f, tops in imported_packages("stages").items():
        assert "distill" not in tops, f"{f} imports distill"


def test_entry_points_match_registered_stage_names():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"]["distillery.stages"]
    names = STAGES.names()
    for ep_name, target in declared.items():
        module, attr = target.split(":")
        cls = getattr(__import__(module, fromlist=[attr]), attr)
        assert cls.name == ep_name and STAGES.get(ep_name) is cls
    in_tree = {n for n in names if STAGES.get(n).__module__.split(".")[0] in ("stages", "distill")}
    assert in_tree == set(declared), "every in-tree stage has an entry point, and only those"


def test_every_stage_declares_its_kinds():
    for name in STAGES.names():
        cls = STAGES.get(name)
        if cls.__module__.split(".")[0] not in ("stages", "distill"):
            continue
        assert cls.output_kind in ARTIFACT_KINDS, (name, cls.output_kind)
        for inp, kinds in cls.input_kinds.items():
            assert set(kinds) <= set(ARTIFACT_KINDS), (name, inp, kinds)


def test_one_thin_module_per_stage():
    """stages/ top level holds stage modules only; libraries live in the family folders."""
    for path in (REPO / "stages").glob("*.py"):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        registered = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
                      and any("STAGES.register" in ast.unparse(d) for d in n.decorator_list)]
        assert len(registered) == 1, f"{path.name}: one registered stage per top-level module"


def test_input_kind_mismatch_is_a_manifest_error(tmp_path, digits_shards):
    from pipeline.config import ManifestError, PipelineManifest, resolve

    m = PipelineManifest.model_validate({"name": "k", "output_dir": str(tmp_path), "stages": [
        {"name": "v", "stage": "validate", "inputs": {"train": str(digits_shards.path), "teacher": str(digits_shards.path)}}]})
    with pytest.raises(ManifestError, match=r"stages\[v\]\.inputs\.teacher: .* is a 'shards' artifact; stage 'validate' takes 'model'"):
        resolve(m)


def test_no_assert_for_input_checks():
    for path in [*(REPO / "pipeline").rglob("*.py"), *(REPO / "stages").rglob("*.py"), *(REPO / "distill").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            assert not isinstance(node, ast.Assert), f"{path.relative_to(REPO)}:{node.lineno}: assert in library code"


def test_a_new_stage_file_is_found_without_reinstalling():
    """In-tree discovery walks stages/ at run time (entry point ``distillery.plugins``), so a stage added as a
    file is registered although the installed entry points have never heard of it."""
    import importlib
    import sys

    from pipeline.registry import Registry

    path = REPO / "stages" / "zz_layout_probe.py"
    path.write_text("from pipeline.stage import STAGES, Stage\n\n\n@STAGES.register()\nclass ZZ(Stage):\n"
                    "    name = 'zz-layout-probe'\n    output_kind = 'metrics'\n")
    try:
        importlib.invalidate_caches()
        fresh: Registry = Registry("stage", plugin_group="distillery.plugins")
        fresh._discover()  # runs stages:register_stages and distill:register_stages
        assert "zz-layout-probe" in STAGES.names()
        assert "zz-layout-probe" not in STAGES.entry_point_names()
    finally:
        path.unlink()
        STAGES._members.pop("zz-layout-probe", None)
        sys.modules.pop("stages.zz_layout_probe", None)
