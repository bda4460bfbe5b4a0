"""The shard stage on every source kind, with corrupt inputs, duplicates, splits and resizing."""
from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from stages.imaging.grid import read_at
from conftest import CLASSES, jpeg_bytes, make_tree, run_pipeline, tree_bytes


def shard_manifest(tmp: Path, source: dict, **params) -> dict:
    return {"name": "t", "output_dir": str(tmp / "run"), "source": source,
            "stages": [{"name": "shard", "params": {"samples_per_shard": 4, **params}}]}


def check_invariants(art: Path) -> dict:
    """What must hold for every shard artifact: in = out + rejected, files agree with the index."""
    m = json.loads((art / "manifest.json").read_text())
    c = m["counts"]
    assert c["in"] == c["out"] + c["rejected"]
    index = pq.read_table(art / "index.parquet").to_pylist()
    rejects = pq.read_table(art / "rejects.parquet").to_pylist()
    assert len(index) == c["out"] and len(rejects) == c["rejected"]
    assert len({r["key"] for r in index}) == len(index), "keys must be unique"
    assert len({r["uid"] for r in index}) == len(index), "uids must be unique"
    members: dict[str, bytes] = {}
    for tar in sorted((art / "shards").rglob("*.tar")):
        assert (tar.parent / f"{tar.stem}_stats.json").is_file(), "every tar has its done-marker"
        with tarfile.open(tar) as tf:
            for mem in tf:
                members[mem.name] = tf.extractfile(mem).read()
    import hashlib

    for r in index:
        data = members[f"{r['key']}.{r['ext']}"]
        tar = art / "shards" / r["split"] / f"{r['shard']:05d}.tar"
        assert read_at(tar, r["offset"], r["bytes"]) == data, "index offsets give random access"
        assert hashlib.sha256(data).hexdigest() == r["sha256"] and len(data) == r["bytes"]
        meta = json.loads(members[f"{r['key']}.json"])
        assert meta["uid"] == r["uid"] and meta["source"] == r["source"]
        if r["label"] is not None:
            assert int(members[f"{r['key']}.cls"]) == r["label"]
    # every file listed in the manifest exists with that hash
    for part in m["parts"]:
        for f in part["files"]:
            assert (art / f["path"]).stat().st_size == f["bytes"]
    return {"manifest": m, "index": index, "rejects": rejects}


def test_folder_tree_with_splits_and_corrupt_files(tmp_path, client):
    info = make_tree(tmp_path / "src", per_class=5)
    res = run_pipeline(shard_manifest(tmp_path, {"kind": "folder", "path": str(tmp_path / "src")}), client)
    art = res[0].path
    out = check_invariants(art)
    c = out["manifest"]["counts"]
    assert c["in"] == info["n"] and c["rejected"] == 3
    reasons = {r["source"]: r["reason"] for r in out["rejects"]}
    for src, kind in info["bad"].items():
        assert reasons[src].startswith(kind), reasons[src]
    assert json.loads((art / "classes.json").read_text()) == sorted(CLASSES)
    assert set(c["splits"]) == {"train", "test"}
    assert c["splits"]["test"]["out"] == 3 * 6
    # labels follow folder names; splits get their own shard folders
    for r in out["index"]:
        assert r["label_name"] == r["source"].split("/")[1]
        assert r["split"] == r["source"].split("/")[0]
        assert (art / "shards" / r["split"] / f"{r['shard']:05d}.tar").is_file()
    assert (art / "samples.png").stat().st_size > 0


