"""Labels artifacts (kind ``labels``) written directly in their format over a pool, for the consumers' tests
(trainer, validate, export) until the relabel stage that makes them lands."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from curation_fakes import index, write_manifest
from stages.labeling.store import LABELS_FILE, write_labels
from stages.sharding.pool import pool_record


def labels_table(rows: pa.Table, probs: np.ndarray, k: int = 3, actions: list[str] | None = None,
                 threshold: float = 0.3) -> pa.Table:
    """The labels rows for pool ``rows`` from dense probability rows: top-k, multi = {p >= threshold} + label."""
    n = rows.num_rows
    given = rows.column("label").to_numpy().astype(np.int32)
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    suggested = probs.argmax(1).astype(np.int32)
    actions = actions or ["keep"] * n
    label = np.where(np.array(actions) == "relabel", suggested, given).astype(np.int32)
    multi = [sorted(set(np.flatnonzero(p >= threshold).tolist()) | {int(lab)}) for p, lab in zip(probs, label)]
    return pa.table({
        "key": rows.column("key"), "uid": rows.column("uid"), "split": rows.column("split"),
        "shard": rows.column("shard"), "given": given, "label": label,
        "topk_index": pa.array([o.tolist() for o in order], pa.list_(pa.int16())),
        "topk_prob": pa.array([p[o].tolist() for p, o in zip(probs, order)], pa.list_(pa.float32())),
        "multi": pa.array(multi, pa.list_(pa.int16())),
        "noise_score": (1 - probs[np.arange(n), given]).astype(np.float32),
        "flagged": suggested != given, "suggested": suggested, "action": actions})


def fake_labels(path: Path, pool: Path, probs: np.ndarray, k: int = 3, actions: list[str] | None = None,
                split: str = "train", threshold: float = 0.3, extra: pa.Table | None = None) -> Path:
    """A labels artifact for the pool's ``split`` rows (row-aligned with its index order); ``extra`` adds rows."""
    table = labels_table(index(pool, split), probs, k, actions, threshold)
    if extra is not None:
        table = pa.concat_tables([table, extra.cast(table.schema)])
    path.mkdir(parents=True, exist_ok=True)
    write_labels(path / LABELS_FILE, table)
    acts = table.column("action").to_pylist()
    import json

    classes = json.loads((pool / "classes.json").read_text())
    return write_manifest(path, "labels", "relabel", {
        "pool": pool_record(pool), "num_classes": probs.shape[1], "classes": classes,
        "actions": {a: acts.count(a) for a in ("keep", "relabel", "drop")}})


def digit_probs(labels: np.ndarray, num_classes: int = 10, seed: int = 0) -> np.ndarray:
    """Hand-made soft rows: 0.6 on the label, the rest random (rows sum to 1)."""
    g = np.random.default_rng(seed)
    rest = g.dirichlet(np.ones(num_classes), len(labels)) * 0.4
    p = rest.copy()
    p[np.arange(len(labels)), labels] += 0.6
    return p.astype(np.float32)


def noisy_digit_labels(path: Path, pool: Path, k: int = 3) -> Path:
    """Soft rows over the pool's train split; every 7th row dropped, every 11th relabelled to another class."""
    given = index(pool).column("label").to_numpy()
    n = len(given)
    actions = ["drop" if i % 7 == 0 else "relabel" if i % 11 == 0 else "keep" for i in range(n)]
    probs = digit_probs(given)
    wrong = np.array([a == "relabel" for a in actions])
    probs[wrong] = digit_probs((given[wrong] + 1) % 10, seed=1)  # the teacher suggests another class
    return fake_labels(path, pool, probs, k=k, actions=actions)
