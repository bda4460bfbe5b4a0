"""Each pruning method's keep rule, the promised size and composition, and chains that prune only within the
prior selection (methods run through ``run_step`` on artifacts written in their formats)."""
from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from curation_fakes import fake_clusters, fake_embeddings, fake_pool, fake_selection, fake_teacher, index
from pipeline.errors import InputError
from stages.clustering.store import load_cluster_table
from stages.pruning import Target, create_pruner
from stages.pruning.base import take_per_group
from stages.pruning.clip_score import datacomp_threshold
from stages.pruning.dbp import complexity, dbp_quotas
from stages.pruning.margin import margins
from stages.pruning.step import resolve_pool, run_step, step_rows
from stages.selections.store import load_selection


def unit(rng, n, d=8):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture()
def world(tmp_path):
    """600 train rows (+ 30 test) in 6 clusters of different sizes and spreads, 3 classes."""
    rng = np.random.default_rng(0)
    sizes = [40, 60, 80, 100, 140, 180]
    spread = [0.05, 0.30, 0.10, 0.20, 0.02, 0.15]
    cluster = np.concatenate([np.full(s, j) for j, s in enumerate(sizes)])
    distance = np.concatenate([rng.random(s) * sp for s, sp in zip(sizes, spread)])
    perm = rng.permutation(len(cluster))
    cluster, distance = cluster[perm], distance[perm]
    labels = rng.integers(0, 3, len(cluster))
    pool = fake_pool(tmp_path / "pool", labels, test=30)
    clusters = fake_clusters(tmp_path / "clusters", pool, cluster, distance, unit(rng, 6))
    return {"pool": pool, "clusters": clusters, "cluster": cluster, "distance": distance, "labels": labels,
            "tmp": tmp_path, "rng": rng}


def prune(method, inputs, fraction=None, count=None, seed=0, split="train"):
    pool = resolve_pool(inputs)
    prior = load_selection(inputs["selection"]) if "selection" in inputs else None
    stage = json.loads((inputs["selection"] / "manifest.json").read_text())["stage"] if prior is not None else ""
    rows, passed, carried = step_rows(pool, split, prior, stage, inputs.get("clusters"))
    return run_step(create_pruner(method), rows, inputs, Target(fraction, count), seed, passed, carried)


def by_uid(table: pa.Table, column: str) -> dict:
    return dict(zip(table.column("uid").to_pylist(), table.column(column).to_pylist()))


@pytest.mark.parametrize("which", ["hard", "easy", "random"])
def test_dbp_keeps_each_clusters_quota_and_the_farthest_for_hard(world, which):
    res = prune({"method": "dbp", "which_to_keep": which, "temperature": 0.05}, {"clusters": world["clusters"]},
                count=200)
    assert res.kept.num_rows == 200 and res.counts == {**res.counts, "in": 600, "out": 200, "rejected": 400}
    table = res.clusters.to_pydict()
    # an independent computation of the quotas from the assignments and the cluster table
    c, d = world["cluster"], world["distance"]
    sizes = np.bincount(c)
    d_intra = np.bincount(c, weights=d) / sizes
    d_inter = load_cluster_table(world["clusters"]).column("d_inter").to_numpy()
    _, _, quota = dbp_quotas(sizes, complexity(d_intra, d_inter, sizes, 3), 200, 0.05)
    assert table["quota"] == quota.tolist() and table["size"] == sizes.tolist()
    np.testing.assert_allclose(table["d_intra"], d_intra)
    kept_per_cluster = np.bincount(res.kept.column("cluster").to_numpy(), minlength=6)
    assert kept_per_cluster.tolist() == quota.tolist() == table["kept"]
    assert len(set(quota.tolist())) > 2, "the instance must actually discriminate between clusters"
    dropped = res.dropped
    assert set(dropped.column("reason").to_pylist()) == {f"dbp: beyond its cluster's quota ({which} kept)"}
    for j in range(6):
        k = res.kept.filter(pc.equal(res.kept["cluster"], j)).column("distance").to_numpy()
        dr = dropped.filter(pc.equal(dropped["cluster"], j)).column("distance").to_numpy()
        if which == "hard" and len(k) and len(dr):
            assert k.min() >= dr.max()
        if which == "easy" and len(k) and len(dr):
            assert k.max() <= dr.min()