def test_tar_archive_read_in_place_matches_folder(tmp_path, client):
    make_tree(tmp_path / "src", per_class=3, corrupt=True)
    archive = tmp_path / "data.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(tmp_path / "src", arcname="mydata")  # a wrapping folder is not a class
    r_tar = run_pipeline(shard_manifest(tmp_path / "a", {"kind": "tar", "path": str(archive)}), client)[0]
    r_dir = run_pipeline(shard_manifest(tmp_path / "b", {"kind": "folder", "path": str(tmp_path / "src")}), client)[0]
    t, d = check_invariants(r_tar.path), check_invariants(r_dir.path)
    assert t["manifest"]["counts"]["rejected"] == 3
    same = lambda rows: sorted((r["uid"], r["source"], r["label_name"], r["split"], r["sha256"]) for r in rows)  # noqa: E731
    assert same(t["index"]) == same(d["index"])
    assert sorted((r["uid"], r["reason"]) for r in t["rejects"]) == sorted((r["uid"], r["reason"]) for r in d["rejects"])
    # the same files listed by a table (in any order) get the same uids
    import pyarrow as pa

    paths = sorted(str(p.relative_to(tmp_path / "src")) for p in (tmp_path / "src").rglob("*.*"))[::-1]
    pq.write_table(pa.table({"path": paths, "label": [p.split("/")[1] for p in paths]}), tmp_path / "src" / "list.parquet")
    r_tab = run_pipeline(shard_manifest(tmp_path / "c", {"kind": "table", "path": str(tmp_path / "src" / "list.parquet")}), client)[0]
    assert same(check_invariants(r_tab.path)["index"]) == same(d["index"])


def test_table_source_csv_and_parquet_with_missing_path(tmp_path, client):
    import pyarrow as pa

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rows = []
    for i in range(7):
        (img_dir / f"{i}.jpg").write_bytes(jpeg_bytes(i))
        rows.append({"path": f"imgs/{i}.jpg", "caption": f"a photo number {i}", "label": ["x", "y"][i % 2],
                     "aesthetic": 0.5 + i})
    rows.append({"path": "imgs/missing.jpg", "caption": "gone", "label": "x", "aesthetic": 0.0})
    rows.append({"path": "imgs", "caption": "a folder not a file", "label": "y", "aesthetic": 0.0})
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet")
    (tmp_path / "t.csv").write_text("path,caption,label,aesthetic\n" + "\n".join(
        f"{r['path']},{r['caption']},{r['label']},{r['aesthetic']}" for r in rows))
    for name in ("t.parquet", "t.csv"):
        res = run_pipeline(shard_manifest(tmp_path / f"run-{name}", {"kind": "table", "path": str(tmp_path / name)}), client)
        out = check_invariants(res[0].path)
        assert out["manifest"]["counts"] == {**out["manifest"]["counts"], "in": 9, "out": 7, "rejected": 2}
        reasons = sorted(r["reason"] for r in out["rejects"])
        assert reasons[0].startswith("missing file") and reasons[1].startswith("unreadable"), reasons
        by_src = {r["source"]: r for r in out["index"]}
        assert by_src["imgs/3.jpg"]["caption"] == "a photo number 3"
        assert by_src["imgs/3.jpg"]["label_name"] == "y"
        assert json.loads(by_src["imgs/3.jpg"]["extra"]) == {"aesthetic": 3.5}


