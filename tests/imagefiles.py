"""Image files made in the tests, byte by byte where PIL cannot make them (16-bit colour PNGs with every
filter, headers claiming 60000 x 60000 pixels)."""
from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def png16(samples: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG of ``samples`` (H x W x C uint16); row y uses filter y % 5 (None, Sub, Up, Average, Paeth)."""
    h, w, c = samples.shape
    bpp = 2 * c
    rows = samples.astype(">u2").reshape(h, w * c).view(np.uint8).astype(np.int32)
    out = bytearray()
    prior = np.zeros(w * bpp, dtype=np.int32)
    for y in range(h):
        row = rows[y]
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), prior[:-bpp]])
        ftype = y % 5
        pred = [np.zeros_like(row), left, prior, (left + prior) // 2, _paeth(left, prior, upleft)][ftype]
        out.append(ftype)
        out += ((row - pred) % 256).astype(np.uint8).tobytes()
        prior = row
    ihdr = struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(bytes(out)))
            + png_chunk(b"IEND", b""))


def png_claiming(width: int, height: int) -> bytes:
    """A valid-looking RGB PNG header (correct CRCs) claiming ``width`` x ``height``, with one tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG whose frame header (SOF0) is patched to claim ``width`` x ``height``."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (10, 200, 30)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()
