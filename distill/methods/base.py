"""The contract every distillation method follows, and the registry the distill stage runs them from.

A method is one file with one decorator (``@DISTILL_METHODS.register()``). It declares typed ``Params``, which
inputs it needs (``experts`` for trajectory methods, ``model`` for teacher-based ones), its presets (named after
what they reproduce: ``paper``, ``code-faithful``, ``cpu``; each states the published numbers it targets), and
runs as ``start`` (build the state from a :class:`DistillContext`) then ``step`` per iteration. The state holds
only tensors, optimisers and a generator, so the loop can checkpoint any method the same way.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, Literal, TypeVar

import torch
import yaml
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from pipeline.registry import Registry
from stages.train.model_space import ModelSpace


class MethodParams(BaseModel):
    """Base of every method's params: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")
    iterations: int = 5000
    ipc: int = 1
    init: Literal["real", "noise"] = "real"


P = TypeVar("P", bound=MethodParams)


@dataclass
class DistillContext:
    """What a method may use: the real rows chosen for initialisation (already in ``space``), the classes, and
    the bound inputs (an expert buffer, a teacher) where the method needs them."""

    init_images: Tensor  # float32 (N, C, H, W) in ``space``
    init_labels: Tensor  # int64 (N,)
    num_classes: int
    space: ModelSpace
    device: torch.device = torch.device("cpu")
    experts: Any = None  # distill.buffer.ExpertBuffer
    teacher: Any = None
    seed: int = 0


@dataclass
class MethodState:
    """Everything an iteration changes: the learnable tensors, their optimisers and the random stream."""

    tensors: dict[str, Tensor]  # "images", and "lr" where the method learns one
    optimizers: dict[str, torch.optim.Optimizer]
    generator: torch.Generator
    extra: dict[str, Any] = field(default_factory=dict)  # small picklable values (counters)

    def state_dict(self) -> dict[str, Any]:
        return {"tensors": {k: v.detach().clone() for k, v in self.tensors.items()},
                "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
                "generator": self.generator.get_state(), "extra": dict(self.extra)}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        with torch.no_grad():
            for k, v in d["tensors"].items():
                self.tensors[k].copy_(v)
        for k, o in self.optimizers.items():
            o.load_state_dict(d["optimizers"][k])
        self.generator.set_state(d["generator"])
        self.extra = dict(d["extra"])


@dataclass
class SetOutput:
    """What a method hands the stage: images in the model space, labels, learned lr, and how labels were made."""

    images: Tensor
    labels: Tensor  # int64 (N,) hard, or float32 (N, K) soft
    lr: float | None
    labeller: dict[str, Any]  # {"kind": "hard"} | {"kind": "teacher", ...} | ...
    soft_labels: dict[str, Any] | None = None  # {"kind": "probs", "temperature": T} | {"kind": "logits"}


class DistillMethod(Generic[P]):
    name: ClassVar[str]
    Params: ClassVar[type[MethodParams]]
    needs: ClassVar[frozenset[str]] = frozenset()  # input names: "experts", "model"
    splittable: ClassVar[Literal["none", "classes"]] = "none"  # classes: class groups may run as separate tasks
    presets_file: ClassVar[Path | None] = None

    def check(self, params: P, ctx: DistillContext) -> None:
        """Refuse what cannot work before any iteration runs (raise ValueError with the reason)."""

    def start(self, params: P, ctx: DistillContext) -> MethodState:
        raise NotImplementedError

    def step(self, state: MethodState, params: P, ctx: DistillContext, iteration: int) -> dict[str, float]:
        """One iteration; returns metrics for progress and the loss curve."""
        raise NotImplementedError

    def learned_lr(self, state: MethodState) -> float | None:
        lr = state.tensors.get("lr")
        return float(lr.detach()) if lr is not None else None

    def result(self, state: MethodState, params: P, ctx: DistillContext) -> SetOutput:
        raise NotImplementedError


DISTILL_METHODS: Registry[type[DistillMethod[Any]]] = Registry("distillation method")


class PresetError(ValueError):
    pass


def load_presets(method: type[DistillMethod[Any]]) -> dict[str, Any]:
    if method.presets_file is None:
        return {}
    return yaml.safe_load(Path(method.presets_file).read_text()) or {}


def resolve_params(method: type[DistillMethod[Any]], preset: str | None, dataset: str | None, ipc: int,
                   overrides: dict[str, Any]) -> tuple[MethodParams, dict[str, Any]]:
    """The method's typed params: preset[dataset][ipc] (falling back to its ``default`` entry) under the user's
    overrides; returns them and the preset record (name, source, published numbers, deviations) for the manifest."""
    record: dict[str, Any] = {"preset": preset}
    values: dict[str, Any] = {}
    if preset is not None:
        presets = load_presets(method)
        if preset not in presets:
            raise PresetError(f"method {method.name!r} has no preset {preset!r}; it has {sorted(presets)}")
        p = presets[preset]
        table = p.get("datasets", {})
        if dataset not in table:
            raise PresetError(f"preset {method.name}/{preset} has no entry for dataset {dataset!r}; it has "
                              f"{sorted(table)} (give dataset: or the params yourself with preset: null)")
        by_ipc = table[dataset]
        entry = by_ipc.get(ipc, by_ipc.get(str(ipc)))
        if entry is None:
            raise PresetError(f"preset {method.name}/{preset}/{dataset} has no entry for ipc {ipc}; it has "
                              f"{sorted(by_ipc)}")
        values = {**p.get("defaults", {}), **{k: v for k, v in entry.items() if k not in ("published_top1",)}}
        record.update(dataset=dataset, source=p.get("source"), deviations=p.get("deviations"),
                      published_top1=entry.get("published_top1"))
    params = method.Params(**{**values, **overrides, "ipc": ipc})
    return params, record