def test_webdataset_resharding_keeps_labels_and_captions(tmp_path, client):
    src = tmp_path / "src"
    make_tree(src, per_class=4, splits=("train",), corrupt=False)
    first = run_pipeline(shard_manifest(tmp_path / "a", {"kind": "folder", "path": str(src)}, samples_per_shard=5), client)[0]
    a = check_invariants(first.path)
    res = run_pipeline(shard_manifest(tmp_path / "b", {"kind": "webdataset", "path": str(first.path / "shards" / "train")},
                                      samples_per_shard=7), client)[0]
    b = check_invariants(res.path)
    assert b["manifest"]["counts"]["out"] == a["manifest"]["counts"]["out"]
    same = lambda rows: sorted((r["uid"], r["source"], r["sha256"], r["label_name"]) for r in rows)  # noqa: E731
    assert same(a["index"]) == same(b["index"])  # re-sharding keeps every sample's identity
    assert b["manifest"]["counts"]["shards"] == -(-a["manifest"]["counts"]["out"] // 7)


def test_exact_duplicates_removed_and_reported(tmp_path, client):
    src = tmp_path / "src"
    make_tree(src, per_class=3, splits=("train",), corrupt=False)
    dup = (src / "train" / "cat" / "0000.jpg").read_bytes()
    (src / "train" / "dog" / "copy_of_cat.jpg").write_bytes(dup)
    (src / "train" / "frog" / "copy2.jpg").write_bytes(dup)
    res = run_pipeline(shard_manifest(tmp_path, {"kind": "folder", "path": str(src)}, dedup=True), client)[0]
    out = check_invariants(res.path)
    dups = pq.read_table(res.path / "duplicates.parquet").to_pylist()
    assert sorted(d["source"] for d in dups) == ["train/dog/copy_of_cat.jpg", "train/frog/copy2.jpg"]
    assert {d["duplicate_of_source"] for d in dups} == {"train/cat/0000.jpg"}  # the smallest path is kept
    assert out["manifest"]["counts"]["rejected_by_reason"] == {"duplicate": 2}
    assert len({r["sha256"] for r in out["index"]}) == len(out["index"])


def test_resize_reencodes_and_records_original_size(tmp_path, client):
    src = tmp_path / "src"
    make_tree(src, per_class=2, splits=("train",), corrupt=False, size=64)
    res = run_pipeline(shard_manifest(tmp_path, {"kind": "folder", "path": str(src)},
                                      resize={"mode": "center_crop", "size": 24, "format": "jpg", "quality": 80}), client)[0]
    out = check_invariants(res.path)
    for r in out["index"]:
        assert (r["width"], r["height"]) == (24, 24)
        assert (r["original_width"], r["original_height"]) == (64, 64)
        assert r["ext"] == "jpg"


def test_byte_cap_closes_shards(tmp_path, client):
    src = tmp_path / "src"
    make_tree(src, per_class=4, splits=("train",), corrupt=False)
    res = run_pipeline(shard_manifest(tmp_path, {"kind": "folder", "path": str(src)}, samples_per_shard=1000,
                                      shard_bytes=3000), client)[0]
    out = check_invariants(res.path)
    assert out["manifest"]["counts"]["shards"] > 1
    for part in out["manifest"]["parts"]:
        assert part["info"]["bytes"] < 3000 + 2000  # closes at the first sample past the cap


def test_missing_and_empty_sources_fail_before_work(tmp_path, client):
    from pipeline.config import ManifestError
    from stages.sources import SourceError

    for kind in ("folder", "tar", "table"):
        with pytest.raises(SourceError, match=f"{tmp_path / 'nope'}: .*does not exist"):
            run_pipeline(shard_manifest(tmp_path / "a", {"kind": kind, "path": str(tmp_path / "nope")}), client)
    with pytest.raises(SourceError, match="no WebDataset .tar files"):
        run_pipeline(shard_manifest(tmp_path / "a", {"kind": "webdataset", "path": str(tmp_path / "nope")}), client)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README.txt").write_text("no images here")
    with pytest.raises(SourceError, match="contains no images"):
        run_pipeline(shard_manifest(tmp_path / "b", {"kind": "folder", "path": str(tmp_path / "empty")}), client)
    with pytest.raises(ManifestError, match=r"pipeline.yaml: source: .*unknown source .nosuchkind."):
        run_pipeline(shard_manifest(tmp_path / "c", {"kind": "nosuchkind"}), client)
    assert not list((tmp_path / "a" / "run").glob("shard-*")), "nothing was started for a missing source"


def test_outputs_are_deterministic_and_cached(tmp_path, client):
    src = tmp_path / "src"
    make_tree(src, per_class=4)
    m1 = shard_manifest(tmp_path / "one", {"kind": "folder", "path": str(src)})
    r1 = run_pipeline(m1, client)[0]
    r2 = run_pipeline(shard_manifest(tmp_path / "two", {"kind": "folder", "path": str(src)}), client)[0]
    assert r1.artifact_id == r2.artifact_id
    assert tree_bytes(r1.path) == tree_bytes(r2.path)
    again = run_pipeline(m1, client)[0]
    assert again.status == "cached" and again.path == r1.path
    changed = run_pipeline(m1, client, overrides=["stages.shard.samples_per_shard=3"])[0]
    assert changed.status == "ran" and changed.artifact_id != r1.artifact_id
    forced = run_pipeline(m1, client, force=["shard"])[0]
    assert forced.status == "ran" and tree_bytes(forced.path) == tree_bytes(r2.path)
    # the source changed on disk: a new artifact, not a stale cache hit
    (src / "train" / "cat" / "new.jpg").write_bytes(jpeg_bytes(424242))
    assert run_pipeline(m1, client)[0].artifact_id != r1.artifact_id


def test_quickstart_digits_source(tmp_path, client):
    res = run_pipeline({"name": "q", "output_dir": str(tmp_path / "run"), "source": {"kind": "sklearn-digits"},
                        "stages": [{"name": "shard", "params": {"samples_per_shard": 500}}]}, client)[0]
    out = check_invariants(res.path)
    c = out["manifest"]["counts"]
    assert c["in"] == c["out"] == 1797
    assert c["splits"]["test"]["out"] == 1797 // 5
    assert json.loads((res.path / "classes.json").read_text()) == [str(i) for i in range(10)]


def test_global_dedup_keeps_the_test_copy_and_records_source_hashes(tmp_path, client):
    import hashlib

    src = tmp_path / "src"
    make_tree(src, per_class=3, corrupt=False)
    leaked = (src / "test" / "dog" / "0001.jpg").read_bytes()
    (src / "train" / "cat" / "zz_leak.jpg").write_bytes(leaked)  # a test image copied into train
    res = run_pipeline(shard_manifest(tmp_path, {"kind": "folder", "path": str(src)}, dedup=True,
                                      dedup_scope="global"), client)[0]
    out = check_invariants(res.path)
    (dup,) = pq.read_table(res.path / "duplicates.parquet").to_pylist()
    assert (dup["source"], dup["split"], dup["duplicate_of_source"]) == ("train/cat/zz_leak.jpg", "train",
                                                                         "test/dog/0001.jpg")
    by_source = {r["source"]: r for r in out["index"]}
    assert dup["duplicate_of"] == by_source["test/dog/0001.jpg"]["uid"]
    assert out["manifest"]["counts"]["splits"]["test"]["out"] == 3 * 4  # the test set did not shrink
    for r in out["index"]:
        assert r["source_sha256"] == hashlib.sha256((src / r["source"]).read_bytes()).hexdigest()


def test_one_bad_sample_never_fails_the_stage(tmp_path, client):
    """Bombs, CMYK with a PNG resize (once ``OSError: cannot write mode CMYK as PNG``), 16-bit, alpha, odd names."""
    import io

    import numpy as np
    from PIL import Image

    from imagefiles import encoded, jpeg_claiming, png_claiming

    src = tmp_path / "src" / "cat"
    src.mkdir(parents=True)
    (src / "bomb.jpg").write_bytes(jpeg_claiming(60000, 60000))
    (src / "bomb.png").write_bytes(png_claiming(60000, 60000))
    (src / "cmyk.jpg").write_bytes(encoded(Image.new("CMYK", (40, 40), (255, 0, 0, 0)), "JPEG"))
    (src / "deep.png").write_bytes(encoded(Image.fromarray(np.full((8, 8), 40000, np.uint16)), "PNG"))
    (src / "alpha.png").write_bytes(encoded(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG"))
    (src / "shout.JPEG").write_bytes(jpeg_bytes(5))
    (src / "named_wrong.jpg").write_bytes(encoded(Image.new("RGB", (8, 8), "red"), "PNG"))
    res = run_pipeline(shard_manifest(tmp_path, {"kind": "folder", "path": str(tmp_path / "src")},
                                      resize={"size": 32, "format": "png"}), client)[0]
    out = check_invariants(res.path)
    rejects = {r["source"]: r["reason"] for r in out["rejects"]}
    assert set(rejects) == {"cat/bomb.jpg", "cat/bomb.png"}
    assert all(reason.startswith("image too large: ") for reason in rejects.values())
    assert out["manifest"]["counts"]["rejected_by_reason"] == {"image too large": 2}
    rows = {r["source"]: r for r in out["index"]}
    assert (rows["cat/cmyk.jpg"]["ext"], rows["cat/cmyk.jpg"]["original_mode"]) == ("png", "CMYK")
    assert rows["cat/deep.png"]["normalised"] == "16-bit->8-bit" and rows["cat/alpha.png"]["normalised"] == "RGBA->white"
    assert rows["cat/shout.JPEG"]["ext"] == "jpg" and rows["cat/named_wrong.jpg"]["ext"] == "png"
    deep = rows["cat/deep.png"]
    data = (res.path / "shards" / "train" / f"{deep['shard']:05d}.tar").read_bytes()[deep["offset"]:deep["offset"] + deep["bytes"]]
    assert np.asarray(Image.open(io.BytesIO(data)))[0, 0].tolist() == [156, 156, 156]  # round(40000/257)


def test_shards_are_shuffled_with_a_recorded_seed(tmp_path, client):
    src = tmp_path / "src"
    make_tree(src, per_class=11, splits=("train",), corrupt=False)  # 12 per class, listed class by class
    runs = {}
    for seed in (0, 1):
        res = run_pipeline(shard_manifest(tmp_path / f"s{seed}", {"kind": "folder", "path": str(src)},
                                          samples_per_shard=12, seed=seed), client)[0]
        out = check_invariants(res.path)
        assert out["manifest"]["metrics"]["order"] == {"shuffle": True, "seed": seed}
        per_shard: dict[int, set] = {}
        for r in out["index"]:
            per_shard.setdefault(r["shard"], set()).add(r["label_name"])
        assert len(per_shard) == 3 and all(len(classes) >= 2 for classes in per_shard.values()), per_shard
        runs[seed] = [r["uid"] for r in sorted(out["index"], key=lambda r: r["key"])]
    assert runs[0] != runs[1] and sorted(runs[0]) == sorted(runs[1])
    plain = run_pipeline(shard_manifest(tmp_path / "plain", {"kind": "folder", "path": str(src)},
                                        samples_per_shard=12, shuffle=False), client)[0]
    plain_rows = sorted(check_invariants(plain.path)["index"], key=lambda r: r["key"])
    assert [r["uid"] for r in plain_rows] == sorted(r["uid"] for r in plain_rows)


def test_image_stats_of_the_train_split_match_numpy(tmp_path, client):
    import numpy as np

    from stages.imaging.decode import decode

    src = tmp_path / "src"
    make_tree(src, per_class=4, corrupt=True)
    res = run_pipeline(shard_manifest(tmp_path / "all", {"kind": "folder", "path": str(src)}), client)[0]
    out = check_invariants(res.path)
    pixels = np.concatenate([decode((src / r["source"]).read_bytes(), None).reshape(-1, 3)
                             for r in out["index"] if r["split"] == "train"]) / 255.0
    stats = out["manifest"]["metrics"]["image_stats"]
    assert set(stats) == {"split", "mean", "std", "images", "seed"}
    assert stats["split"] == "train" and stats["seed"] == 0
    assert stats["images"] == sum(r["split"] == "train" for r in out["index"]) == 15
    assert np.allclose(stats["mean"], pixels.mean(axis=0), atol=2e-6)
    assert np.allclose(stats["std"], pixels.std(axis=0), atol=2e-6)
    clean = tmp_path / "clean"
    make_tree(clean, per_class=4, corrupt=False)
    few = run_pipeline(shard_manifest(tmp_path / "few", {"kind": "folder", "path": str(clean)}, stats_images=5), client)[0]
    assert json.loads((few.path / "manifest.json").read_text())["metrics"]["image_stats"]["images"] == 5
    only_test = tmp_path / "only_test"
    make_tree(only_test, per_class=2, splits=("test",), corrupt=False)
    t = run_pipeline(shard_manifest(tmp_path / "t", {"kind": "folder", "path": str(only_test)}), client)[0]
    assert json.loads((t.path / "manifest.json").read_text())["metrics"]["image_stats"]["split"] == "test"


def test_read_with_gives_the_exact_pattern_and_a_working_reader_on_mixed_formats(tmp_path, client):
    import webdataset as wds
    from PIL import Image

    from imagefiles import encoded

    src = tmp_path / "src"
    make_tree(src, per_class=5, corrupt=False)  # JPEGs and a PNG per class, train and test
    (src / "train" / "cat" / "a.webp").write_bytes(encoded(Image.new("RGB", (32, 32), "red"), "WEBP", lossless=True))
    (src / "train" / "dog" / "b.bmp").write_bytes(encoded(Image.new("RGB", (32, 32), "blue"), "BMP"))
    res = run_pipeline(shard_manifest(tmp_path, {"kind": "folder", "path": str(src)}), client)[0]
    out = check_invariants(res.path)
    rw = out["manifest"]["metrics"]["read_with"]
    n_train, n_test = res.counts["splits"]["train"]["out"], res.counts["splits"]["test"]["out"]
    assert {r["ext"] for r in out["index"]} == {"jpg", "png", "webp"}
    assert rw["train"]["pattern"] == f"shards/train/{{00000..{res.counts['splits']['train']['shards'] - 1:05d}}}.tar"
    assert (rw["train"]["samples"], rw["test"]["samples"]) == (n_train, n_test)
    for split, info in rw.items():
        samples = list(eval(info["python"], {"wds": wds}))
        assert len(samples) == info["samples"] and all(len(s) == 2 and isinstance(s[1], int) for s in samples)
    readme = wds.WebDataset(str(res.path / rw["train"]["pattern"]), shardshuffle=False).decode("pil").to_tuple(
        "jpg;png;webp", "cls")
    assert sum(1 for _ in readme) == n_train


def test_moving_or_touching_the_dataset_reuses_the_artifact(tmp_path, client):
    import os

    make_tree(tmp_path / "a", per_class=2, corrupt=False)
    first = run_pipeline(shard_manifest(tmp_path / "run", {"kind": "folder", "path": str(tmp_path / "a")}), client)[0]
    os.replace(tmp_path / "a", tmp_path / "moved")
    for f in (tmp_path / "moved").rglob("*.jpg"):
        os.utime(f, (1, 1))
    again = run_pipeline(shard_manifest(tmp_path / "run", {"kind": "folder", "path": str(tmp_path / "moved")}), client)[0]
    assert again.status == "cached" and again.artifact_id == first.artifact_id
    victim = tmp_path / "moved" / "train" / "cat" / "0000.jpg"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    changed = run_pipeline(shard_manifest(tmp_path / "run", {"kind": "folder", "path": str(tmp_path / "moved")}), client)[0]
    assert changed.status == "ran" and changed.artifact_id != first.artifact_id


@pytest.mark.data
def test_cifar10_shards_are_not_class_sorted(cifar_shards):
    """Each 10k-sample CIFAR-10 shard once held two classes; shuffled, every shard holds all ten, near 1000 each."""
    index = pq.read_table(cifar_shards.path / "index.parquet", columns=["shard", "split", "label"]).to_pylist()
    per_shard: dict[int, dict[int, int]] = {}
    for r in index:
        per_shard.setdefault(r["shard"], {}).setdefault(r["label"], 0)
        per_shard[r["shard"]][r["label"]] += 1
    for shard, counts in per_shard.items():
        assert len(counts) == 10 and max(counts.values()) < 1.2 * min(counts.values()), (shard, counts)
    m = json.loads((cifar_shards.path / "manifest.json").read_text())["metrics"]
    assert m["image_stats"]["split"] == "train" and m["image_stats"]["images"] == 10_000
    assert m["read_with"]["train"]["pattern"] == "shards/train/{00000..00004}.tar"
    assert m["read_with"]["test"]["pattern"] == "shards/test/00005.tar" and m["read_with"]["test"]["samples"] == 10_000
