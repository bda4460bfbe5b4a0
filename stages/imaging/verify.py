"""Image bytes in, verified (and optionally resized) image bytes out. Pure functions, no I/O."""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict

FORMAT_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tif"}
EXT_FORMAT = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}


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
class Decoded:
    data: bytes
    ext: str
    width: int
    height: int
    original_width: int
    original_height: int


def verify(data: bytes) -> Image.Image:
    """Fully decode ``data`` (catches truncated and corrupt files, not just bad headers)."""
    if not data:
        raise ImageError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except UnidentifiedImageError:
        raise ImageError("undecodable image: not a recognised image format") from None
    except OSError as e:
        msg = str(e)
        if "truncated" in msg.lower():
            raise ImageError(f"truncated image: {msg}") from None
        raise ImageError(f"undecodable image: {msg}") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"image too large: {e}") from None
    except Exception as e:  # noqa: BLE001 - decoders raise all kinds of things on garbage
        raise ImageError(f"undecodable image: {type(e).__name__}: {e}") from None
    if img.width == 0 or img.height == 0:
        raise ImageError("undecodable image: zero size")
    return img


def _resized(img: Image.Image, p: ResizeParams) -> Image.Image | None:
    w, h = img.size
    if p.mode == "max_side":
        scale = p.size / max(w, h)
        if scale >= 1 and p.only_if_bigger:
            return None
        return img.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.BICUBIC)
    # center_crop: shorter side to size, then crop the centre square
    scale = p.size / min(w, h)
    if scale >= 1 and p.only_if_bigger and w == h:
        return None
    if scale != 1:
        img = img.resize((max(p.size, round(w * scale)), max(p.size, round(h * scale))), Image.BICUBIC)
    w, h = img.size
    left, top = (w - p.size) // 2, (h - p.size) // 2
    return img.crop((left, top, left + p.size, top + p.size))


def encode(img: Image.Image, fmt: str, quality: int) -> bytes:
    if fmt == "jpg" and img.mode not in ("RGB", "L"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=EXT_FORMAT[fmt], quality=quality)
    return buf.getvalue()


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """Fully decode a JPEG with libjpeg-turbo (simplejpeg: ~15 µs for a 32 px image, ~10x cheaper than PIL).

    Returns (width, height), or None when libjpeg-turbo refuses it: the caller then asks PIL, which
    accepts what a PIL-based training loader would and names the problem when it does not.
    """
    import simplejpeg

    try:
        h, w = simplejpeg.decode_jpeg(data, fastdct=True, fastupsample=True).shape[:2]
        return w, h
    except ValueError:
        return None


def process_many(blobs: list[bytes], exts: list[str], resize: ResizeParams | None) -> list[Decoded | ImageError]:
    """``process`` over a batch; JPEGs that need no resize take the fast decoder."""
    out: list[Decoded | ImageError] = []
    for data, ext in zip(blobs, exts):
        size = jpeg_size(data) if resize is None and is_jpeg(data) else None
        if size is not None:
            out.append(Decoded(data, ext if ext in ("jpg", "jpeg") else "jpg", *size, *size))
            continue
        try:
            out.append(process(data, ext, resize))
        except ImageError as e:
            out.append(e)
    return out


def process(data: bytes, ext: str, resize: ResizeParams | None) -> Decoded:
    """Verify ``data``; resize and re-encode it when asked, else keep the original bytes untouched."""
    img = verify(data)
    ow, oh = img.size
    real_ext = FORMAT_EXT.get(img.format or "", ext or "bin")
    if ext in ("jpeg", "jpg") and real_ext == "jpg":
        real_ext = ext
    if resize is not None:
        small = _resized(img, resize)
        if small is not None:
            return Decoded(encode(small, resize.format, resize.quality), resize.format, small.width, small.height, ow, oh)
    return Decoded(data, real_ext, ow, oh, ow, oh)
