"""pearson, spearman and auroc against independent computations (numpy by hand), with ties."""
import itertools

import numpy as np
import pytest

from persona_jax.errors import PersonaError
from persona_jax.method import stats


def _ranks(a):
    """Average ranks (1-based) by brute force."""
    a = np.asarray(a, float)
    return np.array([np.sum(a < v) + (np.sum(a == v) + 1) / 2 for v in a])


def test_pearson_matches_the_definition():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=30), rng.normal(size=30)
    xc, yc = x - x.mean(), y - y.mean()
    assert abs(stats.pearson(x, y) - (xc @ yc) / np.sqrt((xc @ xc) * (yc @ yc))) < 1e-12
    assert np.isnan(stats.pearson([1, 2], [3, 4]))  # under 3 points
    assert np.isnan(stats.pearson([1, 1, 1], [3, 4, 5]))  # a constant side


def test_spearman_with_ties_is_pearson_of_average_ranks():
    x = [1, 2, 2, 2, 3, 5, 5, 7]
    y = [3, 1, 4, 1, 5, 9, 2, 6]
    rx, ry = _ranks(x), _ranks(y)
    expected = np.corrcoef(rx, ry)[0, 1]
    assert abs(stats.spearman(x, y) - expected) < 1e-12
    # ties broken by position (the old implementation) would give another value here
    by_pos = np.corrcoef(np.argsort(np.argsort(x)), np.argsort(np.argsort(y)))[0, 1]
    assert abs(by_pos - expected) > 1e-3


def test_auroc_counts_pairs_with_half_for_ties():
    scores = [0.1, 0.4, 0.4, 0.4, 0.9, 0.2, 0.4, float("nan")]
    labels = [0, 1, 0, 1, 1, 0, 0, 1]
    pos = [s for s, l in zip(scores, labels) if l and not np.isnan(s)]
    neg = [s for s, l in zip(scores, labels) if not l and not np.isnan(s)]
    pairs = [(p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg)]
    assert abs(stats.auroc(scores, labels) - np.mean(pairs)) < 1e-12
    with pytest.raises(PersonaError):
        stats.auroc([1.0, 2.0], [1, 1])
    with pytest.raises(PersonaError):
        stats.auroc([1.0, 2.0, 3.0], [1, 0])
