"""``open_clip:<arch>[:<pretrained>]``: an open_clip model loaded by open_clip itself
(``create_model_and_transforms(arch, pretrained=...)``), image and text towers, with its own eval preprocess.

* ``arch``: a built-in name (``ViT-B-32``), a path to a model config ``.json`` (open_clip's format: ``embed_dim``,
  ``vision_cfg``, ``text_cfg``), or open_clip's ``hf-hub:org/repo`` / ``local-dir:/path`` (config and weights
  together; no third field).
* ``pretrained``: a hub tag (``laion2b_s34b_b79k``; open_clip downloads and caches it) or a local weights file
  (``.safetensors``, or a ``.pt``/``.bin`` state dict that open_clip reads with ``weights_only=True``). Without
  it the model is randomly initialised with seed 0 (only useful for tests and throughput measurements).

The manifest records the tag or file, and the sha256 of the file (or of the loaded state for a tag).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.stage import default_cache_dir
from stages.embedders.base import (
    EMBEDDERS, Description, Embedder, Member, PixelEncoder, absolute, file_sha256, probe, seeded, split_preprocess,
    state_sha256,
)

RANDOM_SEED = 0


class TextEncoder(nn.Module):
    """Token ids -> open_clip ``encode_text`` (unnormalised; the store normalises)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def _config_name(path: Path) -> str:
    """Register a user's config file with open_clip under a name unique to its content (a later file with the same
    stem can never shadow it) and return that name."""
    import open_clip

    data = path.read_bytes()
    name = f"{path.stem}-{hashlib.sha256(data).hexdigest()[:12]}"
    if name not in open_clip.list_models():
        folder = default_cache_dir() / "open_clip-configs"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"{name}.json"
        if not target.is_file():
            tmp = folder / f".{name}.{os.getpid()}.json"
            tmp.write_bytes(data)
            os.replace(tmp, target)
        open_clip.add_model_config(target)
    return name


@EMBEDDERS.register("open_clip")
class OpenClip(Member):
    prefix = "open_clip"
    syntax = "open_clip:<arch>[:<pretrained tag or weights file>]"
    has_text = True

    @property
    def _arch_kind(self) -> str:
        name = self.spec.name
        if name.startswith("hf-hub:"):
            return "hub"
        if name.startswith("local-dir:"):
            return "dir"
        return "json" if name.endswith(".json") else "builtin"

    def _weights_kind(self) -> str:
        w = self.spec.weights
        if self._arch_kind in ("hub", "dir"):
            return "bundled"  # open_clip loads the weights that come with the config
        if w is None:
            return "random"
        if self._arch_kind == "builtin":
            from open_clip import is_pretrained_cfg

            if is_pretrained_cfg(self.spec.name, w):
                return "tag"
        return "file"

    def normalised_text(self) -> str:
        name, w = self.spec.name, self.spec.weights
        if self._arch_kind == "json":
            name = absolute(name)
        elif self._arch_kind == "dir":
            name = "local-dir:" + absolute(name[len("local-dir:"):])
        if w is not None and self._weights_kind() == "file":
            w = absolute(w)
        return f"open_clip:{name}" + (f":{w}" if w is not None else "")

    def check(self) -> None:
        import open_clip

        kind, name, w = self._arch_kind, self.spec.name, self.spec.weights
        if kind == "json":
            if not Path(name).is_file():
                raise self.error(f"model config {name} not found")
            cfg = json.loads(Path(name).read_text())
            if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
                raise self.error(f"{name} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)")
        elif kind == "dir":
            if not Path(name[len("local-dir:"):]).is_dir():
                raise self.error(f"folder {name[len('local-dir:'):]} not found")
        elif kind == "builtin" and name not in open_clip.list_models():
            raise self.error(f"unknown open_clip architecture '{name}' (open_clip.list_models() lists them; a .json "
                             "path registers your own)")
        if w is None:
            return
        if kind in ("hub", "dir"):
            raise self.error(f"{kind} models carry their weights: drop ':{w}'")
        if self._weights_kind() == "file" and not Path(w).is_file():
            tags = open_clip.list_pretrained_tags_by_model(name) if kind == "builtin" else []
            raise self.error(f"'{w}' is neither a pretrained tag of {name} (tags: {', '.join(tags) or 'none'}) "
                             "nor an existing weights file")

    def identity(self) -> dict[str, Any]:
        kind, wkind = self._arch_kind, self._weights_kind()
        arch = self.spec.name if kind in ("builtin", "hub") else f"{Path(self.spec.name).stem} ({kind})"
        return {"member": "open_clip", "arch": arch,
                "pretrained": self.spec.weights if wkind == "tag" else wkind}

    def fingerprint(self) -> str:
        parts = []
        if self._arch_kind == "json":
            parts.append(file_sha256(self.spec.name))
        if self._arch_kind == "dir":
            folder = Path(self.spec.name[len("local-dir:"):])
            parts += [f"{p.name}:{file_sha256(p)}" for p in sorted(folder.iterdir()) if p.is_file()]
        if self._weights_kind() == "file":
            parts.append(file_sha256(self.spec.weights))  # type: ignore[arg-type]
        return ",".join(parts)

    def create(self) -> Embedder:
        import open_clip

        arch = _config_name(Path(self.spec.name)) if self._arch_kind == "json" else self.spec.name
        wkind = self._weights_kind()
        pretrained = self.spec.weights if wkind in ("tag", "file") else None
        build = lambda: open_clip.create_model_and_transforms(arch, pretrained=pretrained)  # noqa: E731
        model, _, preprocess = seeded(RANDOM_SEED, build) if wkind == "random" else build()
        model.eval()
        pixels, mean, std = split_preprocess(preprocess)
        image = PixelEncoder(model, "encode_image", mean, std)
        measured = probe(image, pixels)
        if wkind == "file":
            sha = file_sha256(self.spec.weights)  # type: ignore[arg-type]
        else:
            sha = state_sha256(model)
        source = {"random": f"random init (seed {RANDOM_SEED})", "tag": f"open_clip hub tag {self.spec.weights}",
                  "file": str(self.spec.weights), "bundled": self.spec.name}[wkind]
        desc = Description(
            member="open_clip", architecture=self.spec.name if self._arch_kind != "json" else arch,
            pretrained=source, weights_sha256=sha, dim=measured["dim"], image_size=measured["image_size"],
            mean=mean, std=std, preprocess=_describe(preprocess), text=True,
            extra={"weights_hashed": "file" if wkind == "file" else "loaded state",
                   "library": f"open_clip {open_clip.__version__}"})
        tokenizer = open_clip.get_tokenizer(arch)
        return Embedder(image=image, pixels=pixels, info=desc.as_dict(), text=TextEncoder(model),
                        tokenize=tokenizer)


def _describe(preprocess: Any) -> str:
    return " -> ".join(repr(t).replace("\n", " ") for t in getattr(preprocess, "transforms", [preprocess]))
