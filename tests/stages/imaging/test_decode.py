"""The shared decode (trainer, sample grids, image statistics) is faithful for every mode, like the shard stage."""
from __future__ import annotations

import numpy as np
from PIL import Image

from imagefiles import encoded, png16
from stages.imaging.decode import decode


def test_decode_16bit_gray_scaled():
    values = np.array([[0, 356, 32767], [32896, 65133, 65535]], dtype=np.uint16)
    out = decode(encoded(Image.fromarray(values), "PNG"), None)
    assert out.dtype == np.uint8 and out.shape == (2, 3, 3)
    assert out[..., 0].tolist() == [[0, 1, 127], [128, 253, 255]] and (out[..., 0] == out[..., 2]).all()


def test_decode_16bit_rgb_exact():
    samples = np.random.default_rng(0).integers(0, 65536, size=(6, 5, 3)).astype(np.uint16)
    out = decode(png16(samples, 2), None)
    assert (out == (samples.astype(np.int64) * 2 + 257) // 514).all()


def test_decode_alpha_and_palette_transparency_over_white():
    rgba = np.array([[[200, 10, 50, 255], [200, 10, 50, 0]]], dtype=np.uint8)
    assert decode(encoded(Image.fromarray(rgba, "RGBA"), "PNG"), None).tolist() == [[[200, 10, 50], [255, 255, 255]]]
    la = Image.fromarray(np.array([[[30, 255], [30, 0]]], dtype=np.uint8), "LA")
    assert decode(encoded(la, "PNG"), None).tolist() == [[[30, 30, 30], [255, 255, 255]]]
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 9, 99, 199] + [0] * 762)
    p.putdata([0, 1])
    assert decode(encoded(p, "PNG", transparency=0), None).tolist() == [[[255, 255, 255], [9, 99, 199]]]


def test_decode_cmyk_jpeg_like_pil_and_gray_jpeg_as_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))
    out = decode(encoded(cmyk, "JPEG", quality=95), None)
    assert out.shape == (16, 16, 3) and np.abs(out[8, 8].astype(int) - [255, 0, 0]).max() <= 4
    gray = decode(encoded(Image.new("L", (8, 8), 77), "JPEG", quality=95), None)
    assert gray.shape == (8, 8, 3) and (np.abs(gray.astype(int) - 77) <= 1).all()


def test_decode_resizes_every_mode_to_the_asked_size():
    rgba = Image.new("RGBA", (40, 20), (0, 0, 0, 0))
    out = decode(encoded(rgba, "PNG"), 16)
    assert out.shape == (16, 16, 3) and (out == 255).all()
