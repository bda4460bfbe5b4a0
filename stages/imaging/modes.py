"""Any PIL image mode -> 8-bit RGB, faithfully: what every consumer of our shards should see.

PIL's own ``convert("RGB")`` clips 16-bit values to white, drops alpha (leaving whatever colour sits behind
transparent pixels) and reads 16-bit colour PNGs by truncating to the high byte. Here 16-bit values are scaled
(``round(v / 257)``), alpha is composited on white, palettes with transparency go through RGBA, CMYK and the
rest through PIL's conversions.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
PLAIN_MODES = ("RGB", "L")


def png_bit_depth(data: bytes) -> int | None:
    """Bit depth from a PNG's IHDR (None for anything else)."""
    if data[:8] != PNG_SIGNATURE or len(data) < 26 or data[12:16] != b"IHDR":
        return None
    return data[24]


def has_alpha(img: Image.Image) -> bool:
    return img.mode in ALPHA_MODES or (img.mode in ("P", "RGB", "L") and "transparency" in img.info)


def is_sixteen_bit(img: Image.Image, data: bytes) -> bool:
    return img.mode in SIXTEEN_BIT_MODES or png_bit_depth(data) == 16


def mode_problems(img: Image.Image, data: bytes) -> list[str]:
    """Why the stored image would mislead a consumer that reads it with PIL (empty: store it as it is).

    Works on a lazily opened image: only the header has been read.
    """
    out = []
    if is_sixteen_bit(img, data):
        out.append("16-bit->8-bit")
    if has_alpha(img):
        out.append(f"{img.mode}{'+transparency' if img.mode in ('P', 'RGB', 'L') else ''}->white")
    elif img.mode not in (*PLAIN_MODES, "P", "1", *SIXTEEN_BIT_MODES):
        out.append(f"{img.mode}->RGB")
    return out


def scale16(values: np.ndarray) -> np.ndarray:
    """16-bit -> 8-bit by ``round(v / 257)`` (65535 -> 255, 0 -> 0; never a tie)."""
    v = np.clip(values.astype(np.int64), 0, 65535)
    return ((v * 2 + 257) // 514).astype(np.uint8)


def composite_white(color: np.ndarray, alpha: np.ndarray, top: int) -> np.ndarray:
    """``color`` (H x W x C, values 0..top) with ``alpha`` (H x W, 0..top) over white, as 8-bit."""
    c = color.astype(np.float64) / top
    a = alpha.astype(np.float64)[..., None] / top
    return np.floor(255.0 * (c * a + (1.0 - a)) + 0.5).astype(np.uint8)


def _png16_samples(data: bytes) -> np.ndarray | None:
    """The true 16-bit samples (H x W x C) of a 16-bit colour PNG, which PIL truncates to their high byte.

    PIL's PNG decoder does the inflating and un-filtering; asking it for the little-endian unpacker on big-endian
    data yields the low bytes. None when this PIL cannot (the caller keeps PIL's high bytes).
    """
    hi_img = Image.open(io.BytesIO(data))
    tile = hi_img.tile[0]
    rawmode = tile.args if isinstance(tile.args, str) else tile.args[0]
    try:
        if rawmode == "LA;16B":  # 4 bytes a pixel: read them raw as 8-bit RGBA, same un-filtering
            raw = _decode_as(data, "RGBA")
            return raw.astype(np.uint16).reshape(*raw.shape[:2], 2, 2) @ np.array([256, 1], dtype=np.uint16)
        if rawmode in ("RGB;16B", "RGBA;16B"):
            hi = np.asarray(hi_img)
            lo = _decode_as(data, rawmode.replace("16B", "16L"))
            return hi.astype(np.uint16) * 256 + lo
    except (ValueError, OSError, TypeError, AttributeError):
        return None
    return None


def _decode_as(data: bytes, rawmode: str) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    tile = img.tile[0]
    args = rawmode if isinstance(tile.args, str) else (rawmode, *tile.args[1:])
    img.tile = [tile._replace(args=args)]
    img.load()
    return np.asarray(img)


def to_rgb8(img: Image.Image, data: bytes) -> Image.Image:
    """Decode ``img`` (opened from ``data``) into an 8-bit RGB image, faithfully (see the module docstring)."""
    if png_bit_depth(data) == 16 and img.mode not in SIXTEEN_BIT_MODES:
        samples = _png16_samples(data)
        if samples is not None:
            if samples.shape[2] in (2, 4):
                color = samples[..., :-1]
                rgb = composite_white(np.repeat(color, 3, axis=2) if color.shape[2] == 1 else color,
                                      samples[..., -1], 65535)
            else:
                rgb = scale16(samples)
            return Image.fromarray(rgb, "RGB")
    if img.mode in SIXTEEN_BIT_MODES:
        gray = scale16(np.asarray(img))
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    if img.mode == "F":
        gray = np.clip(np.floor(np.asarray(img, dtype=np.float64) + 0.5), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=2), "RGB")
    if has_alpha(img):
        rgba = np.asarray(img.convert("RGBA"))
        return Image.fromarray(composite_white(rgba[..., :3], rgba[..., 3], 255), "RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def apply_orientation(img: Image.Image, orientation: int | None) -> Image.Image:
    """Pixels as a viewer shows them, for an EXIF orientation tag (1..8)."""
    op = ORIENTATION_TRANSPOSE.get(orientation or 1)
    return img if op is None else img.transpose(op)
