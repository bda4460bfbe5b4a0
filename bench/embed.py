"""Benchmark: images/s of the embed stage against open_clip's own plain loop, same model, same images, same machine.

* plain loop: what the open_clip README does, batched: ``create_model_and_transforms`` -> a ``DataLoader`` whose
  workers read each JPEG (from the same shard tar, by offset), ``Image.open`` + ``preprocess`` -> ``encode_image``
  (under ``torch.autocast`` on a GPU, as the README does; bf16 here, like the stage);
* the stage: ``embed`` through the Runner on the local cluster, on a cold cluster (workers import and load the
  model in their first task), then again warm (``--force embed``: the model is already loaded, the steady state),
  alternating with the plain loop for ``--rounds`` rounds (medians: the machine may be shared);
  images/s = images / the stage's run time (plan and finalize excluded; they are reported);
* with CUDA: the model-only ceiling (uint8 batches already on the GPU: normalise + ``encode_image``);
* CPU time per image of each side's preprocessing on one thread (decode + resize + crop to uint8 for the stage;
  the README's ``preprocess`` to a normalised float tensor): on a GPU box with a fast model, what bounds images/s.

Random-init weights (``open_clip:<arch>`` with no tag): throughput does not depend on the weights, and nothing is
downloaded. On a CPU the default model is ViT-S-32 (ViT-B-32 runs at ~4 img/s on 2 shared cores), in fp32 for both
(CPU autocast is not what a CPU user runs); on a GPU ViT-B-32 in bf16.

    python bench/embed.py [--model ViT-S-32] [--images 512] [--batch 64] [--workers 2] [--rounds 3]
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DEFAULT_CIFAR, write_result  # noqa: E402
from shard import cpu_busy  # noqa: E402

LOAD: dict[str, dict[str, float]] = {}


def loaded(name: str) -> None:
    LOAD[name] = {"load_1min": round(os.getloadavg()[0], 2), "others_busy": cpu_busy()}


def make_shards(archive: Path, n: int, per_shard: int, work: Path) -> Path:
    """The first ``n`` CIFAR-10 JPEGs of the archive as a folder, sharded (``per_shard`` a shard)."""
    from pipeline.config import PipelineManifest
    from pipeline.runner import Runner

    src = work / "images" / "train"
    got = 0
    with tarfile.open(archive) as tar:
        for m in tar:
            if got == n:
                break
            if m.isfile() and m.name.lower().endswith((".jpg", ".jpeg", ".png")):
                label = Path(m.name).parent.name
                (src / label).mkdir(parents=True, exist_ok=True)
                (src / label / f"{got:06d}{Path(m.name).suffix}").write_bytes(tar.extractfile(m).read())
                got += 1
    m = PipelineManifest.model_validate({
        "name": "bench-embed-shards", "output_dir": str(work / "shards"),
        "source": {"kind": "folder", "path": str(work / "images")},
        "stages": [{"name": "shard", "params": {"samples_per_shard": per_shard, "sample_grid": False}}]})
    with Runner(m, show_progress=False) as r:
        return r.run()[0].path


class _Images(torch.utils.data.Dataset):
    """The README's dataset: open the image, ``preprocess`` it (PIL decode, resize, crop, ToTensor, Normalize)."""

    def __init__(self, items: list[tuple[str, int, int]], preprocess) -> None:
        self.items, self.preprocess = items, preprocess

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> torch.Tensor:
        from PIL import Image

        path, offset, size = self.items[i]
        with open(path, "rb") as f:
            f.seek(offset)
            return self.preprocess(Image.open(io.BytesIO(f.read(size))))


def index_items(shards: Path) -> list[tuple[str, int, int]]:
    import pyarrow.parquet as pq

    rows = pq.read_table(shards / "index.parquet", columns=["split", "shard", "offset", "bytes"]).to_pylist()
    return [(str(shards / "shards" / r["split"] / f"{r['shard']:05d}.tar"), r["offset"], r["bytes"]) for r in rows]


def plain_model(arch: str, dev: torch.device):
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(arch)
    return model.to(dev).eval(), preprocess


