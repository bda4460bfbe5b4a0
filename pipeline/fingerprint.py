"""Code fingerprints: which source files a stage runs, hashed so that editing them re-runs what depends on them.

The closure starts at the stage's module and follows its imports (at any depth, function-level imports included)
within the plug-in packages. A sub-package (a plug-in family such as ``stages/sources``) counts whole, because its
members are found through a registry at run time rather than imported by name; top-level modules of a plug-in
package count one by one, so editing ``stages/validate.py`` does not re-run ``shard``.

Each file is hashed by its syntax tree with docstrings dropped, so comments, formatting and docstrings do not
invalidate caches; any change to what the code does does. The runner's own code (``pipeline``) is not part of a
stage's fingerprint: it moves files, it does not decide their bytes.
"""
from __future__ import annotations

import ast
import hashlib
import threading
import importlib.util
import sys
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

PLUGIN_PACKAGES = ("stages", "distill")
LIBRARIES = ("numpy", "torch", "torchvision", "pyarrow", "pillow", "simplejpeg", "open_clip_torch", "faiss-cpu",
             "timm", "scikit-learn", "webdataset")


def _module_file(name: str) -> Path | None:
    """The source file of a module inside a plug-in package, found on disk without importing anything."""
    top, *rest = name.split(".")
    spec = importlib.util.find_spec(top)  # top-level plug-in packages are cheap to locate
    if spec is None or not spec.submodule_search_locations:
        return None
    base = Path(list(spec.submodule_search_locations)[0]).joinpath(*rest)
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Absolute names of the modules (and possible submodules) a file imports."""
    out: set[str] = set()
    pkg = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                root = ".".join(base + ([node.module] if node.module else []))
            else:
                root = node.module or ""
            out.add(root)
            out.update(f"{root}.{a.name}" for a in node.names)  # ``from pkg import submodule``
    return {m for m in out if m.split(".")[0] in PLUGIN_PACKAGES}

_PARSE_LOCK = threading.Lock()


def _normalised(source: str) -> str:
    with _PARSE_LOCK:  # CPython 3.11's ast.parse is not thread-safe (parallel stages identify in threads)
        tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                node.body = node.body[1:] or [ast.Pass()]
    return ast.dump(tree, annotate_fields=False)


def closure(module: str) -> dict[str, Path]:
    """Module name -> file for everything the module's code can run within the plug-in packages."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        path = _module_file(name)
        if path is None:
            continue
        seen[name] = path
        is_package = path.name == "__init__.py"
        st = path.stat()
        todo.extend(_file_imports(str(path), st.st_mtime_ns, st.st_size, name, is_package))
        parent = name if is_package else name.rpartition(".")[0]
        if "." in parent:  # a sub-package: every member module counts (registries load them by name)
            pdir = path.parent
            todo.append(parent)
            todo.extend(f"{parent}.{p.stem}" for p in pdir.glob("*.py") if p.stem != "__init__")
    return seen


@lru_cache(maxsize=None)
def _file_imports(path: str, mtime_ns: int, size: int, name: str, is_package: bool) -> tuple[str, ...]:
    text = Path(path).read_text()
    with _PARSE_LOCK:
        tree = ast.parse(text)
    return tuple(sorted(_imports(tree, name, is_package)))


@lru_cache(maxsize=None)
def _file_digest(path: str, mtime_ns: int, size: int) -> str:
    return hashlib.sha256(_normalised(Path(path).read_text()).encode()).hexdigest()


def code_fingerprint(module: str) -> str:
    """sha256 over the normalised source of ``module``'s closure (see the module docstring)."""
    h = hashlib.sha256()
    for name, path in sorted(closure(module).items()):
        st = path.stat()
        h.update(f"{name}\0{_file_digest(str(path), st.st_mtime_ns, st.st_size)}\n".encode())
    return h.hexdigest()


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose numerics shape outputs (recorded per task, compared on resume)."""
    out = {"python": ".".join(map(str, sys.version_info[:3]))}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            pass
    return out