def test_dbp_quota_zero_keeps_nothing_even_for_easy(world):
    # a singleton cluster (lb 0) with a tiny target: its quota is 0, and 'easy' must not keep the whole cluster
    rng = world["rng"]
    c = world["cluster"].copy()
    c[0] = 6  # cluster 6 has one member
    cl = fake_clusters(world["tmp"] / "c7", world["pool"], c, world["distance"], unit(rng, 7))
    res = prune({"method": "dbp", "which_to_keep": "easy", "temperature": 0.01}, {"clusters": cl}, count=6)
    table = res.clusters.to_pydict()
    assert table["size"][6] == 1 and table["quota"][6] == 0 and table["kept"][6] == 0
    assert res.kept.num_rows == 6
    assert take_per_group(np.array([2, 0, 1]), np.array([0, 0, 0]), np.array([0])).size == 0


def test_dbp_paper_defaults_and_the_codes_documented(world):
    p = create_pruner("dbp").params
    assert (p.temperature, p.cls_bal_ratio, p.which_to_keep, p.allocation) == (0.1, 0.0, "hard", "qp")
    with pytest.raises(ValueError, match="extra"):
        create_pruner({"method": "dbp", "temprature": 0.5})
    # the released code's cluster balancing floors every cluster at floor(N/k * ratio)
    res = prune({"method": "dbp", "cls_bal_ratio": 0.5, "temperature": 0.01}, {"clusters": world["clusters"]},
                count=120)
    assert min(res.clusters.column("quota").to_pylist()) >= 10 and res.kept.num_rows == 120


def test_ssp_keeps_the_hardest_or_easiest_globally_and_balances_clusters(world):
    d = by_uid(index(world["pool"]).append_column("d", pa.array(world["distance"])), "d")
    res = prune({"method": "ssp"}, {"clusters": world["clusters"]}, fraction=0.25)
    assert res.kept.num_rows == 150
    kept_d = [d[u] for u in res.kept.column("uid").to_pylist()]
    assert min(kept_d) >= max(d[u] for u in res.dropped.column("uid").to_pylist())
    easy = prune({"method": "ssp", "which_to_keep": "easy"}, {"clusters": world["clusters"]}, fraction=0.25)
    assert max(d[u] for u in easy.kept.column("uid").to_pylist()) <= min(
        d[u] for u in easy.dropped.column("uid").to_pylist())
    plain = np.bincount(res.kept.column("cluster").to_numpy(), minlength=6)
    assert plain.min() < 10  # tight clusters lose almost everything to global ranking
    bal = prune({"method": "ssp", "cluster_balance": 1.0}, {"clusters": world["clusters"]}, fraction=0.25)
    per = np.bincount(bal.kept.column("cluster").to_numpy(), minlength=6)
    assert bal.kept.num_rows == 150 and per.min() >= 150 // 6


def test_random_size_and_class_balance(world):
    res = prune({"method": "random"}, {"shards": world["pool"]}, count=123, seed=3)
    assert res.kept.num_rows == 123 and res.dropped.num_rows == 477
    again = prune({"method": "random"}, {"shards": world["pool"]}, count=123, seed=3)
    assert res.kept.column("uid").to_pylist() == again.kept.column("uid").to_pylist()
    bal = prune({"method": "random", "class_balanced": True}, {"shards": world["pool"]}, fraction=0.3)
    sizes = np.bincount(world["labels"], minlength=3)
    got = np.bincount(bal.kept.column("label").to_numpy(), minlength=3)
    assert got.sum() == 180 and np.all(np.abs(got - 0.3 * sizes) < 1)


