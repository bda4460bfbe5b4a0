"""scikit-learn's handwritten digits (1,797 8x8 images, shipped with the package): the offline quickstart data."""
from __future__ import annotations

import io
from typing import Literal

import numpy as np

from stages.sources.base import SOURCES, Mapper, Reader, SampleRef, Source, SourceParams


class DigitsParams(SourceParams):
    kind: Literal["sklearn-digits"] = "sklearn-digits"
    size: int = 32  # upscaled (nearest) so the standard 32x32 networks apply
    test_every: int = 5  # every 5th sample goes to the test split (stratified by construction order)


def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images, d.target


class DigitsReader(Reader):
    def __init__(self, size: int) -> None:
        self.size = size
        self.images, _ = _load()

    def read(self, ref: SampleRef) -> bytes:
        from PIL import Image

        arr = (self.images[ref.locator[0]] * (255.0 / 16.0)).round().astype(np.uint8)
        img = Image.fromarray(arr, mode="L").resize((self.size, self.size), Image.NEAREST).convert("RGB")
        buf = io.BytesIO()
        img.save(buf, format="PNG", optimize=False)
        return buf.getvalue()


@SOURCES.register("sklearn-digits")
class DigitsSource(Source):
    kind = "sklearn-digits"
    Params = DigitsParams
    params: DigitsParams

    def fingerprint(self) -> str:
        import sklearn

        return f"sklearn=={sklearn.__version__}"

    def scan(self, map: Mapper) -> list[SampleRef]:
        _, target = _load()
        every = self.params.test_every
        return [
            SampleRef(ident=f"digits/{i:04d}.png", ext="png", locator=(i,),
                      split="test" if every and i % every == every - 1 else "train", label=str(int(t)))
            for i, t in enumerate(target)
        ]

    def classes(self) -> list[str]:
        return [str(i) for i in range(10)]

    def open_reader(self) -> Reader:
        return DigitsReader(self.params.size)
