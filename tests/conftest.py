"""Shared fixtures: a small image tree with known corrupt files, a Dask client, a runner helper."""
from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "error")


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """Decoded-image caches go to a temporary cache location, never to ~/.cache or into artifacts."""
    old = os.environ.get("DISTILLERY_CACHE_DIR")
    os.environ["DISTILLERY_CACHE_DIR"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if old is None:
        os.environ.pop("DISTILLERY_CACHE_DIR", None)
    else:
        os.environ["DISTILLERY_CACHE_DIR"] = old

REPO = Path(__file__).resolve().parent.parent
CIFAR_TAR = Path(os.environ.get("DISTILLERY_CIFAR10_TAR", REPO.parent / "shared" / "data" / "cifar10-jpeg.tar"))
CLASSES = ("cat", "dog", "frog")


def jpeg_bytes(seed: int, size: int = 32, quality: int = 90) -> bytes:
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3)))
    for _ in range(6):
        x, y = rng.randrange(size), rng.randrange(size)
        img.paste(tuple(rng.randrange(256) for _ in range(3)), (x, y, min(size, x + 8), min(size, y + 8)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bytes(seed: int, size: int = 32) -> bytes:
    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg_bytes(seed, size))).save(buf, format="PNG")
    return buf.getvalue()


def make_tree(root: Path, per_class: int = 6, splits: tuple[str, ...] = ("train", "test"),
              corrupt: bool = True, size: int = 32) -> dict[str, Any]:
    """``root/<split>/<class>/NNNN.jpg`` plus (optionally) one truncated, one garbage and one empty file.

    Returns what a correct shard stage must produce: the counts and the bad files.
    """
    n = 0
    bad: dict[str, str] = {}
    for split in splits:
        for c in CLASSES:
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                (d / f"{i:04d}.jpg").write_bytes(jpeg_bytes(1000 + n, size))
                n += 1
            (d / "extra.png").write_bytes(png_bytes(1000 + n, size))
            n += 1
    if corrupt:
        good = jpeg_bytes(1, size * 4)
        (root / splits[0] / "cat" / "truncated.jpg").write_bytes(good[: len(good) // 2])
        (root / splits[0] / "dog" / "garbage.jpg").write_bytes(b"this is not an image" * 10)
        (root / splits[0] / "frog" / "empty.jpg").write_bytes(b"")
        bad = {f"{splits[0]}/cat/truncated.jpg": "truncated", f"{splits[0]}/dog/garbage.jpg": "undecodable",
               f"{splits[0]}/frog/empty.jpg": "empty"}
        n += 3
    return {"n": n, "bad": bad}


@pytest.fixture(scope="session")
def client():
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as c:
        yield c


def run_pipeline(manifest: dict[str, Any], client: Any = None, until: str | None = None,
                 force: list[str] | None = None, overrides: list[str] | None = None):
    """Validate ``manifest`` (a dict) like a YAML file and run it; returns the stage results."""
    import yaml

    from pipeline.config import load_manifest
    from pipeline.runner import Runner

    out = Path(manifest["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    path = out / "pipeline.yaml"
    path.write_text(yaml.safe_dump(manifest))
    m = load_manifest(path, overrides or [])
    with Runner(m, where=str(path), client=client, show_progress=False) as runner:
        return runner.run(until=until, force=force or [])


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` except run bookkeeping whose content legitimately varies (timings)."""
    skip = {"manifest.json", "run.json", "events.jsonl", "pipeline.yaml", ".plan.json"}
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink() and p.name not in skip and ".parts" not in p.parts:
            out[str(p.relative_to(root))] = p.read_bytes()
    return out


@pytest.fixture(scope="session")
def digits_shards(tmp_path_factory, client):
    """The quickstart digits as a shard artifact (1438 train / 359 test, 32x32)."""
    tmp = tmp_path_factory.mktemp("digits")
    return run_pipeline({"name": "digits", "output_dir": str(tmp / "run"), "source": {"kind": "sklearn-digits"},
                         "stages": [{"name": "shard", "params": {"samples_per_shard": 500}}]}, client)[0]


@pytest.fixture(scope="session")
def cifar_shards(tmp_path_factory, client):
    """The shared CIFAR-10 archive as a shard artifact (skips when the archive is absent)."""
    if not CIFAR_TAR.is_file():
        pytest.skip(f"CIFAR-10 archive not found at {CIFAR_TAR} (../shared/data)")
    tmp = tmp_path_factory.mktemp("cifar")
    return run_pipeline({"name": "cifar", "output_dir": str(tmp / "run"), "source": {"kind": "tar", "path": str(CIFAR_TAR)},
                         "stages": [{"name": "shard", "params": {"samples_per_shard": 10000}}]}, client)[0]
