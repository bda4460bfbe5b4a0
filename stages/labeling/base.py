"""The label-source contract: a source turns pool rows into an (n, C) probability matrix, row-aligned with the rows
asked for (NaN rows where it has no value for a row: the relabel stage rejects those with the source's reason).

    create_label_source({"source": "neighbours", "k": 20, "weight": 0.5})
    source.needs                        the relabel stage inputs it reads ("teacher", "embeddings")
    source.check(inputs)                cheap driver-side checks (a teacher without folds, a mismatched embedder)
    source.probs(rows, inputs, classes) rows: key, uid, split, shard, label (the *given* labels)

Every probability a source returns must be **out of sample**: from a model that never fitted that row's given
label (confident learning needs it; a model that memorised a wrong label confirms it).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict, Field

from pipeline.errors import InputError
from pipeline.registry import Registry


class SourceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    source: str
    weight: float = Field(1.0, gt=0)  # its share when sources are combined


class LabelSource:
    name: ClassVar[str]
    Params: ClassVar[type[SourceParams]] = SourceParams
    needs: ClassVar[tuple[str, ...]] = ()
    missing_reason: ClassVar[str] = "no value for this row"  # why a row gets no probabilities (a reject reason)

    def __init__(self, params: SourceParams) -> None:
        self.params = params

    def requires(self) -> tuple[str, ...]:
        return self.needs

    def check(self, inputs: dict[str, Path]) -> None:
        missing = [n for n in self.requires() if n not in inputs]
        if missing:
            raise InputError(f"label source '{self.name}' needs the input(s) {', '.join(missing)} "
                             f"(inputs: {{{', '.join(f'{m}: <step>' for m in missing)}}})")

    def probs(self, rows: pa.Table, inputs: dict[str, Path], classes: list[str]) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return self.params.model_dump(mode="json")


LABEL_SOURCES: Registry[type[LabelSource]] = Registry("label source", entry_point_group="distillery.label_sources")


def create_label_source(spec: dict[str, Any] | str | SourceParams) -> LabelSource:
    """Build a source from ``{"source": name, ...params}`` (or a bare name for its defaults)."""
    return LABEL_SOURCES.create(spec, "source")


# ---- helpers the sources share: pure functions over arrays and tables -------------------------------------------


def align(uids: pa.Array | pa.ChunkedArray, have: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Position in ``have`` of each of ``uids`` (-1 where absent)."""
    if isinstance(have, pa.ChunkedArray):
        have = have.combine_chunks()
    pos = pc.index_in(uids, value_set=have)
    return pc.fill_null(pos, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def take_rows(values: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """``values[pos]`` with NaN rows where ``pos`` is -1."""
    out = np.full((len(pos), values.shape[1]), np.nan, dtype=np.float64)
    ok = pos >= 0
    out[ok] = values[pos[ok]]
    return out


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def embedding_rows(artifact: Path, uids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The embeddings of ``uids`` (float32 unit rows, any split of the artifact), NaN rows where it has none."""
    from stages.embedders.store import load_embeddings

    emb = load_embeddings(artifact, split=None)
    return take_rows(emb.vectors, align(uids, emb.meta.column("uid")))