def test_clip_score_threshold_datacomp_fraction_with_ties_and_count(world):
    rng, pool = world["rng"], world["pool"]
    img = unit(rng, 600)
    txt = unit(rng, 600)
    txt[:5] = 0  # five rows without a caption
    img[5:25] = txt[5:25] = img[5]  # twenty ties at the top score
    emb = fake_embeddings(world["tmp"] / "emb", pool, img, txt)
    score = np.einsum("ij,ij->i", img.astype(np.float16).astype(np.float32),
                      txt.astype(np.float16).astype(np.float32))
    res = prune({"method": "clip-score", "threshold": 0.2}, {"embeddings": emb})
    scores = by_uid(res.kept, "score")
    assert all(s >= 0.2 for s in scores.values()) and res.kept.num_rows == int((score[5:] >= 0.2).sum())
    lacking = res.dropped.filter(pc.equal(res.dropped["reason"], "clip-score: no score"))
    assert lacking.num_rows == 5
    # DataComp's fraction: threshold = the value at int(n*f) of the descending scores, ties all kept
    frac = prune({"method": "clip-score"}, {"embeddings": emb}, fraction=0.01)
    n = 595
    assert int(n * 0.01) == 5 and frac.kept.num_rows >= 20 > 0.01 * n
    assert np.isclose(frac.metrics["threshold"], datacomp_threshold(np.sort(score[5:]), 0.01))
    exact = prune({"method": "clip-score"}, {"embeddings": emb}, count=7)
    assert exact.kept.num_rows == 7 and min(by_uid(exact.kept, "score").values()) >= 0.999
    with pytest.raises(InputError, match="no caption embeddings"):
        prune({"method": "clip-score"}, {"embeddings": fake_embeddings(world["tmp"] / "e2", pool, img)},
              fraction=0.5)


def test_margin_from_out_of_fold_predictions(world):
    rng, pool = world["rng"], world["pool"]
    rows = index(pool)
    uids = rows.column("uid").to_pylist()[:-10]  # ten rows the teacher never scored
    labels = world["labels"][:-10]
    logits = rng.normal(size=(len(uids), 3)) * 2
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)  # stored as float32
    teacher = fake_teacher(world["tmp"] / "teacher", uids, labels, probs)
    m = margins(probs, labels)
    top = np.sort(probs, 1)
    assert np.allclose(m[probs.argmax(1) == labels], (top[:, -1] - top[:, -2])[probs.argmax(1) == labels])
    assert np.all(m[probs.argmax(1) != labels] < 0)
    inputs = {"teacher": teacher, "shards": pool}
    hard = prune({"method": "margin"}, inputs, count=100)
    assert hard.kept.num_rows == 100
    assert set(hard.kept.column("score").to_numpy()) == set(np.sort(m)[:100])
    assert hard.dropped.filter(pc.equal(hard.dropped["reason"], "margin: no score")).num_rows == 10
    easy = prune({"method": "margin", "which_to_keep": "easy", "class_balanced": True}, inputs, count=90)
    got = np.bincount(easy.kept.column("label").to_numpy(), minlength=3)
    sizes = np.bincount(labels, minlength=3)
    assert got.sum() == 90 and np.all(np.abs(got - 90 * sizes / sizes.sum()) < 1)
    with pytest.raises(InputError, match="folds"):
        prune({"method": "margin"}, {"teacher": world["tmp"] / "pool", "shards": pool}, count=5)


