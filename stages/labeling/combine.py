"""``combine``: the weighted average of several sources' probabilities (weights normalised to sum 1; each source's
``weight`` in its own spec), e.g. ``{source: combine, sources: [{source: teacher, weight: 0.5},
{source: neighbours, k: 20, weight: 0.5}]}``. A row gets a value only when every source has one."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from stages.labeling.base import LABEL_SOURCES, LabelSource, SourceParams, create_label_source


class CombineParams(SourceParams):
    source: Literal["combine"] = "combine"
    sources: list[dict[str, Any]] = Field(..., min_length=1)

    @field_validator("sources")
    @classmethod
    def _valid(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [create_label_source(s).params.model_dump(mode="json") for s in v]


def weighted_average(probs: list[np.ndarray], weights: list[float]) -> np.ndarray:
    """Σ w_i p_i / Σ w_i (NaN rows stay NaN)."""
    w = np.asarray(weights, np.float64)
    return sum(wi * p for wi, p in zip(w / w.sum(), probs))  # type: ignore[return-value]


@LABEL_SOURCES.register()
class CombineSource(LabelSource):
    name = "combine"
    Params = CombineParams

    @property
    def members(self) -> list[LabelSource]:
        return [create_label_source(s) for s in self.params.sources]  # type: ignore[attr-defined]

    @property
    def missing_reason(self) -> str:  # type: ignore[override]
        return "combine: a source has no value for this row (" + "; ".join(m.missing_reason for m in self.members) + ")"

    def requires(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(n for m in self.members for n in m.requires()))

    def check(self, inputs: dict[str, Path]) -> None:
        super().check(inputs)  # every input any member needs, named at once
        for m in self.members:
            m.check(inputs)

    def probs(self, rows: pa.Table, inputs: dict[str, Path], classes: list[str]) -> np.ndarray:
        members = self.members
        return weighted_average([m.probs(rows, inputs, classes) for m in members], [m.params.weight for m in members])
