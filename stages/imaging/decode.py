"""Stored image bytes -> RGB uint8 arrays, the one decode every consumer (trainer, grids, stats) shares.

Every mode comes out as faithful 8-bit RGB (16-bit scaled, alpha over white, CMYK and palettes converted:
``stages.imaging.modes``); EXIF orientation is not applied (shards store upright pixels when they re-encode,
and record the tag in the index when they keep the original bytes).
"""
from __future__ import annotations

import io

import numpy as np

from stages.imaging.headers import is_jpeg, jpeg_header


def decode(data: bytes, size: int | None) -> np.ndarray:
    """RGB uint8 H x W x 3; resized (shorter side, centre crop) only if ``size`` is given and differs."""
    arr: np.ndarray | None = None
    if is_jpeg(data):
        head = jpeg_header(data)
        if head is not None and head[2] not in ("CMYK", "YCCK"):  # CMYK goes through PIL, as at shard time
            import simplejpeg

            try:
                arr = simplejpeg.decode_jpeg(data, colorspace="RGB")
            except ValueError:
                arr = None
    if arr is None or (size is not None and arr.shape[:2] != (size, size)):
        from PIL import Image

        from stages.imaging.modes import to_rgb8

        img = to_rgb8(Image.open(io.BytesIO(data)), data) if arr is None else Image.fromarray(arr)
        if size is not None and img.size != (size, size):
            s = size / min(img.size)
            img = img.resize((max(size, round(img.width * s)), max(size, round(img.height * s))), Image.BICUBIC)
            left, top = (img.width - size) // 2, (img.height - size) // 2
            img = img.crop((left, top, left + size, top + size))
        arr = np.asarray(img)
    return arr