def test_a_chain_step_prunes_only_within_the_prior_selection(world):
    pool = world["pool"]
    rows = index(pool)
    uids = rows.column("uid").to_pylist()
    rng = np.random.default_rng(1)
    keep = set(rng.choice(uids, 400, replace=False).tolist())
    prior = fake_selection(world["tmp"] / "dedup", pool, keep)
    res = prune({"method": "dbp", "temperature": 0.05}, {"clusters": world["clusters"], "selection": prior},
                fraction=0.5)
    kept = set(res.kept.column("uid").to_pylist())
    assert kept <= keep and len(kept) == 200 and res.counts["in"] == 400
    # every pool row is accounted for: kept, dropped here, or carried with the prior's reason and step
    dropped = res.dropped
    assert dropped.num_rows == 400 and set(dropped.column("uid").to_pylist()) | kept == set(uids)
    carried = dropped.filter(pc.equal(dropped["dropped_by"], "dedup"))
    assert carried.num_rows == 200 and set(carried.column("reason").to_pylist()) == {"duplicate"}
    assert carried.column("duplicate_of").null_count == 0
    # d_intra and sizes are recomputed on the kept rows, not taken from the clusters artifact
    mask = np.isin(np.array(uids), list(keep))
    c, d = world["cluster"][mask], world["distance"][mask]
    table = res.clusters.to_pydict()
    assert table["size"] == np.bincount(c, minlength=6).tolist()
    np.testing.assert_allclose(table["d_intra"], np.bincount(c, weights=d, minlength=6) / np.bincount(c, minlength=6))
    assert not np.allclose(table["d_intra"], load_cluster_table(world["clusters"]).column("d_intra").to_numpy())


def test_a_chain_passes_other_splits_through_and_inputs_must_share_a_pool(world, tmp_path):
    pool = world["pool"]
    test_rows = index(pool, "test")
    train_keep = set(index(pool).column("uid").to_pylist()[:300])
    keep = train_keep | set(test_rows.column("uid").to_pylist()[:10])
    # a prior selection covering both splits
    from stages.selections.store import write_selection
    from curation_fakes import write_manifest
    from stages.sharding.pool import pool_record

    allrows = index(pool, None).select(["key", "uid", "split", "shard", "label"])
    m = pc.is_in(allrows["uid"], value_set=pa.array(sorted(keep)))
    d = allrows.filter(pc.invert(m))
    write_selection(tmp_path / "sel", allrows.filter(m), d.append_column("reason", pa.array(["x"] * d.num_rows)))
    write_manifest(tmp_path / "sel", "selection", "filter", {"pool": pool_record(pool)})
    res = prune({"method": "random"}, {"selection": tmp_path / "sel"}, count=100)
    assert res.counts["in"] == 300 and res.counts["out"] == 100
    assert res.kept.num_rows == 110 and res.counts["carried"] == {"kept_other_splits": 10, "dropped_before": 320}
    assert set(res.dropped.filter(pc.equal(res.dropped["dropped_by"], "filter")).column("reason").to_pylist()) == {"x"}
    other = fake_pool(tmp_path / "other", world["labels"])
    with pytest.raises(InputError, match="different pools"):
        resolve_pool({"shards": other, "clusters": world["clusters"]})


def test_clear_errors_for_impossible_targets_and_missing_inputs(world, tmp_path):
    from pipeline.stage import InputArtifact, PlanContext
    from stages.prune import PruneParams, PruneStage

    with pytest.raises(ValueError, match="below the per-cluster floor of 6"):
        prune({"method": "dbp"}, {"clusters": world["clusters"]}, count=5)
    with pytest.raises(ValueError, match="count 601 is more than the 600"):
        prune({"method": "random"}, {"shards": world["pool"]}, count=601)
    test_only = fake_clusters(tmp_path / "cl", world["pool"], np.zeros(30, dtype=int), np.zeros(30),
                              unit(world["rng"], 1), split="test")
    with pytest.raises(InputError, match="none of the 600 candidate rows has a cluster"):
        prune({"method": "ssp"}, {"clusters": test_only}, count=5)
    params = PruneParams.model_validate({"method": "dbp", "fraction": 0.5})
    inputs = {"shards": InputArtifact(world["pool"])}
    with pytest.raises(InputError, match="needs the input\\(s\\) clusters"):
        PruneStage().plan(inputs, params, PlanContext(tmp_path / "out", inputs))
    with pytest.raises(ValueError, match="needs a target size"):
        PruneParams.model_validate({"method": "ssp"})
    assert PruneParams.model_validate({"method": "clip-score", "threshold": 0.3}).method["threshold"] == 0.3
