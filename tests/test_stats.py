import numpy as np
import pandas as pd
import pytest

from bench.stats import bootstrap_mean_ci, paired_winrate


def test_bootstrap_ci_contains_mean_and_is_reproducible():
    values = np.random.default_rng(1).normal(0.5, 0.1, size=50)
    mean, (lo, hi) = bootstrap_mean_ci(values, n_boot=500, seed=0)
    assert mean == pytest.approx(values.mean())
    assert lo < mean < hi
    assert hi - lo < 0.2  # ~4 standard errors of 0.1/sqrt(50); catches a gross bug
    assert bootstrap_mean_ci(values, n_boot=500, seed=0) == (mean, (lo, hi))
    assert bootstrap_mean_ci(values, n_boot=500, seed=1)[1] != (lo, hi)


def test_bootstrap_wider_level_gives_wider_interval():
    values = np.arange(20, dtype=float)
    _, (lo90, hi90) = bootstrap_mean_ci(values, level=0.90)
    _, (lo99, hi99) = bootstrap_mean_ci(values, level=0.99)
    assert lo99 <= lo90 and hi90 <= hi99


def test_bootstrap_constant_and_single_value():
    assert bootstrap_mean_ci([0.1] * 7) == (pytest.approx(0.1), (pytest.approx(0.1), pytest.approx(0.1)))
    m, (lo, hi) = bootstrap_mean_ci([0.1] * 7)
    assert lo == hi == m
    assert bootstrap_mean_ci([3.5]) == (3.5, (3.5, 3.5))


def test_bootstrap_rejects_nan_and_empty():
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError):
        bootstrap_mean_ci([])


def _series(vals):
    return pd.Series(vals, index=range(len(vals)), dtype=float)


def test_winrate_counts_wins_ties_losses():
    run = _series([2, 2, 2, 1, 0])
    base = _series([1, 1, 1, 1, 1])  # 3 wins, 1 tie, 1 loss
    value, (lo, hi), n = paired_winrate(run, base, higher_is_better=True)
    assert value == pytest.approx(0.7)
    assert n == 5
    assert 0 <= lo <= value <= hi <= 1


def test_winrate_lower_is_better_flips():
    run = _series([2, 2, 2, 1, 0])
    base = _series([1, 1, 1, 1, 1])  # now 1 win, 1 tie, 3 losses
    value, _, _ = paired_winrate(run, base, higher_is_better=False)
    assert value == pytest.approx(0.3)


def test_winrate_all_ties_is_one_half():
    value, ci, n = paired_winrate(_series([1, 2, 3]), _series([1, 2, 3]), True)
    assert (value, ci, n) == (0.5, (0.5, 0.5), 3)


def test_winrate_aligns_on_index_not_position():
    run = pd.Series([1.0, 0.0], index=[10, 20])
    base = pd.Series([1.0, 0.5], index=[20, 10])  # prompt 10: 1 > 0.5 win; prompt 20: 0 < 1 loss
    value, _, _ = paired_winrate(run, base, True)
    assert value == pytest.approx(0.5)  # positional pairing would give a tie + a loss = 0.25


def test_winrate_rejects_different_prompt_sets():
    with pytest.raises(ValueError, match="1 prompt"):
        paired_winrate(_series([1, 2, 3]), _series([1, 2]), True)