def plain_loop(model, preprocess, items: list[tuple[str, int, int]], batch: int, workers: int,
               dev: torch.device, tag: str = "plain_loop") -> float:
    loaded(tag)
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(_Images(items, preprocess), batch_size=batch, num_workers=workers,
                                         pin_memory=dev.type == "cuda")
    outs = []
    with torch.no_grad(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
        for x in loader:
            outs.append(model.encode_image(x.to(dev, non_blocking=True)))
    if dev.type == "cuda":
        torch.cuda.synchronize()
    features = torch.cat(outs).float().cpu()
    return len(features) / (time.perf_counter() - t0)


def stage_record(res) -> dict:
    from pipeline.artifacts import Artifact

    man = Artifact(res.path).manifest()
    n = man.counts["out"]
    return {"timings": man.timings, "images": n, "images_per_s": round(n / man.timings["run_s"], 2),
            "task_embed_seconds": [p.info["embed_seconds"] for p in man.parts],
            "devices": sorted({p.info["device"] for p in man.parts})}


def alternate(arch: str, shards: Path, items: list[tuple[str, int, int]], work: Path, batch: int, workers: int,
              precision: str, dev: torch.device, rounds: int) -> dict:
    """The stage once on a fresh cluster (cold), then ``rounds`` x (plain loop, stage again on the warm cluster):
    alternating, so both see the same load on a shared machine; the ratio is the median of the rounds'."""
    from pipeline.config import PipelineManifest
    from pipeline.runner import Runner

    m = PipelineManifest.model_validate({
        "name": "bench-embed", "output_dir": str(work / "embed"),
        "stages": [{"name": "embed", "inputs": {"shards": str(shards)},
                    "params": {"embedder": f"open_clip:{arch}", "precision": precision, "batch_size": batch,
                               "loader_workers": workers}}]})
    model, preprocess = plain_model(arch, dev)
    out: dict = {"plain": [], "warm": []}
    loaded("stage_cold")
    with Runner(m, show_progress=False) as r:
        out["cold"] = stage_record(r.run()[0])
        for i in range(rounds):
            out["plain"].append(round(plain_loop(model, preprocess, items, batch, workers, dev, f"plain_loop_{i}"), 2))
            loaded(f"stage_warm_{i}")
            out["warm"].append(stage_record(r.run(force=["embed"])[0]))
    return out


def preprocess_cost(arch: str, items: list[tuple[str, int, int]], n: int = 300) -> dict[str, float]:
    """CPU microseconds per image of each side's per-image work, on one thread: the stage's ``pixels`` (decode,
    resize, crop to uint8) against the README's ``preprocess(Image.open(...))`` (to a normalised float tensor).
    With a GPU doing the model, this is what bounds images/s per CPU core (``performance.md`` §1.3)."""
    import open_clip
    from PIL import Image

    from stages.embedders import create_embedder

    data = []
    for path, offset, size in items[:n]:
        with open(path, "rb") as f:
            f.seek(offset)
            data.append(f.read(size))
    pixels = create_embedder(f"open_clip:{arch}").pixels
    _, _, preprocess = open_clip.create_model_and_transforms(arch)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = {}
    for name, fn in (("stage_pixels", pixels), ("open_clip_preprocess", lambda b: preprocess(Image.open(io.BytesIO(b))))):
        best = float("inf")
        for _ in range(3):
            c0 = time.process_time()
            for b in data:
                fn(b)
            best = min(best, time.process_time() - c0)
        out[name] = round(best / len(data) * 1e6, 1)
    torch.set_num_threads(threads)
    return out


def model_only(arch: str, batch: int, dev: torch.device, steps: int = 20) -> float:
    """The GPU ceiling: uint8 batches already on the device, normalised there, ``encode_image`` in bf16."""
    from stages.embedders import create_embedder

    emb = create_embedder(f"open_clip:{arch}").to(dev)
    size = emb.info["image_size"]
    x = torch.randint(0, 256, (batch, size[0], size[1], 3), dtype=torch.uint8, device=dev)
    for _ in range(3):
        emb.features(x, "bf16")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        emb.features(x, "bf16")
    torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - t0)


