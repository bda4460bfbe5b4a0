"""Export (re-sharding a selection or a shards artifact), the member hook soft labels will use, the loader API for
users' own training, and the trainer's selection loader (no export needed)."""
from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import run_pipeline
from curation_fakes import fake_selection, index, write_manifest
from pipeline.stage import InputArtifact, PlanContext
from stages.export import ExportParams, ExportStage
from stages.imaging.tar_writer import TarShardWriter
from stages.selections.reshard import Item, PoolReader, Writer, read, verify
from stages.selections.store import load_selection
from stages.train.image_data import load_images, stream_batches
from stages.train.loaders import ArtifactDataset, dataloader, load_rows, load_tensors, pool_stats, webdataset
from stages.train.training_sets import load_trainset


@pytest.fixture(scope="module")
def selection(digits_shards, tmp_path_factory):
    """A third of the digits training split, written in the selection format."""
    pool = digits_shards.path
    uids = index(pool).column("uid").to_pylist()
    keep = set(np.random.default_rng(0).choice(uids, len(uids) // 3, replace=False).tolist())
    return fake_selection(tmp_path_factory.mktemp("sel") / "sel", pool, keep, stage="prune")


def test_reshard_rejects_damaged_bytes_and_writes_hook_members(digits_shards, tmp_path):
    import webdataset as wds

    pool = digits_shards.path
    rows = pq.read_table(pool / "index.parquet").slice(0, 5).to_pylist()
    rows[0] = {**rows[0], "caption": "a handwritten digit", "extra": '{"source_url": "x"}'}  # carried along
    rows[1] = {**rows[1], "sha256": "0" * 64}  # the pool's tar no longer holds what its index says
    rows[2] = {**rows[2], "offset": rows[2]["offset"] + 10**9}  # past the end of the tar

    def soft(row):  # what issue 8's labels hook will do: a soft-label vector per sample
        buf = io.BytesIO()
        np.save(buf, np.eye(10, dtype=np.float32)[row["label"]] * 0.9 + 0.01)
        return {"soft.npy": buf.getvalue()}

    with open(tmp_path / "00000.tar", "wb") as f, TarShardWriter(f) as tar, PoolReader(pool) as reader:
        out = list(Writer(tar, 0, [soft])(verify(read((Item(r) for r in rows), reader))))
    assert [it.reject is None for it in out] == [True, False, False, True, True]
    assert out[1].reject.startswith("corrupt") and out[2].reject.startswith("truncated")
    got = list(wds.WebDataset(str(tmp_path / "00000.tar"), shardshuffle=False).decode())
    assert [s["__key__"] for s in got] == [rows[i]["key"] for i in (0, 3, 4)]
    assert all((s["json"]["uid"], s["json"]["key"], s["cls"]) == (rows[i]["uid"], rows[i]["key"], rows[i]["label"])
               for s, i in zip(got, (0, 3, 4)))
    assert np.allclose(got[0]["soft.npy"], np.eye(10)[rows[0]["label"]] * 0.9 + 0.01)
    assert got[0]["txt"] == "a handwritten digit" and got[0]["json"]["extra"] == {"source_url": "x"}
    assert got[0]["json"]["caption"] == "a handwritten digit" and "txt" not in got[1]
    with pytest.raises(ValueError, match="already has"):
        Writer(TarShardWriter(io.BytesIO()), 0, [lambda r: {"cls": b"1"}]).write(Item(rows[0], b"x"))


def test_export_of_a_labels_artifact_needs_its_member_hook(selection, tmp_path):
    labels = write_manifest(tmp_path / "labels", "soft-labels", "relabel")  # a kind no hook is registered for
    inputs = {"data": InputArtifact(selection), "labels": InputArtifact(labels)}
    with pytest.raises(KeyError, match="unknown export member hook 'soft-labels'"):
        ExportStage().plan(inputs, ExportParams(), PlanContext(tmp_path / "out", inputs))


def test_export_reshards_a_shards_artifact_and_drops_or_copies_other_splits(digits_shards, selection, tmp_path, client):
    import webdataset as wds

    pool = digits_shards.path
    res = run_pipeline({"name": "x", "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "all", "stage": "export", "inputs": {"data": str(pool)}, "params": {"samples_per_shard": 300}},
        {"name": "only", "stage": "export", "inputs": {"data": str(selection)},
         "params": {"other_splits": "drop", "sample_grid": False}}]}, client)
    everything, only = (r.path for r in res)
    m = json.loads((everything / "manifest.json").read_text())
    n_train, n_test = index(pool).num_rows, index(pool, "test").num_rows
    assert m["counts"]["splits"]["train"] == {"in": n_train, "out": n_train, "rejected": 0, "shards": 5}
    read_back = [json.loads(s["json"])["uid"] for s in wds.WebDataset(
        str(everything / m["metrics"]["read_with"]["train"]["pattern"]), shardshuffle=False)]
    assert read_back == index(pool).column("uid").to_pylist(), "the pool's order, every row once"
    assert m["counts"]["splits"]["test"]["out"] == n_test
    m2 = json.loads((only / "manifest.json").read_text())
    assert set(m2["counts"]["splits"]) == {"train"} and m2["counts"]["out"] == len(load_selection(selection))
    assert load_trainset(only).uids == load_rows(selection).uids  # the export trains on the same rows


def test_loader_api_gives_exactly_the_selected_rows(digits_shards, selection):
    sel = load_selection(selection)
    rows = load_rows(selection)
    assert rows.selection and len(rows) == len(sel) and set(rows.uids) == set(sel.uids)
    ds = webdataset(selection).to_tuple("__key__", "jpg;png;webp", "cls")
    streamed = list(ds)
    assert sorted(k for k, _, _ in streamed) == sorted(rows.keys)
    images, labels, uids = load_tensors(selection)
    assert uids == rows.uids and images.shape == (len(sel), 32, 32, 3) and images.dtype == torch.uint8
    by_key = {k: (np.asarray(img), c) for k, img, c in streamed}
    keys = rows.table.column("key").to_pylist()
    for i in (0, len(keys) // 2, len(keys) - 1):
        img, c = by_key[keys[i]]
        assert np.array_equal(img, images[i].numpy()) and c == int(labels[i])
    dset = ArtifactDataset(selection, decode="numpy")
    assert np.array_equal(dset[3][0], images[3].numpy()) and dset[3][1] == int(labels[3])
    batch = next(iter(dataloader(selection, batch_size=16, num_workers=0)))
    assert batch[0].shape == (16, 32, 32, 3) and batch[1].dtype == torch.int64
    seen = torch.cat([b[1] for b in dataloader(selection, batch_size=64, num_workers=2, shuffle=True, seed=1)])
    assert torch.equal(seen.sort().values, labels.sort().values), "every row once per pass, across workers"
    full = load_rows(digits_shards.path)
    assert not full.selection and len(full) == index(digits_shards.path).num_rows
    mean, std = pool_stats(selection)
    stats = json.loads((digits_shards.path / "manifest.json").read_text())["metrics"]["image_stats"]
    assert (mean, std) == (stats["mean"], stats["std"])


def test_trainer_selection_loader_memory_and_stream(digits_shards, selection):
    ts = load_trainset(selection)
    pool = load_images(digits_shards.path, "train")
    assert ts.info["mode"] == "memory" and ts.pool is not None and len(ts.pool) == len(pool)
    assert ts.uids == load_rows(selection).uids and len(ts) == len(load_selection(selection))
    pos = {u: i for i, u in enumerate(pool.uids)}
    idx = [pos[u] for u in ts.uids]
    assert torch.equal(ts.images, torch.from_numpy(pool.images[idx]))
    assert torch.equal(ts.targets, torch.from_numpy(pool.labels[idx]))
    assert ts.pool_artifact == digits_shards.path
    streamed = load_trainset(selection, mode="stream")
    assert streamed.info["mode"] == "stream" and len(streamed) == len(ts) and streamed.pool is None
    labels = np.concatenate([lab for _, lab in stream_batches(digits_shards.path, "train", 100, num_workers=0,
                                                              keys=streamed.images.keys)])
    assert len(labels) == len(ts) and np.array_equal(np.sort(labels), np.sort(ts.targets.numpy()))
