"""``zero-shot``: CLIP zero-shot probabilities. Class names (the pool's ``classes.json``, ``_`` read as a space)
× a prompt-template ensemble go through the open_clip text tower; each class's text embedding is the renormalised
mean of its templates' unit embeddings (CLIP's ensembling); ``softmax(logit_scale · cos(image, class))`` with
CLIP's logit scale 100.

The image embeddings come from the bound ``embeddings`` artifact, which must have been made by the same model:
the text tower is loaded from the embedder spec recorded there (or ``embedder``) through the open_clip embedder
(``stages/embedders/open_clip.py``), and its architecture, weights hash and dimension must match the manifest's.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from pipeline.errors import InputError
from stages.labeling.base import LABEL_SOURCES, LabelSource, SourceParams, embedding_rows, softmax

# a small CIFAR/ImageNet-style ensemble (a subset of CLIP's published CIFAR-10 templates)
TEMPLATES = ("a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
             "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
             "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.")
SAME_MODEL = ("member", "architecture", "weights_sha256", "dim")


class ZeroShotParams(SourceParams):
    source: Literal["zero-shot"] = "zero-shot"
    templates: list[str] = Field(default_factory=lambda: list(TEMPLATES), min_length=1)
    logit_scale: float = Field(100.0, gt=0)
    embedder: str | None = None  # None: the spec the embeddings artifact was made with

    @field_validator("embedder")
    @classmethod
    def _spec(cls, v: str | None) -> str | None:
        """Parsed now (unknown prefixes fail at manifest load), local paths made absolute for the workers. Its
        weights need no fingerprint: they must hash to those of the embeddings input, which are in that id."""
        if v is None:
            return v
        from stages.embedders import resolve_embedder

        member = resolve_embedder(v)
        return v if member.spec.preset else member.normalised_text()


def class_prompts(classes: list[str], templates: list[str]) -> list[str]:
    """Every (class, template) prompt, class-major."""
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"templates need a '{{}}' for the class name: {bad}")
    return [t.format(c.replace("_", " ")) for c in classes for t in templates]


def class_embeddings(text: np.ndarray, n_classes: int) -> np.ndarray:
    """(C, d): per class the renormalised mean of its templates' unit text embeddings (rows class-major)."""
    t = text / np.maximum(np.linalg.norm(text, axis=1, keepdims=True), 1e-12)
    mean = t.reshape(n_classes, -1, t.shape[1]).mean(axis=1)
    return mean / np.maximum(np.linalg.norm(mean, axis=1, keepdims=True), 1e-12)


def zero_shot_probs(image: np.ndarray, classes: np.ndarray, logit_scale: float = 100.0) -> np.ndarray:
    return softmax(logit_scale * (np.asarray(image, np.float64) @ np.asarray(classes, np.float64).T))


def recorded_embedder(embeddings: Path) -> dict[str, Any]:
    info = json.loads((embeddings / "manifest.json").read_text()).get("metrics", {}).get("embedder") or {}
    if info.get("member") != "open_clip":
        raise InputError(f"{embeddings}: label source 'zero-shot' needs embeddings made by an open_clip embedder "
                         f"(image and text towers); these were made by '{info.get('member')}'")
    return info


@LABEL_SOURCES.register()
class ZeroShotSource(LabelSource):
    name = "zero-shot"
    Params = ZeroShotParams
    needs = ("embeddings",)

    missing_reason = "zero-shot: no image embedding for this row"

    def check(self, inputs: dict[str, Path]) -> None:
        super().check(inputs)
        recorded_embedder(inputs["embeddings"])

    def text_tower(self, embeddings: Path, classes: list[str]) -> np.ndarray:
        """(C, d) class embeddings from the text tower of the model that made ``embeddings``."""
        from stages.embedders import create_embedder
        from stages.train.stage_support import device

        p: ZeroShotParams = self.params  # type: ignore[assignment]
        recorded = recorded_embedder(embeddings)
        spec = p.embedder or recorded.get("spec")
        if not spec:
            raise InputError(f"{embeddings}: the manifest records no embedder spec; give the source 'embedder'")
        emb = create_embedder(spec).to(device("auto"))
        differ = {k: (recorded.get(k), emb.info.get(k)) for k in SAME_MODEL if recorded.get(k) != emb.info.get(k)}
        if differ:
            what = ", ".join(f"{k}: {a} vs {b}" for k, a, b in ((k, *v) for k, v in differ.items()))
            raise InputError(f"label source 'zero-shot': the text tower '{spec}' is not the model that made "
                             f"{embeddings} ({what}); image and text must come from the same CLIP")
        text = emb.embed_texts(class_prompts(classes, p.templates), "fp32")
        return class_embeddings(text, len(classes))

    def probs(self, rows: pa.Table, inputs: dict[str, Path], classes: list[str]) -> np.ndarray:
        p: ZeroShotParams = self.params  # type: ignore[assignment]
        image = embedding_rows(inputs["embeddings"], rows.column("uid"))
        ok = ~np.isnan(image).any(axis=1)
        out = np.full((rows.num_rows, len(classes)), np.nan)
        if ok.any():
            out[ok] = zero_shot_probs(image[ok], self.text_tower(inputs["embeddings"], classes), p.logit_scale)
        return out
