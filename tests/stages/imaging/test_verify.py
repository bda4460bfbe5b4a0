"""Images safe (a pixel limit from the header, before any decode) and faithful (every mode to 8-bit RGB)."""
from __future__ import annotations

import io
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from imagefiles import encoded, jpeg_claiming, png16, png_claiming
from stages.imaging.verify import ImageError, ImageOptions, ResizeParams, process

REPO_ROOT = __import__("conftest").REPO


def stored(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


# -- safe ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [jpeg_claiming, png_claiming], ids=["jpeg", "png"])
def test_header_claiming_60000_squared_is_rejected_before_decode(make):
    with pytest.raises(ImageError, match=r"^image too large: "):
        process(make(60000, 60000))


RSS_SCRIPT = textwrap.dedent("""
    import resource, sys
    sys.path.insert(0, sys.argv[2])
    from stages.imaging.verify import ImageError, process
    data = open(sys.argv[1], "rb").read()
    try:
        process(data)
        print("accepted")
    except ImageError as e:
        print(str(e).split(":")[0])
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
""")


def peak_rss_kib(path, tmp_path) -> tuple[str, int]:
    script = tmp_path / "rss.py"
    script.write_text(RSS_SCRIPT)
    out = subprocess.run([sys.executable, str(script), str(path), str(REPO_ROOT)], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    return out[0], int(out[1])


def test_bomb_reject_keeps_worker_rss_small(tmp_path):
    """A 60000 x 60000 claim would need 10.8 GB decoded (the previous code peaked at 10.3 GiB on the JPEG before
    PIL refused it); the process's peak RSS barely moves."""
    small = tmp_path / "small.jpg"
    small.write_bytes(encoded(Image.new("RGB", (16, 16), "red"), "JPEG"))
    verdict, base = peak_rss_kib(small, tmp_path)
    assert verdict == "accepted"
    for name, data in (("bomb.jpg", jpeg_claiming(60000, 60000)), ("bomb.png", png_claiming(60000, 60000))):
        (tmp_path / name).write_bytes(data)
        verdict, peak = peak_rss_kib(tmp_path / name, tmp_path)
        print(f"{name}: peak RSS {peak / 1024:.1f} MiB vs {base / 1024:.1f} MiB for a 16x16 JPEG")
        assert verdict == "image too large"
        assert peak - base < 32 * 1024, f"{name}: peak RSS grew by {(peak - base) / 1024:.0f} MiB"


def test_max_pixels_is_configurable():
    data = encoded(Image.new("RGB", (100, 100), "blue"), "PNG")
    with pytest.raises(ImageError, match=r"image too large: 100x100 = 10000 pixels > max_pixels 9999"):
        process(data, ImageOptions(max_pixels=9999))
    assert process(data, ImageOptions(max_pixels=10000)).width == 100
    with pytest.raises(ImageError, match="image too large"):
        process(encoded(Image.new("RGB", (100, 100), "blue"), "JPEG"), ImageOptions(max_pixels=9999))


def test_decoder_memory_error_is_a_reject(monkeypatch):
    from PIL import ImageFile

    def boom(self):
        raise MemoryError

    monkeypatch.setattr(ImageFile.ImageFile, "load", boom)
    with pytest.raises(ImageError, match=r"^image too large: out of memory decoding 20x10"):
        process(encoded(Image.new("RGB", (20, 10)), "PNG"))


# -- faithful -----------------------------------------------------------------------------------------------
def test_16bit_gray_gradient_scaled_not_clipped():
    values = np.linspace(356, 65133, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    d = process(encoded(Image.fromarray(values), "PNG"))
    px = stored(d.data)
    expected = np.floor(values / 257 + 0.5).astype(np.uint8)
    assert d.ext == "png" and d.original_mode == "I;16" and d.normalised == "16-bit->8-bit"
    assert px.shape == (16, 16, 3) and (px == expected[..., None]).all()
    assert px.min() == 1 and px.max() == 253  # 356/257 -> 1, 65133/257 -> 253.4 -> 253 (not all 255)


@pytest.mark.parametrize("color_type,channels", [(2, 3), (6, 4), (4, 2)], ids=["RGB16", "RGBA16", "LA16"])
def test_16bit_colour_png_exact_with_every_filter(color_type, channels):
    rng = np.random.default_rng(color_type)
    samples = rng.integers(0, 65536, size=(10, 7, channels)).astype(np.uint16)
    samples[..., -1] = 65535 if channels in (2, 4) else samples[..., -1]  # opaque alpha: colour must be exact
    samples[0, 0, -1] = 0 if channels in (2, 4) else samples[0, 0, -1]  # one transparent pixel -> white
    d = process(png16(samples, color_type))
    px = stored(d.data).astype(np.int64)
    color = samples[..., :3] if channels >= 3 else np.repeat(samples[..., :1], 3, axis=2)
    expected = (color.astype(np.int64) * 2 + 257) // 514
    if channels in (2, 4):
        expected[0, 0] = 255
    assert "16-bit->8-bit" in d.normalised
    assert (px == expected).all(), np.argwhere(px != expected)[:5]


def test_rgba_composited_on_white():
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[0] = [[200, 10, 50, 255], [200, 10, 50, 0], [200, 10, 50, 128]]
    rgba[1] = [[0, 0, 0, 64], [255, 255, 255, 200], [10, 20, 30, 1]]
    d = process(encoded(Image.fromarray(rgba, "RGBA"), "PNG"))
    a = rgba[..., 3:].astype(np.float64) / 255
    expected = np.floor(255 * (rgba[..., :3] / 255 * a + 1 - a) + 0.5).astype(np.uint8)
    assert d.ext == "png" and d.original_mode == "RGBA" and d.normalised == "RGBA->white"
    assert (stored(d.data) == expected).all()
    assert stored(d.data)[0, 1].tolist() == [255, 255, 255] and stored(d.data)[0, 0].tolist() == [200, 10, 50]


def test_palette_with_transparency_over_white_and_plain_palette_kept():
    img = Image.new("P", (4, 1))
    img.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 0] + [0] * 759)
    img.putdata([0, 1, 2, 0])
    plain = encoded(img, "PNG")
    d = process(plain)
    assert d.data == plain and d.original_mode == "P" and d.normalised is None
    d = process(encoded(img, "PNG", transparency=2))
    assert d.normalised == "P+transparency->white"
    assert stored(d.data).tolist() == [[[255, 0, 0], [0, 255, 0], [255, 255, 255], [255, 0, 0]]]


def test_palette_converted_before_resizing():
    img = Image.new("P", (64, 64))
    img.putpalette([0, 0, 255, 255, 255, 0] + [0] * 762)
    img.putdata([0 if x < 32 else 1 for _ in range(64) for x in range(64)])
    d = process(encoded(img, "PNG"), ImageOptions(resize=ResizeParams(mode="max_side", size=16, format="png")))
    px = stored(d.data)
    assert px.shape == (16, 16, 3)  # RGB, not palette indices
    assert px[8, 2].tolist() == [0, 0, 255] and px[8, 13].tolist() == [255, 255, 0]


CMYK = [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255), (0, 255, 255, 0), (0, 0, 0, 128)]
RGB_OF_CMYK = [(0, 255, 255), (255, 0, 255), (255, 255, 0), (0, 0, 0), (255, 0, 0), (127, 127, 127)]


