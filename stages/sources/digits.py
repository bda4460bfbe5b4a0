"""scikit-learn's handwritten digits (1,797 8x8 images, shipped with the package): the offline quickstart data."""
from __future__ import annotations

import io
from typing import Literal

import numpy as np
import pyarrow as pa

from stages.sources.base import REF_SCHEMA, SOURCES, Mapper, Reader, Scan, Source, SourceParams
from stages.sources.columns import uid_array


class DigitsParams(SourceParams):
    kind: Literal["sklearn-digits"] = "sklearn-digits"
    size: int = 32  # upscaled (nearest) so the standard 32x32 networks apply
    test_every: int = 5  # every 5th sample goes to the test split (stratified by construction order)


def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


class DigitsReader(Reader):
    """Renders digit ``offset`` as a PNG (the ``file`` locator is only a name)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.images, _ = _load()

    def read(self, file: str, offset: int, size: int) -> bytes:
        from PIL import Image

        arr = (self.images[offset] * (255.0 / 16.0)).round().astype(np.uint8)
        img = Image.fromarray(arr, mode="L").resize((self.size, self.size), Image.NEAREST).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=False)
        return buf.getvalue()


@SOURCES.register("sklearn-digits")
class DigitsSource(Source):
    kind = "sklearn-digits"
    Params = DigitsParams
    params: DigitsParams
    location_fields = ()

    def content_fingerprint(self) -> str:
        import sklearn

        return f"sklearn=={sklearn.__version__}"

    def scan(self, map: Mapper) -> Scan:
        _, target = _load()
        n, every = len(target), self.params.test_every
        idx = np.arange(n)
        ident = pa.array([f"digits/{i:04d}.png" for i in range(n)], pa.string())
        test = (idx % every == every - 1) if every else np.zeros(n, dtype=bool)
        refs = pa.table({
            "uid": uid_array(ident), "source": ident, "ext": pa.repeat(pa.scalar("png"), n),
            "split": pa.array(np.where(test, "test", "train")), "label": pa.array(target.astype(str)),
            "caption": pa.nulls(n, pa.string()), "extra": pa.nulls(n, pa.string()),
            "file": pa.repeat(pa.scalar("sklearn-digits"), n), "offset": pa.array(idx, pa.int64()),
            "size": pa.repeat(pa.scalar(-1, pa.int64()), n),
        }, schema=REF_SCHEMA)
        return Scan(refs, classes=[str(i) for i in range(10)])

    def open_reader(self) -> Reader:
        return DigitsReader(self.params.size)
