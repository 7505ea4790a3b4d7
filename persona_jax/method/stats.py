"""The statistics the reports quote, from scipy: Pearson r, Spearman's rho (average ranks
for ties) and AUROC (the Mann-Whitney U statistic over n_pos * n_neg)."""
from __future__ import annotations

import numpy as np
from scipy import stats

from persona_jax.errors import PersonaError


def _pairs(x, y):
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.shape != y.shape or x.ndim != 1:
        raise PersonaError(f"a correlation needs two equal-length lists, got shapes {x.shape} and {y.shape}")
    return x, y


def pearson(x, y) -> float:
    """Pearson r (`pearson_test`'s first value)."""
    return pearson_test(x, y)[0]


def pearson_test(x, y) -> tuple[float, float]:
    """(r, two-sided p) by scipy.stats.pearsonr over the pairs where both values are
    finite; (NaN, NaN) for fewer than 3 such pairs or a constant side."""
    x, y = _pairs(x, y)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    res = stats.pearsonr(x, y)
    return float(res.statistic), float(res.pvalue)


def spearman(x, y) -> float:
    """Spearman's rho (ties share their average rank); NaN as for `pearson`."""
    x, y = _pairs(x, y)
    if len(x) < 3 or x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def auroc(scores, labels) -> float:
    """Area under the ROC curve of `scores` for binary `labels` (ties count one half).

    Samples whose score is NaN are left out. Raises when the shapes differ or one class
    is empty.
    """
    s = np.asarray(scores, float)
    y = np.asarray(labels, bool)
    if s.shape != y.shape or s.ndim != 1:
        raise PersonaError(f"AUROC needs one label per score, got {s.shape} scores and {y.shape} labels")
    ok = ~np.isnan(s)
    s, y = s[ok], y[ok]
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise PersonaError("AUROC needs both flagged and clean samples")
    u = stats.mannwhitneyu(s[y], s[~y], alternative="two-sided", method="asymptotic").statistic
    return float(u / (n_pos * n_neg))
