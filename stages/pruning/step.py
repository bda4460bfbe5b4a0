"""One prune step around a method: which pool, which candidate rows (a split of the pool, within the prior
selection of a chain), the columns every method may use, and the kept/dropped tables it hands to the store.

    resolve_pool(inputs) -> the shards artifact all inputs talk about (they must agree)
    step_rows(...)       -> candidates, rows passed through from other splits, rows the prior steps dropped
    run_step(...)        -> StepResult: kept, dropped (this step's and carried), the per-cluster table, metrics
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.errors import InputError
from stages.pruning.base import Candidates, Decision, Pruner, Target
from stages.selections.store import BASE_COLUMNS, Selection

POOL_INPUTS = ("shards", "selection", "clusters", "embeddings")  # the inputs that name a pool
KEPT_SCHEMA = pa.schema([("key", pa.string()), ("uid", pa.string()), ("split", pa.string()), ("shard", pa.int32()),
                         ("label", pa.int32())])
DROP_COLUMNS = [pa.field("reason", pa.string()), pa.field("duplicate_of", pa.string()),
                pa.field("dropped_by", pa.string())]


def _artifact_id(path: Path) -> str:
    return json.loads((path / "manifest.json").read_text())["artifact_id"]


def resolve_pool(inputs: dict[str, Path]) -> Path:
    """The pool: the bound ``shards`` input, else the pool the other inputs record; all must name the same one."""
    from stages.sharding.pool import find_pool

    found: dict[str, Path] = {}
    for name in POOL_INPUTS:
        if name not in inputs:
            continue
        try:
            found[name] = find_pool(inputs[name])
        except InputError:
            if "shards" not in inputs:
                raise
    if not found:
        raise InputError("prune: no input names the pool; bind 'shards' (the shards artifact the rows come from)")
    ids = {name: _artifact_id(path) for name, path in found.items()}
    if len(set(ids.values())) > 1:
        listed = ", ".join(f"{n}: {i[:12]}" for n, i in ids.items())
        raise InputError(f"prune: the inputs come from different pools ({listed})")
    return found.get("shards") or next(iter(found.values()))


def _carried_dropped(prior: Selection, prior_stage: str) -> pa.Table:
    d = prior.dropped
    n = d.num_rows
    by = d["dropped_by"] if "dropped_by" in d.column_names else pa.array([prior_stage] * n, pa.string())
    dup = d["duplicate_of"] if "duplicate_of" in d.column_names else pa.nulls(n, pa.string())
    out = d.select(list(BASE_COLUMNS)).cast(KEPT_SCHEMA)
    return out.append_column("reason", d["reason"].cast(pa.string())).append_column(
        "duplicate_of", dup.cast(pa.string())).append_column("dropped_by", by.cast(pa.string()))


def step_rows(pool: Path, split: str, prior: Selection | None = None, prior_stage: str = "",
              clusters: Path | None = None) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(candidates, kept rows of other splits passed through, rows the prior selection dropped).

    Candidates are the pool's ``split`` rows (within the prior selection's kept rows), in pool order, with the
    clusters artifact's ``cluster`` and ``distance`` joined by uid when it is bound.
    """
    from stages.pruning.base import join_column

    index = pq.read_table(pool / "index.parquet", columns=list(BASE_COLUMNS)).cast(KEPT_SCHEMA)
    rows = index.filter(pc.equal(index["split"], split))
    if rows.num_rows == 0:
        have = sorted(set(index.column("split").to_pylist()))
        raise InputError(f"{pool}: no rows in split '{split}' (have: {', '.join(have)})")
    passed = KEPT_SCHEMA.empty_table()
    carried = pa.schema([*KEPT_SCHEMA, *DROP_COLUMNS]).empty_table()
    if prior is not None:
        rows = rows.filter(pc.is_in(rows["uid"], value_set=prior.kept["uid"].combine_chunks()))
        other = prior.kept.filter(pc.not_equal(prior.kept["split"], split))
        passed = other.select(list(BASE_COLUMNS)).cast(KEPT_SCHEMA)
        carried = _carried_dropped(prior, prior_stage)
    if clusters is not None:
        from stages.clustering.store import load_assignments

        assign = load_assignments(clusters)
        rows = join_column(rows, assign, "cluster")
        rows = join_column(rows, assign, "distance")
    return rows, passed, carried


