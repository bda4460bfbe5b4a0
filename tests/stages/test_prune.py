"""The prune and export stages end to end on the digits pool: a published-style chain (dedup -> CLIP score -> DBP),
its files and plots, a DataComp-style consumer, the export read back with plain webdataset, and validate training on
the selection without exporting it, with its same-size random baseline from the pool."""
from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import run_pipeline
from curation_fakes import clusters_from_vectors, fake_embeddings, fake_selection, index
from stages.selections.store import datacomp_contains, load_selection, pair_to_uid, uid_pairs
from stages.train.image_data import load_images

TINY = {"epochs": 2, "network_kwargs": {"width": 8, "norm": "instancenorm"}, "normalization": {"kind": "pool"}}


@pytest.fixture(scope="module")
def chain(digits_shards, tmp_path_factory, client):
    """dedup (written directly) -> clip-score 80 % -> dbp 50 % -> export, + validate on the DBP selection."""
    tmp = tmp_path_factory.mktemp("chain")
    pool = digits_shards.path
    train = load_images(pool, "train")
    x = train.images.reshape(len(train), -1).astype(np.float64) / 255
    x -= x.mean(0)
    rng = np.random.default_rng(0)
    img = x + 0.05 * rng.normal(size=x.shape)
    txt = x + rng.normal(size=x.shape) * rng.uniform(0.5, 3.0, size=(len(x), 1))  # captions of varying fit
    emb = fake_embeddings(tmp / "embed", pool, img, txt)
    clusters = clusters_from_vectors(tmp / "cluster", pool, x, k=12)
    uids = index(pool).column("uid").to_pylist()
    dedup = fake_selection(tmp / "dedup", pool, set(rng.choice(uids, int(0.9 * len(uids)), replace=False).tolist()))
    results = run_pipeline({"name": "chain", "output_dir": str(tmp / "run"), "stages": [
        {"name": "clip", "stage": "prune", "inputs": {"embeddings": str(emb), "selection": str(dedup)},
         "params": {"method": "clip-score", "fraction": 0.8}},
        {"name": "dbp", "stage": "prune", "inputs": {"clusters": str(clusters), "selection": "clip"},
         "params": {"method": "dbp", "fraction": 0.5, "temperature": 0.1}},
        {"name": "export", "inputs": {"data": "dbp"}, "params": {"samples_per_shard": 200}},
        {"name": "val", "stage": "validate", "inputs": {"train": "dbp"},
         "params": {"recipe": "standard-dd", "overrides": TINY, "seeds": [0]}},
    ]}, client)
    return {r.name: r.path for r in results} | {"pool": pool, "dedup": dedup, "clusters": clusters, "tmp": tmp}


def manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def test_chain_prunes_within_each_prior_with_promised_sizes(chain):
    dedup, clip, dbp = (load_selection(chain[k]) for k in ("dedup", "clip", "dbp"))
    assert set(clip.uids) <= set(dedup.uids) and set(dbp.uids) <= set(clip.uids)
    n_dedup = len(dedup)
    assert len(clip) >= int(0.8 * n_dedup) + 1  # DataComp: keep score >= the value at int(n*f)
    m = manifest(chain["clip"])
    assert m["metrics"]["threshold"] == pytest.approx(min(clip.kept.column("score").to_pylist()))
    assert len(dbp) == int(np.floor(0.5 * len(clip) + 0.5))
    for name in ("clip", "dbp"):
        c = manifest(chain[name])["counts"]
        assert c["in"] == c["out"] + c["rejected"]
    # composition: every cluster keeps exactly its quota, the farthest from its centroid
    per = pq.read_table(chain["dbp"] / "per_cluster.parquet").to_pydict()
    assert sum(per["quota"]) == len(dbp) and per["kept"] == per["quota"]
    got = np.bincount(dbp.kept.column("cluster").to_numpy(), minlength=len(per["cluster"]))
    assert got.tolist() == per["quota"]
    # sizes and d_intra are those of the rows the CLIP step kept, not the whole pool's
    assert sum(per["size"]) == len(clip)
    # the last selection says why every train row of the pool is gone
    pool_train = set(index(chain["pool"]).column("uid").to_pylist())
    dropped = dbp.dropped
    assert set(dbp.uids) | set(dropped.column("uid").to_pylist()) == pool_train
    assert set(dropped.column("dropped_by").to_pylist()) == {"dedup", "prune:clip-score", "prune:dbp"}
    for f in ("clusters.png", "scores.png", "samples.png"):
        assert (chain["dbp"] / f).stat().st_size > 1000, f
    metrics = manifest(chain["dbp"])["metrics"]
    assert metrics["pool"]["artifact_id"] == manifest(chain["pool"])["artifact_id"]
    # the resharder line names the pool's train shards (1438 samples, 500 a shard: 00000..00002)
    assert "/shards/train -o OUT" in metrics["use_with"]["datacomp_resharder"]
    assert metrics["use_with"]["datacomp_resharder"].endswith("--first-shard 0 -n 3")


def pool_samples(pool: Path, split: str = "train"):
    """(uid, key, image sha256) of every sample in the pool's tars, read as a DataComp resharder reads them."""
    for tar in sorted((pool / "shards" / split).glob("*.tar")):
        with tarfile.open(tar) as tf:
            members = {m.name: tf.extractfile(m).read() for m in tf.getmembers()}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                key = name[: -len(".json")]
                image = next(members[f"{key}.{e}"] for e in ("jpg", "png", "webp") if f"{key}.{e}" in members)
                yield meta["uid"], key, hashlib.sha256(image).hexdigest()


