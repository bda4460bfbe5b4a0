"""Agreement between two rankings of the same selections (a cheap proxy vs trained accuracy)."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation with average ranks for ties."""
    from scipy.stats import spearmanr

    if len(a) != len(b) or len(a) < 3:
        raise ValueError(f"need two equally long rankings of at least 3 items, got {len(a)} and {len(b)}")
    return float(spearmanr(a, b).statistic)


def kendall(a: Sequence[float], b: Sequence[float]) -> float:
    from scipy.stats import kendalltau

    return float(kendalltau(a, b).statistic)


def pairwise_agreement(a: Sequence[float], b: Sequence[float]) -> float:
    """Fraction of pairs the two rankings order the same way: what a user choosing between two selections sees."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    i, j = np.triu_indices(len(a), 1)
    da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
    valid = (da != 0) & (db != 0)
    return float((da[valid] == db[valid]).mean()) if valid.any() else float("nan")