@dataclass
class StepResult:
    kept: pa.Table
    dropped: pa.Table
    clusters: pa.Table | None
    counts: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)


def _with(table: pa.Table, name: str, values: Any) -> pa.Table:
    if name in table.column_names:
        table = table.drop_columns([name])
    return table.append_column(name, values)


def run_step(pruner: Pruner, rows: pa.Table, inputs: dict[str, Path], target: Target, seed: int,
             passed: pa.Table | None = None, carried: pa.Table | None = None,
             exclude: pa.Array | None = None) -> StepResult:
    """Prepare the method's columns, drop rows lacking them or held out (``exclude``: uids that are never
    candidates), let the method decide, and build the tables."""
    name = pruner.name
    rows = pruner.prepare(rows, inputs)
    lacking = np.zeros(rows.num_rows, dtype=bool)
    why_lacking = np.full(rows.num_rows, None, dtype=object)
    if exclude is not None:
        lacking = pc.is_in(rows["uid"], value_set=exclude).to_numpy(zero_copy_only=False).copy()
        why_lacking[lacking] = "excluded: held out by the exclude input"
    for col in pruner.required:
        null = pc.is_null(rows[col], nan_is_null=True).to_numpy(zero_copy_only=False)
        why_lacking[null & ~lacking] = f"{name}: no {col}"
        lacking |= null
    if rows.num_rows and lacking.all() and exclude is None:
        cols = ", ".join(pruner.required)
        raise InputError(f"prune: none of the {rows.num_rows} candidate rows has a {cols} for method '{name}' "
                         f"(is the {'/'.join(pruner.needs) or 'input'} artifact about another pool or split?)")
    cand_rows = rows.filter(pa.array(~lacking))
    decision: Decision = pruner.select(Candidates(cand_rows, inputs, seed), target)
    if decision.score is not None:
        cand_rows = _with(cand_rows, "score", pa.array(np.asarray(decision.score, np.float64)))
    keep = np.asarray(decision.keep, dtype=bool)
    kept = cand_rows.filter(pa.array(keep))
    here = cand_rows.filter(pa.array(~keep))
    here = _with(here, "reason", pa.array([decision.reason] * here.num_rows, pa.string()))
    no_value = rows.filter(pa.array(lacking))
    no_value = _with(no_value, "reason", pa.array(why_lacking[lacking].tolist(), pa.string()))
    parts = [here, no_value]
    by = f"prune:{name}"
    parts = [_with(_with(t, "duplicate_of", pa.nulls(t.num_rows, pa.string())), "dropped_by",
                   pa.array([by] * t.num_rows, pa.string())) for t in parts]
    if carried is not None and carried.num_rows:
        parts.append(carried)
    dropped = pa.concat_tables(parts, promote_options="default")
    if passed is not None and passed.num_rows:
        kept = pa.concat_tables([kept, passed], promote_options="default")
    reasons = pc.value_counts(pa.concat_arrays([here["reason"].combine_chunks(), no_value["reason"].combine_chunks()])
                              ).to_pylist() if here.num_rows + no_value.num_rows else []
    counts = {"in": rows.num_rows, "out": int(keep.sum()), "rejected": here.num_rows + no_value.num_rows,
              "rejected_by_reason": {r["values"]: r["counts"] for r in reasons},
              "carried": {"kept_other_splits": 0 if passed is None else passed.num_rows,
                          "dropped_before": 0 if carried is None else carried.num_rows},
              "selection": kept.num_rows}
    return StepResult(kept, dropped, decision.clusters, counts, decision.metrics)