def test_datacomp_consumer_selects_the_same_rows(chain):
    sel = load_selection(chain["dbp"])
    # DataComp's resharder: load_subset() memory-maps the file and asserts its dtype is np.dtype("u8,u8")
    u16 = np.dtype("u8,u8")
    subset = np.load(chain["dbp"] / "selection.npy", mmap_mode="r")
    assert subset.dtype == u16
    pairs = [(int(a), int(b)) for a, b in subset]
    assert pairs == sorted(set(pairs)), "sorted and unique, as the resharder's binary search needs"
    assert [pair_to_uid(p) for p in subset] == sorted(sel.uids)
    # ... then, per example, the uid from its json, a key built as it builds it, and two binary searches
    written = {}
    for uid, _, _ in pool_samples(chain["pool"]):
        key = np.array([divmod(int(uid, 16), 2**64)], u16)[0]
        written[uid] = int(np.searchsorted(subset, key, "right") - np.searchsorted(subset, key, "left"))
    assert {u for u, n in written.items() if n} == set(sel.uids) and set(written.values()) == {0, 1}
    assert {u for u, _, _ in pool_samples(chain["pool"]) if datacomp_contains(subset, u)} == set(sel.uids)
    as_datacomp = np.sort(np.array([(int(u[:16], 16), int(u[16:], 16)) for u in sel.uids], np.dtype("u8,u8")))
    assert np.array_equal(as_datacomp.view(np.uint64), uid_pairs(sel.uids).view(np.uint64))


def test_export_reads_back_with_plain_webdataset_exactly_the_selection(chain):
    import webdataset as wds

    sel = load_selection(chain["dbp"])
    out = chain["export"]
    m = manifest(out)
    assert m["kind"] == "shards"
    rw = m["metrics"]["read_with"]["train"]
    assert rw["samples"] == len(sel)
    ds = wds.WebDataset(str(out / rw["pattern"]), shardshuffle=False)
    samples = list(ds.decode("pil").to_tuple("__key__", "jpg;png;webp", "cls", "json"))
    uids = [s[3]["uid"] for s in samples]
    assert len(uids) == len(set(uids)) == len(sel) and set(uids) == set(sel.uids)
    # keys, labels and image bytes are the pool's
    pool_rows = {u: (k, h) for u, k, h in pool_samples(chain["pool"])}
    exported = {u: (k, h) for u, k, h in pool_samples(out)}
    assert exported == {u: pool_rows[u] for u in sel.uids}
    labels = dict(zip(sel.kept.column("uid").to_pylist(), sel.kept.column("label").to_pylist()))
    assert all(s[2] == labels[s[3]["uid"]] for s in samples)
    assert samples[0][1].size == (32, 32)
    # a complete shards artifact: index, per-shard parquet and done markers, the pool's classes and statistics
    idx = pq.read_table(out / "index.parquet")
    assert idx.num_rows == m["counts"]["out"] == m["counts"]["in"] and m["counts"]["rejected"] == 0
    assert m["metrics"]["image_stats"] == manifest(chain["pool"])["metrics"]["image_stats"]
    assert (out / "classes.json").read_text() == (chain["pool"] / "classes.json").read_text()
    assert len(list((out / "shards" / "train").glob("*_stats.json"))) == m["counts"]["splits"]["train"]["shards"] >= 2
    # the split the selection did not cover (test) is copied whole
    assert m["counts"]["splits"]["test"]["out"] == index(chain["pool"], "test").num_rows
    # offsets in the new index point at the images
    r = idx.slice(0, 1).to_pylist()[0]
    with open(out / "shards" / r["split"] / f"{r['shard']:05d}.tar", "rb") as f:
        f.seek(r["offset"])
        assert hashlib.sha256(f.read(r["bytes"])).hexdigest() == r["sha256"]


def test_validate_trains_on_the_selection_and_its_random_baseline_from_the_pool(chain):
    m = json.loads((chain["val"] / "metrics.json").read_text())
    sel = load_selection(chain["dbp"])
    assert m["n_train"] == len(sel)
    assert m["baseline"]["trained"] and m["random_baseline"]["n_train"] == len(sel)
    stats = manifest(chain["pool"])["metrics"]["image_stats"]
    assert m["model_space"]["mean"] == pytest.approx(stats["mean"]), "the pool's statistics, not the subset's"
    assert 0 <= m["top1_mean"] <= 100 and 0 <= m["random_baseline"]["top1_mean"] <= 100


@pytest.mark.slow
def test_cifar10_selection_exports_exactly_and_loads_without_export(cifar_shards, tmp_path, client):
    """The digits chain above at CIFAR-10 scale (50k rows): a class-balanced 30 % selection, exported and read back
    with plain webdataset, equal to what the trainer and the loader API read from the pool."""
    import webdataset as wds

    from stages.train.loaders import load_rows

    res = run_pipeline({"name": "c", "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "sel", "stage": "prune", "inputs": {"shards": str(cifar_shards.path)},
         "params": {"method": "random", "class_balanced": True, "fraction": 0.3}},
        {"name": "export", "inputs": {"data": "sel"}}]}, client)
    sel, out = (r.path for r in res)
    kept = load_selection(sel)
    assert len(kept) == 15_000 and np.bincount(kept.kept.column("label").to_numpy()).tolist() == [1500] * 10
    m = manifest(out)
    uids = [json.loads(s["json"])["uid"] for s in wds.WebDataset(str(out / m["metrics"]["read_with"]["train"]["pattern"]),
                                                                 shardshuffle=False)]
    assert len(uids) == len(set(uids)) == 15_000 and set(uids) == set(kept.uids)
    assert load_rows(sel).uids == uids, "the export keeps the pool's order"
    assert m["counts"]["splits"]["test"]["out"] == 10_000