def main() -> None:
    cuda = torch.cuda.is_available()
    ap = argparse.ArgumentParser()
    ap.add_argument("--archive", type=Path, default=DEFAULT_CIFAR)
    ap.add_argument("--model", default="ViT-B-32" if cuda else "ViT-S-32")
    ap.add_argument("--images", type=int, default=20000 if cuda else 512)
    ap.add_argument("--batch", type=int, default=512 if cuda else 64)
    ap.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if not args.archive.is_file():
        sys.exit(f"{args.archive}: CIFAR-10 archive not found")
    dev = torch.device("cuda" if cuda else "cpu")
    precision = "bf16" if cuda else "fp32"
    with tempfile.TemporaryDirectory(prefix="bench-embed-") as tmp:
        work = Path(tmp)
        shards = make_shards(args.archive, args.images, max(1, args.images // 2), work)
        items = index_items(shards)
        loaded("preprocess_cost")
        cost = preprocess_cost(args.model, items)
        runs = alternate(args.model, shards, items, work, args.batch, args.workers, precision, dev, args.rounds)
        ceiling = model_only(args.model, args.batch, dev) if cuda else None
    plains = runs["plain"]
    warms = [w["images_per_s"] for w in runs["warm"]]
    ratios = [w / p for w, p in zip(warms, plains)]
    plain, warm, cold = float(np.median(plains)), float(np.median(warms)), runs["cold"]["images_per_s"]
    result = {
        "model": f"open_clip {args.model} (random init)", "images": len(items), "batch_size": args.batch,
        "loader_workers": args.workers, "device": str(dev), "precision": precision, "rounds": args.rounds,
        "images_per_s": {"open_clip_plain_loop": round(plain, 2), "stage_warm": round(warm, 2), "stage_cold": cold,
                         "model_only_ceiling": round(ceiling, 1) if ceiling else None},
        "per_round": {"open_clip_plain_loop": plains, "stage_warm": warms, "ratio": [round(r, 3) for r in ratios]},
        "ratio_stage_warm_vs_plain": round(float(np.median(ratios)), 3),
        "ratio_stage_cold_vs_plain": round(cold / plain, 3),
        "ratio_stage_warm_vs_ceiling": round(warm / ceiling, 3) if ceiling else None,
        "cpu_us_per_image": cost,
        "cpu_cost_ratio_plain_vs_stage": round(cost["open_clip_preprocess"] / cost["stage_pixels"], 2),
        "stage": runs, "machine_load_before": LOAD,
        "notes": ("CIFAR-10 JPEGs (32px, upsampled to the model's 224px by its own preprocess), two shards so the "
                  "two local workers each run a task. stage images/s = images / run time of the stage (tasks on "
                  "the cluster; plan and finalize are in 'timings'); cold includes each worker loading the model. "
                  "The plain loop times loader start to the last batch, model creation excluded. Medians over "
                  "alternating rounds; machine_load_before.others_busy is the fraction of all cores other work kept "
                  "busy in the second before each measurement. "
                  + ("" if ceiling else "No CUDA device: the model-only ceiling is measured only on a GPU (run "
                                        "this script there: ViT-B-32, bf16, batch 512, 20k images by default).")),
    }
    print(f"{args.model} on {dev} ({precision}), {len(items)} images, batch {args.batch}, {args.workers} loader workers")
    for k, v in result["images_per_s"].items():
        print(f"  {k:24s} {v if v is not None else '-'} img/s")
    print(f"  stage warm / plain loop: {result['ratio_stage_warm_vs_plain']}x   cold: {result['ratio_stage_cold_vs_plain']}x")
    print(f"  CPU per image (1 thread): stage {cost['stage_pixels']} us, open_clip preprocess "
          f"{cost['open_clip_preprocess']} us ({result['cpu_cost_ratio_plain_vs_stage']}x)")
    print("load:", LOAD)
    print("wrote", write_result("embed", result))


if __name__ == "__main__":
    main()
