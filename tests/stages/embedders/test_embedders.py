"""Embedders: specs parse through one function that refuses unknown prefixes; a local weights file is really loaded;
the split preprocessing gives exactly open_clip's / timm's own inputs; presets name real models; errors name the spec.

No weights are downloaded: a tiny open_clip architecture (a JSON config, ``tests/tinyclip.py``) and timm's ``test_vit``.
"""
from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import jpeg_bytes, png_bytes
from stages.embedders import EMBEDDERS, EmbedderError, create_embedder, parse_spec, preset_names, resolve_embedder
from stages.embedders.base import PilPixels, file_sha256, load_preset, split_preprocess, state_sha256
from tinyclip import tiny_clip_config, tiny_clip_weights


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    config = tiny_clip_config(d)
    a = tiny_clip_weights(config, d / "a.safetensors", seed=1)
    tiny_clip_weights(config, d / "b.pt", seed=2)
    return {"config": config, "a": d / "a.safetensors", "b": d / "b.pt", "state_a": a}


IMAGES = [jpeg_bytes(3, 32), jpeg_bytes(4, 50), png_bytes(5, 64), jpeg_bytes(6, 24)]


def wide_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (30, 70, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


# ---- specs ----------------------------------------------------------------------------------------------------


def test_specs_parse_through_one_function():
    s = parse_spec("open_clip:ViT-B-32:laion2b_s34b_b79k")
    assert (s.member, s.name, s.weights) == ("open_clip", "ViT-B-32", "laion2b_s34b_b79k")
    assert parse_spec("open_clip:ViT-B-32").weights is None
    s = parse_spec("open_clip:/w/tiny.json:/w/x:y.pt")  # the weights path keeps its colon
    assert (s.name, s.weights) == ("/w/tiny.json", "/w/x:y.pt")
    s = parse_spec("open_clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    assert (s.name, s.weights) == ("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", None)
    s = parse_spec("timm:hf-hub:timm/vit_base_patch16_clip_224.openai:pretrained")
    assert (s.member, s.name, s.weights) == ("timm", "hf-hub:timm/vit_base_patch16_clip_224.openai", "pretrained")
    s = parse_spec("checkpoint:runs/x/teacher#2")
    assert (s.member, s.name, s.weights) == ("checkpoint", "runs/x/teacher", "2")
    assert set(EMBEDDERS.names()) >= {"open_clip", "timm", "checkpoint"}


@pytest.mark.parametrize("spec, message", [
    ("clip:ViT-B-32:openai", r"embedder 'clip:ViT-B-32:openai': unknown prefix 'clip:'; expected one of .*open_clip:"),
    ("ViT-B-32", r"embedder 'ViT-B-32': not a preset \(.*clip-vit-b-32-laion2b.*\) and no '<prefix>:'"),
    ("open_clip:", r"embedder 'open_clip:': nothing after 'open_clip:'"),
])
def test_unknown_prefixes_and_bare_names_are_errors_naming_the_spec(spec, message):
    with pytest.raises(EmbedderError, match=message):
        resolve_embedder(spec)


def test_missing_files_and_unknown_names_are_clear_errors(tmp_path, clip_files):
    cases = {
        f"open_clip:{tmp_path}/nope.json": "model config .*nope.json not found",
        f"open_clip:{clip_files['config']}:{tmp_path}/missing.safetensors":
            "'.*missing.safetensors' is neither a pretrained tag of .* nor an existing weights file",
        "open_clip:ViT-B-32:laion9b_nonsense": r"'laion9b_nonsense' is neither a pretrained tag of ViT-B-32 \(tags: openai, .*laion2b_s34b_b79k",
        "open_clip:ViT-Nope-99": "unknown open_clip architecture 'ViT-Nope-99'",
        "timm:not_a_model_xyz": "unknown timm model 'not_a_model_xyz'",
        f"timm:test_vit:{tmp_path}/w.safetensors": "weights file .*w.safetensors not found",
        f"checkpoint:{tmp_path}/teacher": "teacher artifact .*teacher not found",
    }
    for spec, message in cases.items():
        with pytest.raises(EmbedderError, match=f"embedder '{spec}': {message}"):
            create_embedder(spec)  # checks before loading anything
    (tmp_path / "t" / "teachers").mkdir(parents=True)
    with pytest.raises(EmbedderError, match=r"#3.*no checkpoint .*fold_3.pt \(is it a teacher artifact\? folds: none\)"):
        resolve_embedder(f"checkpoint:{tmp_path}/t#3").check()


def test_presets_name_real_models_and_declare_their_dim():
    """Resolvable without any download: member, architecture and tag (or timm model) all exist."""
    assert preset_names()
    for name in preset_names():
        member = resolve_embedder(name)
        member.check()  # unknown architecture / tag would raise
        assert member.spec.preset == name and isinstance(load_preset(name)["dim"], int)
        assert member.spec.weights is not None, f"preset {name} must name pretrained weights"


# ---- weights are really loaded --------------------------------------------------------------------------------


def test_a_local_weights_file_is_really_loaded(clip_files, tmp_path):
    spec_a = f"open_clip:{clip_files['config']}:{clip_files['a']}"
    a1, a2 = create_embedder(spec_a), create_embedder(spec_a)
    b = create_embedder(f"open_clip:{clip_files['config']}:{clip_files['b']}")
    rand = create_embedder(f"open_clip:{clip_files['config']}")
    va = a1.embed_bytes(IMAGES)
    assert np.array_equal(va, a2.embed_bytes(IMAGES))  # same file: identical embeddings
    assert not np.allclose(va, b.embed_bytes(IMAGES), atol=1e-3)  # another file: other embeddings
    assert not np.allclose(va, rand.embed_bytes(IMAGES), atol=1e-3)
    loaded = {k: v for k, v in a1.image.model.state_dict().items()}
    assert all(torch.equal(loaded[k], v) for k, v in clip_files["state_a"].items())
    assert a1.info["weights_sha256"] == file_sha256(clip_files["a"]) and a1.info["weights_hashed"] == "file"
    assert b.info["weights_sha256"] == file_sha256(clip_files["b"])  # a .pt state dict, read weights_only
    assert rand.info["weights_sha256"] == state_sha256(rand.image.model) != a1.info["weights_sha256"]
    assert a1.info["pretrained"] == str(clip_files["a"]) and rand.info["pretrained"] == "random init (seed 0)"
    # the file is read at load time: the same path with other content gives the other model
    moved = tmp_path / "a.safetensors"
    shutil.copy(clip_files["a"], moved)
    c = create_embedder(f"open_clip:{clip_files['config']}:{moved}")
    assert np.array_equal(c.embed_bytes(IMAGES), va)
    tiny_clip_weights(clip_files["config"], moved, seed=3)
    assert not np.allclose(create_embedder(f"open_clip:{clip_files['config']}:{moved}").embed_bytes(IMAGES), va,
                           atol=1e-3)


def test_description_is_what_the_manifest_needs(clip_files):
    e = create_embedder(f"open_clip:{clip_files['config']}:{clip_files['a']}")
    for key in ("member", "architecture", "pretrained", "weights_sha256", "dim", "dtype", "normalisation",
                "image_size", "mean", "std", "preprocess"):
        assert key in e.info, key
    assert e.info["dim"] == 32 and e.info["image_size"] == [32, 32] and e.info["normalisation"] == "l2"
    assert e.info["mean"] == [0.48145466, 0.4578275, 0.40821073]  # open_clip's constants, as written
    json.dumps(e.info)  # goes into manifest.json as is


# ---- the preprocessing is the library's own -------------------------------------------------------------------


def test_open_clip_embeddings_equal_open_clips_own_loop(clip_files):
    """What the open_clip README does: preprocess(Image.open(f)) -> model.encode_image, in fp32."""
    import open_clip

    from stages.embedders.open_clip import _config_name

    e = create_embedder(f"open_clip:{clip_files['config']}:{clip_files['a']}")
    model, _, preprocess = open_clip.create_model_and_transforms(_config_name(clip_files["config"]),
                                                                 pretrained=str(clip_files["a"]))
    images = [*IMAGES, wide_jpeg()]
    with torch.no_grad():
        ref = model.eval().encode_image(torch.stack([preprocess(Image.open(io.BytesIO(b))) for b in images]))
    np.testing.assert_allclose(e.embed_bytes(images), ref.numpy(), rtol=0, atol=1e-5)
    # the text tower too
    tok = open_clip.get_tokenizer(_config_name(clip_files["config"]))
    with torch.no_grad():
        ref_t = model.encode_text(tok(["a cat", "two dogs"]))
    np.testing.assert_allclose(e.embed_texts(["a cat", "two dogs"]), ref_t.numpy(), rtol=0, atol=1e-5)


def test_timm_embeddings_equal_timms_own_loop():
    import timm
    from timm.data import create_transform, resolve_data_config

    e = create_embedder("timm:test_vit")
    torch.manual_seed(0)
    model = timm.create_model("test_vit", pretrained=False, num_classes=0).eval()
    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    images = [*IMAGES, wide_jpeg()]
    with torch.no_grad():
        ref = model(torch.stack([transform(Image.open(io.BytesIO(b)).convert("RGB")) for b in images]))
    assert e.info["image_size"] == [160, 160] and e.dim == ref.shape[1]
    np.testing.assert_allclose(e.embed_bytes(images), ref.numpy(), rtol=0, atol=1e-5)
    assert e.text is None
    with pytest.raises(EmbedderError, match="has no text tower"):
        e.embed_texts(["a cat"])


def test_a_preprocess_that_cannot_be_split_runs_whole_in_the_workers():
    from torchvision import transforms as T

    full = T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor(), T.Normalize([0.5] * 3, [0.25] * 3),
                      T.Lambda(lambda x: x * 2)])
    pixels, mean, std = split_preprocess(full)
    assert mean is None and isinstance(pixels, PilPixels) and pixels.full
    x = pixels(jpeg_bytes(1, 40))
    assert x.dtype == np.float32 and x.shape == (3, 16, 16)
    split, mean, std = split_preprocess(T.Compose(full.transforms[:4]))
    assert mean == [0.5] * 3 and std == [0.25] * 3 and split(jpeg_bytes(1, 40)).dtype == np.uint8


def test_bf16_is_close_to_fp32_but_not_equal(clip_files):
    """Why precision is part of the artifact id: bf16 autocast changes the numbers (slightly)."""
    e = create_embedder(f"open_clip:{clip_files['config']}:{clip_files['a']}")
    f32, b16 = e.embed_bytes(IMAGES, "fp32"), e.embed_bytes(IMAGES, "bf16")
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    cos = (unit(f32) * unit(b16)).sum(1)
    assert not np.array_equal(f32, b16) and cos.min() > 0.99
