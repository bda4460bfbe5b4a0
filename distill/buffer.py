"""Expert-trajectory buffers (MTT, FTD, TESLA, FYI-MTT): the file format, one expert per file, and its reader.

Buffer format ``distillery.expert.v1``: a directory of ``expert_{i:04d}.pt`` files, one expert each (TESLA's
layout, so a buffer grows and resumes one expert at a time). Each file is a ``torch.save``'d dict::

    format          "distillery.expert.v1"
    network         create_network name, e.g. "convnet"
    network_kwargs  the other create_network arguments, including in_channels and image_size
    num_classes     int
    epochs          E, number of training epochs recorded
    lr              expert learning rate (MTT: lr_teacher, also the usual init of the learned syn_lr)
    params          float32 Tensor [E + 1, P]: flat parameters (networks.flat_params order) at init and after
                    every epoch
    meta            dict: seed, batch_size, augmentation, normalisation mean/std (synthetic images must live in
                    the same space), test accuracy, wall time

Files are written atomically, loaded with ``weights_only=True`` and validated; every error names the file.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from pipeline.atomic import atomic_path
from stages.train.networks import create_network, num_params

EXPERT_FORMAT = "distillery.expert.v1"
_FIELDS: dict[str, type | tuple[type, ...]] = {
    "format": str, "network": str, "network_kwargs": dict, "num_classes": int, "epochs": int,
    "lr": (float, int), "params": Tensor, "meta": dict}


class ExpertFormatError(ValueError):
    """A missing, truncated, foreign or inconsistent expert file; the message starts with its path."""


@dataclass(frozen=True)
class Expert:
    network: str
    network_kwargs: dict[str, Any]
    num_classes: int
    epochs: int
    lr: float
    params: Tensor  # [epochs + 1, P] float32
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def network_at(self, epoch: int) -> nn.Module:
        """A network holding the expert's weights after ``epoch`` epochs (0 = init)."""
        net = create_network(self.network, self.num_classes, **self.network_kwargs)
        torch.nn.utils.vector_to_parameters(self.params[epoch].clone(), net.parameters())
        return net


def save_expert(path: str | Path, expert: Expert) -> Path:
    """Write one expert file atomically (a killed writer leaves no partial ``expert_*.pt``)."""
    payload = {"format": EXPERT_FORMAT, "network": expert.network, "network_kwargs": dict(expert.network_kwargs),
               "num_classes": expert.num_classes, "epochs": expert.epochs, "lr": float(expert.lr),
               "params": expert.params.detach().to(torch.float32).contiguous().cpu(), "meta": dict(expert.meta)}
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def load_expert(path: str | Path, *, check_network: bool = True) -> Expert:
    """Read and validate one expert file. ``check_network`` compares P with the network (built on 'meta')."""
    path = Path(path)

    def fail(problem: str) -> ExpertFormatError:
        return ExpertFormatError(f"{path}: {problem}")

    if not path.is_file():
        raise fail("no such expert file")
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise fail(f"unreadable, probably truncated or not a torch file ({type(e).__name__}: {e})") from e
    if not isinstance(d, dict):
        raise fail(f"expected a dict, found {type(d).__name__}")
    if d.get("format") != EXPERT_FORMAT:
        raise fail(f"format is {d.get('format')!r}, expected {EXPERT_FORMAT!r}")
    missing = sorted(set(_FIELDS) - set(d))
    if missing:
        raise fail(f"missing keys {missing}")
    wrong = [k for k, t in _FIELDS.items() if not isinstance(d[k], t)]
    if wrong:
        raise fail("wrong types for " + ", ".join(f"{k} ({type(d[k]).__name__})" for k in wrong))
    params, epochs = d["params"], d["epochs"]
    if params.dtype != torch.float32 or params.dim() != 2 or params.shape[0] != epochs + 1:
        raise fail(f"params must be float32 [epochs + 1 = {epochs + 1}, P], found {params.dtype} "
                   f"{list(params.shape)} (incomplete trajectory?)")
    if check_network:
        try:
            with torch.device("meta"):
                expected = num_params(create_network(d["network"], d["num_classes"], **d["network_kwargs"]))
        except Exception as e:
            raise fail(f"cannot build network {d['network']!r} with {d['network_kwargs']} ({e})") from e
        if params.shape[1] != expected:
            raise fail(f"params hold {params.shape[1]} values per snapshot, network {d['network']!r} has {expected}")
    bad = (~torch.isfinite(params)).any(1).nonzero().flatten().tolist()
    if bad:
        raise fail(f"params contain NaN/inf at snapshots {bad[:10]}")
    return Expert(d["network"], d["network_kwargs"], d["num_classes"], epochs, float(d["lr"]), params, d["meta"],
                  path)


def expert_path(directory: str | Path, index: int) -> Path:
    return Path(directory) / f"expert_{index:04d}.pt"


class ExpertBuffer(Sequence[Expert]):
    """The experts in a directory, loaded lazily and checked against each other (same network, classes, P)."""

    def __init__(self, directory: str | Path, *, check_network: bool = True) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise ExpertFormatError(f"{self.directory}: no such expert buffer directory")
        self.paths = sorted(self.directory.glob("expert_*.pt"))
        if not self.paths:
            raise ExpertFormatError(f"{self.directory}: no expert_*.pt files")
        self.check_network = check_network
        self._reference: tuple[Path, tuple[Any, ...]] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Expert:  # type: ignore[override]
        expert = load_expert(self.paths[index], check_network=self.check_network)
        signature = (expert.network, expert.network_kwargs, expert.num_classes, expert.params.shape[1])
        if self._reference is None:
            self._reference = (self.paths[index], signature)
        elif signature != self._reference[1]:
            raise ExpertFormatError(f"{self.paths[index]}: expert {signature} does not match "
                                    f"{self._reference[0].name} {self._reference[1]}")
        return expert

    def trajectories(self) -> Iterator[Tensor]:
        """Each expert's [E + 1, P] parameter trajectory, in file order."""
        for i in range(len(self)):
            yield self[i].params