def cmyk_stripes() -> Image.Image:
    img = Image.new("CMYK", (16 * len(CMYK), 16))
    for i, c in enumerate(CMYK):
        img.paste(c, (16 * i, 0, 16 * i + 16, 16))
    return img


def test_cmyk_tiff_exact_and_cmyk_jpeg_close():
    d = process(encoded(cmyk_stripes(), "TIFF"))
    assert d.ext == "png" and d.original_mode == "CMYK" and "CMYK->RGB" in d.normalised
    px = stored(d.data)
    assert [px[8, 16 * i + 8].tolist() for i in range(len(CMYK))] == [list(c) for c in RGB_OF_CMYK]
    d = process(encoded(cmyk_stripes(), "JPEG", quality=95))
    assert d.ext == "jpg" and d.normalised == "CMYK->RGB" and stored(d.data).shape[2] == 3
    px = stored(d.data).astype(int)
    for i, c in enumerate(RGB_OF_CMYK):
        assert np.abs(px[8, 16 * i + 8] - np.array(c)).max() <= 6, (i, px[8, 16 * i + 8])


def test_cmyk_jpeg_with_png_resize_is_not_an_error():
    """Was ``OSError: cannot write mode CMYK as PNG`` and a failed stage."""
    d = process(encoded(cmyk_stripes(), "JPEG"), ImageOptions(resize=ResizeParams(size=32, format="png")))
    assert d.ext == "png" and stored(d.data).shape == (5, 32, 3)


