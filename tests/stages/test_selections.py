"""The selection format beyond the basics in test_formats: DataComp's uid pairs at scale, and the pool rows any
shards or selection artifact stands for."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curation_fakes import fake_pool, fake_selection, index
from pipeline.errors import InputError
from stages.selections.store import DATACOMP_DTYPE, covered_splits, load_selection, pool_rows, uid_pairs


def test_uid_pairs_match_datacomps_formula_for_any_arrow_input():
    rng = np.random.default_rng(0)
    uids = ["".join(rng.choice(list("0123456789abcdef"), 32)) for _ in range(2000)] + ["f" * 32, "0" * 32]
    # DataComp's baselines build the subset exactly so (then sort)
    ref = np.sort(np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype("u8,u8")))
    got = uid_pairs(uids)
    assert got.dtype == DATACOMP_DTYPE and np.array_equal(got.view(np.uint64), ref.view(np.uint64))
    sliced = pa.array(uids).slice(17, 100)
    assert np.array_equal(uid_pairs(sliced), uid_pairs(uids[17:117]))
    chunked = pa.chunked_array([uids[:7], uids[7:30]])
    assert np.array_equal(uid_pairs(chunked), uid_pairs(uids[:30]))
    assert np.array_equal(uid_pairs([u.upper() for u in uids[:50]]), uid_pairs(uids[:50]))
    for bad in (["abc"], ["g" * 32], [None], ["0" * 31 + ":"]):
        with pytest.raises(ValueError):
            uid_pairs(bad)


def test_pool_rows_of_shards_and_selections(tmp_path):
    labels = np.arange(40) % 4
    pool = fake_pool(tmp_path / "pool", labels, test=8)
    uids = index(pool).column("uid").to_pylist()
    sel = fake_selection(tmp_path / "sel", pool, set(uids[::3]))
    assert covered_splits(load_selection(sel)) == ["train"]
    rows = pool_rows(sel)
    assert rows.column("uid").to_pylist() == uids[::3], "the pool's order"
    assert pool_rows(sel, "train").num_rows == 14 and pool_rows(sel, "test").num_rows == 0
    both = pool_rows(sel, other_splits=True)
    assert both.num_rows == 14 + 8 and set(both.column("split").to_pylist()) == {"train", "test"}
    assert pool_rows(pool).num_rows == 48 and pool_rows(pool, "test").num_rows == 8
    with pytest.raises(InputError, match="not a selection or shards"):
        from curation_fakes import write_manifest
        from stages.sharding.pool import pool_record

        pool_rows(write_manifest(tmp_path / "m", "model", "teacher", {"pool": pool_record(pool)}))
