"""Stored image bytes -> RGB uint8 arrays, the one decode every consumer (trainer, grids, embedders) shares."""
from __future__ import annotations

import io

import numpy as np


def decode(data: bytes, size: int | None) -> np.ndarray:
    """RGB uint8 H x W x 3; resized (shorter side, centre crop) only if ``size`` is given and differs."""
    arr: np.ndarray | None = None
    if data[:3] == b"\xff\xd8\xff":
        import simplejpeg

        try:
            arr = simplejpeg.decode_jpeg(data, colorspace="RGB")
        except ValueError:
            arr = None
    if arr is None or (size is not None and arr.shape[:2] != (size, size)):
        from PIL import Image

        img = Image.open(io.BytesIO(data)).convert("RGB")
        if size is not None and img.size != (size, size):
            s = size / min(img.size)
            img = img.resize((max(size, round(img.width * s)), max(size, round(img.height * s))), Image.BICUBIC)
            left, top = (img.width - size) // 2, (img.height - size) // 2
            img = img.crop((left, top, left + size, top + size))
        arr = np.asarray(img)
    return arr