def test_grayscale_kept_and_exact():
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    data = encoded(Image.fromarray(gray, "L"), "PNG")
    d = process(data)
    assert d.data == data and d.original_mode == "L" and d.normalised is None
    assert (stored(d.data) == gray).all()
    jpg = encoded(Image.fromarray(gray, "L"), "JPEG")
    d = process(jpg)
    assert d.data == jpg and d.ext == "jpg" and d.original_mode == "L"


def oriented_jpeg(orientation: int) -> bytes:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(img, "JPEG", quality=95, exif=exif.tobytes())


def test_exif_orientation_recorded_when_kept_and_applied_when_reencoded():
    data = oriented_jpeg(6)
    kept = process(data)
    assert kept.data == data and kept.orientation == 6 and (kept.width, kept.height) == (40, 20)
    again = process(data, ImageOptions(resize=ResizeParams(mode="max_side", size=20, format="png")))
    px = stored(again.data)
    assert again.orientation == 6 and "orientation 6 applied" in again.normalised
    assert (again.width, again.height) == (10, 20) and px.shape == (20, 10, 3)
    # orientation 6: the image is shown rotated 90 degrees clockwise, so the left (red) half ends on top
    assert px[2, 5].tolist()[0] > 200 and px[2, 5].tolist()[2] < 60
    assert px[17, 5].tolist()[2] > 200 and px[17, 5].tolist()[0] < 60
    assert process(oriented_jpeg(1)).orientation == 1
    assert process(encoded(Image.new("RGB", (4, 4)), "JPEG")).orientation is None


@pytest.mark.parametrize("fmt,ext,normalised", [
    ("JPEG", "jpg", None), ("PNG", "png", None), ("WEBP", "webp", None), ("BMP", "png", "BMP->PNG"),
    ("GIF", "png", "GIF->PNG"), ("TIFF", "png", "TIFF->PNG"),
])
def test_extensions_are_canonical_whatever_the_file_was_called(fmt, ext, normalised):
    img = Image.new("RGB", (8, 8), (10, 120, 240))
    d = process(encoded(img, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    assert d.ext == ext and d.normalised == normalised
    if normalised:  # lossless formats: the converted pixels are the original ones
        assert stored(d.data)[0, 0].tolist() == [10, 120, 240]


def test_header_verification_trusts_headers_full_verification_decodes():
    good = encoded(Image.new("RGB", (64, 64), "green"), "PNG", compress_level=0)
    truncated = good[: len(good) // 2]
    with pytest.raises(ImageError, match="truncated image"):
        process(truncated)
    assert process(truncated, ImageOptions(verify="header")).data == truncated
    with pytest.raises(ImageError, match="empty file"):
        process(b"", ImageOptions(verify="header"))
    with pytest.raises(ImageError, match="undecodable image"):
        process(b"not an image at all", ImageOptions(verify="header"))
