"""Image bytes in, verified (and, when asked or needed, normalised or resized) image bytes out. No I/O.

Every path checks the pixel count from the header before any decode, so a decompression bomb is a reject,
never a worker killed for memory. Images are kept byte-for-byte unless they must change: a resize was asked
for, or the stored mode would mislead a consumer (16-bit, alpha, CMYK, palette with transparency, a format other
than JPEG/PNG/WebP), in which case they are stored as faithful 8-bit RGB (PNG unless the source was a JPEG).
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict

from stages.imaging.headers import is_jpeg, jpeg_header, jpeg_orientation
from stages.imaging.modes import PLAIN_MODES, apply_orientation, mode_problems, to_rgb8

FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp"}  # kept as they are; others become PNG
EXT_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}
PIL_MAX_PIXELS = 89_478_485  # PIL's default MAX_IMAGE_PIXELS
PIL_HARD_LIMIT = 2 * PIL_MAX_PIXELS  # PIL refuses to open anything larger, whatever we allow
NORMALISED_JPEG_QUALITY = 95


class ImageError(ValueError):
    """The bytes are not a usable image; the message is the reject reason."""


class ResizeParams(BaseModel):
    """Like img2dataset's resize options: shrink, then re-encode with a chosen format and quality."""

    model_config = ConfigDict(extra="forbid")
    mode: Literal["max_side", "center_crop"] = "max_side"
    size: int = 256
    only_if_bigger: bool = True
    format: Literal["jpg", "png", "webp"] = "jpg"
    quality: int = 95


@dataclass(frozen=True)
class ImageOptions:
    resize: ResizeParams | None = None
    max_pixels: int = PIL_MAX_PIXELS
    verify: Literal["full", "header"] = "full"  # header: trust a readable header, decode only to convert


@dataclass(slots=True)  # built once per sample: a frozen dataclass costs ~1 µs more to construct
class Decoded:
    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int
    original_mode: str
    orientation: int | None = None  # the source's EXIF orientation tag (applied when re-encoded)
    normalised: str | None = None  # what was changed to make the stored image faithful, e.g. "16-bit->8-bit"


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageError("undecodable image: zero size")
    if width * height > max_pixels:
        raise ImageError(f"image too large: {width}x{height} = {width * height} pixels > max_pixels {max_pixels}")


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """PIL's lazy open (header only) with its size checked against ``max_pixels``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("undecodable image: not a recognised image format") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"image too large: {e}") from None
    except MemoryError:
        raise ImageError("image too large: out of memory reading the header") from None
    except Exception as e:  # noqa: BLE001 - header parsers raise all kinds of things on garbage
        raise ImageError(f"undecodable image: {type(e).__name__}: {e}") from None
    check_pixels(img.width, img.height, max_pixels)
    return img


def load(img: Image.Image) -> None:
    """Decode every pixel (catches truncated and corrupt files, not just bad headers)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img.load()
    except MemoryError:
        raise ImageError(f"image too large: out of memory decoding {img.width}x{img.height}") from None
    except OSError as e:
        msg = str(e)
        if "truncated" in msg.lower():
            raise ImageError(f"truncated image: {msg}") from None
        raise ImageError(f"undecodable image: {msg}") from None
    except Exception as e:  # noqa: BLE001
        raise ImageError(f"undecodable image: {type(e).__name__}: {e}") from None


def jpeg_decodes(data: bytes) -> bool:
    """Full decode with libjpeg-turbo (~15 µs for 32 px, ~10x cheaper than PIL); False when it refuses, and
    the caller asks PIL, which accepts what a PIL-based loader would and names the problem when it does not."""
    import simplejpeg

    try:
        simplejpeg.decode_jpeg(data, fastdct=True, fastupsample=True)
        return True
    except ValueError:
        return False
    except MemoryError:
        raise ImageError("image too large: out of memory decoding") from None


def resize_needed(size: tuple[int, int], p: ResizeParams) -> bool:
    w, h = size
    if not p.only_if_bigger:
        return True
    if p.mode == "max_side":
        return max(w, h) > p.size
    return min(w, h) > p.size or w != h


def resized(img: Image.Image, p: ResizeParams) -> Image.Image:
    w, h = img.size
    if p.mode == "max_side":
        scale = p.size / max(w, h)
        return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    scale = p.size / min(w, h)  # center_crop: shorter side to size, then crop the centre square
    if scale != 1:
        img = img.resize((max(p.size, round(w * scale)), max(p.size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - p.size) // 2, (h - p.size) // 2
    return img.crop((left, top, left + p.size, top + p.size))


def encode(img: Image.Image, ext: str, quality: int) -> bytes:
    if ext == "jpg" and img.mode not in PLAIN_MODES:
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=EXT_FORMAT[ext], quality=quality)
    return buf.getvalue()


def process(data: bytes, opts: ImageOptions = ImageOptions()) -> Decoded:
    """Verify ``data``; keep it byte-for-byte, or re-encode it when a resize or a faithful mode needs it."""
    if not data:
        raise ImageError("empty file")
    if is_jpeg(data):
        head = jpeg_header(data)
        if head is not None:
            w, h, colorspace = head
            check_pixels(w, h, opts.max_pixels)
            keep = opts.resize is None or not resize_needed((w, h), opts.resize)
            fast = keep and colorspace not in ("CMYK", "YCCK")
            if fast and (opts.verify == "header" or jpeg_decodes(data)):
                return Decoded(data, "jpg", w, h, w, h, "L" if colorspace == "Gray" else "RGB", jpeg_orientation(data))
    return process_pil(data, opts)


def process_pil(data: bytes, opts: ImageOptions) -> Decoded:
    img = open_image(data, opts.max_pixels)
    fmt = img.format or ""
    ow, oh = img.size
    orientation = jpeg_orientation(data) if fmt in ("JPEG", "MPO") else _exif_orientation(img)
    changes = mode_problems(img, data)
    if fmt not in FORMAT_EXT:
        changes.append(f"{fmt or 'unknown format'}->PNG")
    shrink = opts.resize is not None and resize_needed(img.size, opts.resize)
    if opts.verify == "full" or changes or shrink:
        load(img)
    if not changes and not shrink:
        return Decoded(data, FORMAT_EXT[fmt], ow, oh, ow, oh, img.mode, orientation)
    work = img if img.mode in PLAIN_MODES and not changes else to_rgb8(img, data)
    if orientation not in (None, 1):
        work = apply_orientation(work, orientation)
        changes.append(f"orientation {orientation} applied")
    if shrink and opts.resize is not None:
        work = resized(work, opts.resize)
        ext, quality = opts.resize.format, opts.resize.quality
    else:
        ext, quality = ("jpg" if fmt in ("JPEG", "MPO") else "png"), NORMALISED_JPEG_QUALITY
    return Decoded(encode(work, ext, quality), ext, work.width, work.height, ow, oh, img.mode, orientation,
                   ", ".join(changes) or None)


def _exif_orientation(img: Image.Image) -> int | None:
    try:
        o = img.getexif().get(0x0112)
    except Exception:  # noqa: BLE001 - a broken EXIF block is no reason to reject an image
        return None
    return o if isinstance(o, int) and 1 <= o <= 8 else None
