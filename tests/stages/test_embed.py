"""The embed stage on real shard artifacts: the clip-retrieval / NeMo layout row-aligned with the shards, identity
(cached re-runs, weights by content not path, precision), rejects, captions, splits, and the checkpoint embedder
giving useful features."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from conftest import jpeg_bytes, make_tree, run_pipeline
from pipeline.errors import InputError
from stages.embedders import EmbedderError, create_embedder
from stages.embedders.base import file_sha256
from stages.embedders.store import iter_parts, load_embeddings, part_files
from stages.sharding.pool import pool_record
from tinyclip import tiny_clip_config, tiny_clip_weights


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    d = tmp_path_factory.mktemp("clip")
    config = tiny_clip_config(d)
    tiny_clip_weights(config, d / "a.safetensors", seed=1)
    tiny_clip_weights(config, d / "b.safetensors", seed=2)
    return {"config": config, "a": d / "a.safetensors", "b": d / "b.safetensors",
            "spec": f"open_clip:{config}:{d / 'a.safetensors'}"}


def embed(shards, out, embedder, client, **params):
    return run_pipeline({"name": "e", "output_dir": str(out), "stages": [
        {"name": "embed", "inputs": {"shards": str(shards)}, "params": {"embedder": embedder, **params}}]}, client)[0]


def manifest(res) -> dict:
    return json.loads((res.path / "manifest.json").read_text())


@pytest.fixture(scope="module")
def digits_emb(digits_shards, clip, tmp_path_factory, client):
    return embed(digits_shards.path, tmp_path_factory.mktemp("emb") / "run", clip["spec"], client, batch_size=100)


def test_layout_rows_align_with_metadata_and_the_shard_index(digits_emb, digits_shards, clip):
    m = manifest(digits_emb)
    assert m["kind"] == "embeddings" and digits_emb.status == "ran"
    c = m["counts"]
    assert c["in"] == c["out"] + c["rejected"] == 1797 and c["rejected"] == 0
    metrics = m["metrics"]
    index = pq.read_table(digits_shards.path / "index.parquet")
    assert metrics["parts"] == sorted(set(index["shard"].to_pylist())) == [0, 1, 2, 3]
    assert metrics["pool"] == pool_record(digits_shards.path)
    emb = metrics["embedder"]
    assert emb["weights_sha256"] == file_sha256(clip["a"]) and emb["member"] == "open_clip"
    assert metrics["dim"] == emb["dim"] == 32 and metrics["dtype"] == "float16" and metrics["normalisation"] == "l2"
    assert metrics["precision"] == "bf16" and metrics["text"] is False
    assert not (digits_emb.path / "text_emb").exists()  # digits have no captions
    embedder = create_embedder(clip["spec"])
    tars = {}
    for n, vec, meta in iter_parts(digits_emb.path):
        raw = np.load(digits_emb.path / part_files(n)["img"], allow_pickle=False)
        assert raw.dtype == np.float16 and raw.shape == (meta.num_rows, 32)
        np.testing.assert_allclose(np.linalg.norm(vec, axis=1), 1, atol=2e-3)
        rows = index.filter(pc.equal(index["shard"], n))
        for col in ("key", "uid", "split", "label"):  # row i of img_emb is row i of the shard, in order
            assert meta[col].to_pylist() == rows[col].to_pylist(), col
        nemo = pq.read_table(digits_emb.path / part_files(n)["nemo"])
        assert nemo["uid"].to_pylist() == meta["uid"].to_pylist()
        np.testing.assert_array_equal(np.stack(nemo["embedding"].to_numpy(zero_copy_only=False)), vec)
        # recompute a few rows from the tar bytes the index points at
        split = rows["split"][0].as_py()
        tar = tars.setdefault(n, (digits_shards.path / "shards" / split / f"{n:05d}.tar").read_bytes())
        pick = [0, meta.num_rows // 2, meta.num_rows - 1]
        data = [tar[o:o + b] for o, b in zip(rows["offset"].to_numpy()[pick], rows["bytes"].to_numpy()[pick])]
        again = embedder.embed_bytes(data, "bf16")
        again /= np.linalg.norm(again, axis=1, keepdims=True)
        np.testing.assert_allclose(vec[pick], again, atol=2e-2)
        assert (vec[pick] * again).sum(1).min() > 0.999
    assert len(load_embeddings(digits_emb.path, "train")) == 1438
    assert len(load_embeddings(digits_emb.path, "test")) == 359


def test_identity_is_cached_by_content_not_location(digits_emb, digits_shards, clip, tmp_path, client):
    out = digits_emb.path.parent
    again = embed(digits_shards.path, out, clip["spec"], client, batch_size=100)
    assert again.status == "cached" and again.artifact_id == digits_emb.artifact_id
    # execution-only settings and a moved (copied) weights file reuse the artifact
    moved = tmp_path / "elsewhere" / "weights.safetensors"
    moved.parent.mkdir()
    shutil.copy(clip["a"], moved)
    same = embed(digits_shards.path, out, f"open_clip:{clip['config']}:{moved}", client, batch_size=7,
                 loader_workers=0, device="cpu")
    assert same.status == "cached" and same.artifact_id == digits_emb.artifact_id
    # other weights at that same path: a new artifact, with other embeddings
    shutil.copy(clip["b"], moved)
    other = embed(digits_shards.path, out, f"open_clip:{clip['config']}:{moved}", client, splits=["test"])
    assert other.status == "ran" and other.artifact_id != digits_emb.artifact_id
    assert manifest(other)["metrics"]["embedder"]["weights_sha256"] == file_sha256(clip["b"])
    assert manifest(other)["metrics"]["parts"] == [3]  # splits: only the test shard
    a, b = load_embeddings(digits_emb.path, "test"), load_embeddings(other.path, "test")
    assert a.uids == b.uids and not np.allclose(a.vectors, b.vectors, atol=1e-2)


def test_precision_is_part_of_the_identity(digits_shards, clip, tmp_path, client):
    fp32 = embed(digits_shards.path, tmp_path / "run", clip["spec"], client, precision="fp32", splits=["test"])
    bf16 = embed(digits_shards.path, tmp_path / "run", clip["spec"], client, splits=["test"])
    assert fp32.artifact_id != bf16.artifact_id
    a, b = load_embeddings(fp32.path, "test").vectors, load_embeddings(bf16.path, "test").vectors
    assert not np.array_equal(a, b) and (a * b).sum(1).min() > 0.99


def test_undecodable_rows_are_rejects_not_failures(tmp_path, clip, client):
    make_tree(tmp_path / "data")  # a truncated jpeg passes 'verify: header' and fails to decode
    shards = run_pipeline({"name": "s", "output_dir": str(tmp_path / "run"),
                           "source": {"kind": "folder", "path": str(tmp_path / "data")},
                           "stages": [{"name": "shard", "params": {"verify": "header", "sample_grid": False}}]},
                          client)[0]
    res = embed(shards.path, tmp_path / "run", clip["spec"], client)
    c = manifest(res)["counts"]
    n_shard = manifest(shards)["counts"]["out"]
    assert c["in"] == n_shard and c["in"] == c["out"] + c["rejected"] and c["rejected"] == 1
    assert c["rejected_by_reason"] == {"undecodable image": 1}
    rejects = pq.read_table(res.path / "rejects.parquet").to_pylist()
    index = {r["uid"]: r for r in pq.read_table(shards.path / "index.parquet").to_pylist()}
    assert len(rejects) == 1 and index[rejects[0]["uid"]]["source"].endswith("cat/truncated.jpg")
    assert "image file is truncated" in rejects[0]["reason"]
    kept = load_embeddings(res.path, None)
    assert rejects[0]["uid"] not in kept.uids and len(kept) == c["out"]


def test_captions_get_text_embeddings(tmp_path, clip, client):
    images = tmp_path / "data"
    (images / "img").mkdir(parents=True)
    captions = ["a red square", None, "two blue dots", "a cat", None, "green"]
    for i in range(len(captions)):
        (images / "img" / f"{i}.jpg").write_bytes(jpeg_bytes(50 + i, 48))
    pq.write_table(pa.table({"path": [f"img/{i}.jpg" for i in range(len(captions))],
                             "caption": pa.array(captions, pa.string())}), images / "table.parquet")
    shards = run_pipeline({"name": "s", "output_dir": str(tmp_path / "run"),
                           "source": {"kind": "table", "path": str(images / "table.parquet")},
                           "stages": [{"name": "shard", "params": {"sample_grid": False}}]}, client)[0]
    res = embed(shards.path, tmp_path / "run", clip["spec"], client, precision="fp32")
    assert manifest(res)["metrics"]["text"] is True
    text = load_embeddings(res.path, None, text=True)
    img = load_embeddings(res.path, None)
    assert text.uids == img.uids and text.vectors.shape == img.vectors.shape
    rows = {r["uid"]: r["caption"] for r in pq.read_table(shards.path / "index.parquet").to_pylist()}
    got = [rows[u] for u in text.uids]
    have = [i for i, cap in enumerate(got) if cap is not None]
    ref = create_embedder(clip["spec"]).embed_texts([got[i] for i in have])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(text.vectors[have], ref, atol=2e-3)
    assert not text.vectors[[i for i, cap in enumerate(got) if cap is None]].any()  # no caption: a zero row
    # a text tower is needed, and captions
    with pytest.raises(EmbedderError, match="text: true, but timm embedders have no text tower"):
        embed(shards.path, tmp_path / "run", "timm:test_vit", client, text=True)


def test_text_without_captions_and_unknown_splits_are_errors(digits_shards, clip, tmp_path, client):
    with pytest.raises(InputError, match="text: true, but no sample in split.* has a caption"):
        embed(digits_shards.path, tmp_path / "run", clip["spec"], client, text=True)
    with pytest.raises(InputError, match=r"no split\(s\) val \(have: train, test\)"):
        embed(digits_shards.path, tmp_path / "run", clip["spec"], client, splits=["val"])


def test_checkpoint_embedder_gives_useful_features(digits_shards, clip, tmp_path, client):
    """Penultimate features of a small teacher trained on digits in the same pipeline (``checkpoint:`` with the
    teacher bound as an input): kNN on them classifies the test split."""
    teacher, res = run_pipeline({"name": "t", "output_dir": str(tmp_path / "run"), "stages": [
        {"name": "teacher", "inputs": {"data": str(digits_shards.path)},
         "params": {"recipe": "standard-dd", "overrides": {"epochs": 8, "network_kwargs": {"width": 16}}}},
        {"name": "embed", "inputs": {"shards": str(digits_shards.path), "teacher": "teacher"},
         "params": {"embedder": "checkpoint:", "precision": "fp32"}}]}, client)
    assert manifest(res)["inputs"]["teacher"] == teacher.artifact_id  # the teacher is in the embeddings' id
    by_path = embed(digits_shards.path, tmp_path / "run", f"checkpoint:{teacher.path}#0", client, precision="fp32",
                    splits=["test"])  # the same teacher named by path: the same rows
    np.testing.assert_array_equal(load_embeddings(by_path.path, "test").vectors,
                                  load_embeddings(res.path, "test").vectors)
    with pytest.raises(InputError, match="no teacher artifact: give its path, or bind the embed stage's 'teacher'"):
        embed(digits_shards.path, tmp_path / "run", "checkpoint:", client)
    with pytest.raises(InputError, match="a 'teacher' input is bound, which only 'checkpoint:'"):
        run_pipeline({"name": "t", "output_dir": str(tmp_path / "run"), "stages": [
            {"name": "embed", "inputs": {"shards": str(digits_shards.path), "teacher": str(teacher.path)},
             "params": {"embedder": clip["spec"]}}]}, client)
    info = manifest(res)["metrics"]["embedder"]
    assert info["member"] == "checkpoint" and info["architecture"] == "convnet"
    assert info["weights_sha256"] == file_sha256(teacher.path / "teachers" / "fold_0.pt")
    assert info["dim"] == 16 * 4 * 4 and info["image_size"] == [32, 32]
    train, test = load_embeddings(res.path, "train"), load_embeddings(res.path, "test")
    labels = lambda e: np.asarray(e.meta["label"].to_pylist())  # noqa: E731
    sims = test.vectors @ train.vectors.T
    nearest = np.argsort(-sims, axis=1)[:, :5]
    votes = labels(train)[nearest]
    pred = np.array([np.bincount(v, minlength=10).argmax() for v in votes])
    knn = float((pred == labels(test)).mean())
    assert knn > 0.85, knn  # chance is 0.10
    # they are the teacher's own penultimate features, in its own model space
    from stages.teacher import load_teacher

    t = load_teacher(teacher.path)
    index = pq.read_table(digits_shards.path / "index.parquet")
    rows = index.filter(pc.equal(index["split"], "test")).slice(0, 4).to_pylist()
    tar = (digits_shards.path / "shards" / "test" / f"{rows[0]['shard']:05d}.tar").read_bytes()
    from stages.imaging.decode import decode

    x = torch.from_numpy(np.stack([decode(tar[r["offset"]:r["offset"] + r["bytes"]], 32) for r in rows]))
    with torch.no_grad():
        ref = t.net.forward_features(t.space.encode(x.permute(0, 3, 1, 2))).flatten(1).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(test.vectors[:4], ref, atol=2e-3)


def test_parts_from_different_weights_are_refused():
    from stages.embed import check_same_model

    info = {"member": "open_clip", "architecture": "tiny", "weights_sha256": "a" * 64, "dim": 32, "spec": "x:/old/w"}
    moved = {**info, "spec": "x:/new/w"}  # a resumed run after moving the file: the same model
    check_same_model([{"embedder": info}, {"embedder": moved}], "x")
    with pytest.raises(InputError, match=r"embedder 'x': parts were made by different models \(weights aaaaaaaaaaaa, "
                                         r"bbbbbbbbbbbb\)"):
        check_same_model([{"embedder": info}, {"embedder": {**info, "weights_sha256": "b" * 64}}], "x")
