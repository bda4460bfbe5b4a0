"""The pruning-method contract: a method scores the candidate rows of a pool and decides which to keep.

    prepare(rows, inputs) -> rows + the method's columns (joined by uid; null where the input has no value)
    select(candidates, target) -> Decision (keep mask, score, why the others were dropped, a per-cluster table)

The prune stage owns everything around it (the pool, the prior selection a chain step prunes within, rows lacking
a value, files, plots), so a method is a small pure function of columns. Build one with ``create_pruner(spec)``:
``spec["method"]`` picks the member and its strict ``Params`` validate the rest.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from pipeline.errors import InputError
from pipeline.registry import Registry

WhichToKeep = Literal["hard", "easy"]


class PrunerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    method: str


@dataclass(frozen=True)
class Target:
    """How many rows to keep: a ``fraction`` of the candidates or an exact ``count`` (None: the method decides,
    e.g. a score threshold)."""

    fraction: float | None = None
    count: int | None = None

    @property
    def given(self) -> bool:
        return self.fraction is not None or self.count is not None

    def size(self, n: int) -> int:
        if self.count is not None:
            if self.count > n:
                raise ValueError(f"count {self.count} is more than the {n} candidate rows")
            return self.count
        if self.fraction is None:
            raise ValueError("this method needs a target size: give fraction or count")
        return min(n, math.floor(self.fraction * n + 0.5))

    def describe(self) -> str:
        return f"count {self.count}" if self.count is not None else \
            f"fraction {self.fraction:g}" if self.fraction is not None else "threshold"


@dataclass
class Candidates:
    """The rows a step chooses from: ``rows`` (key, uid, split, shard, label, + cluster/distance when a clusters
    input is bound, + the method's columns), the bound input artifacts by name, and the seed."""

    rows: pa.Table
    inputs: dict[str, Path] = field(default_factory=dict)
    seed: int = 0

    def __len__(self) -> int:
        return self.rows.num_rows

    def column(self, name: str, dtype: Any = None) -> np.ndarray:
        return np.asarray(self.rows.column(name).to_numpy(zero_copy_only=False), dtype=dtype)

    def tiebreak(self) -> np.ndarray:
        """Rank of each row's uid: equal scores are ordered by uid, so decisions never depend on row order."""
        order = pc.sort_indices(self.rows["uid"]).to_numpy()
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        return rank


@dataclass
class Decision:
    keep: np.ndarray  # bool per candidate row
    reason: str  # why a dropped row was dropped ("dbp: beyond its cluster's quota")
    score: np.ndarray | None = None  # the method's score per row (NaN where it has none)
    clusters: pa.Table | None = None  # per-cluster table (size, kept, and the method's columns)
    metrics: dict[str, Any] = field(default_factory=dict)


class Pruner:
    """A pruning method. ``needs``: the stage inputs it reads; ``required``: columns every candidate must have
    (rows without them are dropped before ``select`` with the reason ``"<method>: no <column>"``)."""

    name: ClassVar[str]
    Params: ClassVar[type[PrunerParams]] = PrunerParams
    needs: ClassVar[tuple[str, ...]] = ()
    required: ClassVar[tuple[str, ...]] = ()
    sized: ClassVar[bool] = True  # needs a fraction or count (False: may decide its own size, e.g. a threshold)

    def __init__(self, params: PrunerParams) -> None:
        self.params = params

    def wants_target(self) -> bool:
        return self.sized

    def prepare(self, rows: pa.Table, inputs: dict[str, Path]) -> pa.Table:
        return rows

    def select(self, cand: Candidates, target: Target) -> Decision:
        raise NotImplementedError


class ScorePruner(Pruner):
    """A method whose per-row ``score`` comes from its one input artifact (``needs[0]``), joined by uid."""

    required = ("score",)

    def scores(self, artifact: Path) -> pa.Table:
        """uid, score (null where the artifact has no score for a row)."""
        raise NotImplementedError

    def prepare(self, rows: pa.Table, inputs: dict[str, Path]) -> pa.Table:
        return join_column(rows, self.scores(inputs[self.needs[0]]), "score")


PRUNERS: Registry[type[Pruner]] = Registry("pruning method", entry_point_group="distillery.pruners")


def create_pruner(spec: dict[str, Any] | str | PrunerParams) -> Pruner:
    """Build a method from ``{"method": name, ...params}`` (or a bare name for its defaults)."""
    return PRUNERS.create(spec, "method")


# --------------------------------------------------------------------------------------------------------------
# Helpers shared by the methods: pure functions over arrays


def join_column(rows: pa.Table, other: pa.Table, column: str, name: str | None = None) -> pa.Table:
    """``rows`` with ``other[column]`` matched by uid (null where ``other`` has no row), row order kept."""
    pos = pc.index_in(rows["uid"], value_set=other["uid"].combine_chunks())
    values = other[column].combine_chunks()
    taken = pc.take(values, pos) if len(values) else pa.nulls(rows.num_rows, values.type)
    name = name or column
    if name in rows.column_names:
        rows = rows.drop_columns([name])
    return rows.append_column(name, taken)


def ranked(score: np.ndarray, tiebreak: np.ndarray, descending: bool) -> np.ndarray:
    """Row indices by score (highest first when ``descending``), equal scores by ``tiebreak``."""
    s = np.asarray(score, dtype=np.float64)
    return np.lexsort((tiebreak, -s if descending else s))


def take_per_group(order: np.ndarray, groups: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """The first ``quota[g]`` rows of each group ``g`` in ``order`` (groups are small non-negative ints)."""
    order = np.asarray(order, dtype=np.int64)
    g = np.asarray(groups, dtype=np.int64)[order]
    by_group = np.argsort(g, kind="stable")
    gs = g[by_group]
    rank_sorted = np.arange(len(gs)) - np.searchsorted(gs, gs, side="left")
    rank = np.empty(len(gs), dtype=np.int64)
    rank[by_group] = rank_sorted
    return order[rank < np.asarray(quota, dtype=np.int64)[g]]


def mask_of(idx: np.ndarray, n: int) -> np.ndarray:
    m = np.zeros(n, dtype=bool)
    m[np.asarray(idx, dtype=np.int64)] = True
    return m


def group_ids(values: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(distinct integer values, each row's index into them) of an integer column; null is its own group (-1)."""
    v = pc.fill_null(values.cast(pa.int64()), -1).to_numpy()
    uniq, inv = np.unique(v, return_inverse=True)
    return uniq, inv


def proportional_quota(sizes: np.ndarray, n: int) -> np.ndarray:
    """Integer per-group counts summing to ``n`` in proportion to ``sizes`` (largest remainder)."""
    from stages.pruning.quota import largest_remainder

    sizes = np.asarray(sizes, dtype=np.int64)
    return largest_remainder(n * sizes / max(sizes.sum(), 1), n, np.zeros_like(sizes), sizes)


def need_file(path: Path, what: str, hint: str) -> Path:
    if not path.is_file():
        raise InputError(f"{path}: missing ({what}); {hint}")
    return path
