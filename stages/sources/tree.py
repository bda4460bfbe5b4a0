"""The rules of an image-folder tree, shared by the ``folder`` and ``tar`` sources so they agree exactly (a table
source applies the same wrapping-folder and split-folder rules to its paths).

* Hidden files and folders (any path component starting with a dot) are skipped.
* A single wrapping folder (``mydata/train/cat/x.jpg``) is not a class or a split: it is stripped, and the
  sample's identity (``source``, hence ``uid``) is its path below it.
* Split folders (``SPLIT_NAMES``) are recognised when every file sits below one (``splits: auto``).
* The class is the folder at ``label_depth`` below the split folder (0: the first, ``train/<class>/...``,
  also ``train/<class>/images/x.jpg``), or the group of ``label_regex`` matched against the path below the
  split folder (``^(?P<label>[^_]+)_`` for ``cat_001.jpg``). Files with no such folder are unlabelled.
* A class that exists in another split but not in ``train`` is refused by default: it is nearly always a
  layout like ``val/images/`` whose folder name is not a class (``split_only_classes: warn|allow``).
"""
from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, field_validator

from stages.sources.base import IMAGE_EXTS, REF_SCHEMA, SPLIT_NAMES, Scan, SourceError, SourceParams
from stages.sources.columns import CHUNK, ext_array, hidden_mask, uid_array


class SourceWarning(UserWarning):
    pass


class TreeParams(SourceParams):
    path: Path
    splits: Literal["auto", "dirs", "none"] = "auto"
    extensions: tuple[str, ...] = IMAGE_EXTS
    label_depth: int = Field(0, ge=0)
    label_regex: str | None = None
    split_only_classes: Literal["error", "warn", "allow"] = "error"

    @field_validator("label_regex")
    @classmethod
    def _one_group(cls, v: str | None) -> str | None:
        if v is not None:
            try:
                rx = re.compile(v)
            except re.error as e:
                raise ValueError(f"not a regular expression: {e}") from None
            if rx.groups < 1:
                raise ValueError("needs a group that captures the label, e.g. '^(?P<label>[^/]+)/'")
        return v


def tree_scan(rel: pa.Array, files: pa.Array, offsets: pa.Array, sizes: pa.Array, params: TreeParams,
              where: str) -> Scan:
    """Refs for the files of a tree, given their paths relative to the tree's root and their locators."""
    keep = pc.and_(pc.invert(hidden_mask(rel)), pc.is_in(ext_array(rel), value_set=pa.array(params.extensions)))
    rel, files, offsets, sizes = (pc.filter(a, keep) for a in (rel, files, offsets, sizes))
    if len(rel) == 0:
        raise SourceError(f"{where}: contains no images ({', '.join(params.extensions)})")
    ident = strip_wrapper(rel)
    split, below = split_columns(ident, params.splits)
    label = label_column(below, params)
    check_split_only_classes(split, label, params.split_only_classes, where)
    n = len(ident)
    refs = pa.table({
        "uid": uid_array(ident), "source": ident, "ext": ext_array(ident), "split": split, "label": label,
        "caption": pa.nulls(n, pa.string()), "extra": pa.nulls(n, pa.string()),
        "file": files, "offset": offsets, "size": sizes,
    }, schema=REF_SCHEMA)
    return Scan(refs)


def _depth(paths: pa.Array) -> pa.Array:
    return pc.count_substring(paths, "/")


def _top(paths: pa.Array) -> pa.Array:
    return pc.struct_field(pc.extract_regex(paths, r"^(?P<top>[^/]+)/"), "top")


def strip_wrapper(rel: pa.Array) -> pa.Array:
    """Drop a single top-level folder that every file sits in (unless it is a split folder)."""
    top = _top(rel)
    if top.null_count or pc.min(_depth(rel)).as_py() < 2:
        return rel
    tops = pc.unique(top).to_pylist()
    if len(tops) != 1 or tops[0] in SPLIT_NAMES:
        return rel
    return pc.utf8_slice_codeunits(rel, len(tops[0]) + 1)


def split_columns(ident: pa.Array, mode: str) -> tuple[pa.Array, pa.Array]:
    """(split, path below the split folder) per file."""
    top = _top(ident)
    use = mode != "none" and top.null_count == 0
    if use and mode == "auto":
        use = set(pc.unique(top).to_pylist()) <= set(SPLIT_NAMES)
    if not use:
        return pa.repeat(pa.scalar("train"), len(ident)), ident
    return top, pc.replace_substring_regex(ident, r"^[^/]+/", "", max_replacements=1)


def label_column(below: pa.Array, params: TreeParams) -> pa.Array:
    if params.label_regex is None:
        pattern = r"^(?:[^/]+/){%d}(?P<label>[^/]+)/" % params.label_depth
        return pc.struct_field(pc.extract_regex(below, pattern), "label")
    rx = re.compile(params.label_regex)
    group = "label" if "label" in rx.groupindex else 1
    chunks = []
    for i in range(0, len(below), CHUNK):
        matches = (rx.search(p) for p in below.slice(i, CHUNK).to_pylist())
        chunks.append(pa.array([m.group(group) if m else None for m in matches], pa.string()))
    return pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())


def check_split_only_classes(split: pa.Array, label: pa.Array, mode: str, where: str) -> None:
    """Refuse (or warn about) classes that exist outside ``train`` only: folder names that are not classes."""
    if mode == "allow":
        return
    pairs = pa.table({"split": split, "label": label}).filter(pc.is_valid(label)).group_by(["split", "label"]).aggregate([])
    by_split: dict[str, set[str]] = {}
    for s, lab in zip(pairs["split"].to_pylist(), pairs["label"].to_pylist()):
        by_split.setdefault(s, set()).add(lab)
    if "train" not in by_split or len(by_split) < 2:
        return
    strays = sorted(f"{s}/{lab}" for s, labs in by_split.items() if s != "train" for lab in labs - by_split["train"])
    if not strays:
        return
    msg = (f"{where}: class folders {', '.join(strays[:8])}{' ...' if len(strays) > 8 else ''} exist outside the "
           f"train split only, so their names would become classes the training data never has (a layout like "
           f"val/images/ holds no classes). Say where the class is (label_depth, label_regex), use a table source "
           f"with a label column, or set split_only_classes: warn (keep them, with a warning) or allow.")
    if mode == "error":
        raise SourceError(msg)
    warnings.warn(msg, SourceWarning, stacklevel=2)
