"""A tiny open_clip architecture (a model config written as a file, as a user would) and weights files for it, so
embedder tests load real open_clip code without downloading anything: about a second per model on a CPU."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CLIP = {"embed_dim": 32,
             "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
             "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}}


def tiny_clip_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


def tiny_clip_weights(config: Path, path: Path, seed: int) -> dict[str, torch.Tensor]:
    """Random weights of the tiny architecture (``seed``) saved as ``path`` (.safetensors, else torch.save of the
    state dict); returns the state dict."""
    import open_clip

    from stages.embedders.open_clip import _config_name

    torch.manual_seed(seed)
    model = open_clip.create_model(_config_name(config))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state
