"""Small, seeded statistics for comparing runs.

Everything here is deterministic given ``seed`` so that two evaluations of the
same scores produce byte-identical summaries.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def bootstrap_mean_ci(
    values, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> tuple[float, tuple[float, float]]:
    """Mean and percentile-bootstrap interval of ``values``.

    The resample indices are drawn in one ``(n_boot, n)`` call so the interval
    depends only on ``seed``, not on loop order. NaNs are rejected rather than
    dropped: a missing score means something upstream failed.
    """
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        raise ValueError("bootstrap_mean_ci needs at least one value")
    if np.isnan(x).any():
        raise ValueError(f"bootstrap_mean_ci got {int(np.isnan(x).sum())} NaN value(s); drop or fix them first")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    mean = float(x.mean())
    if np.all(x == x[0]):  # n=1 or constant: no spread, skip float noise from resampling
        return mean, (mean, mean)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, x.size, size=(n_boot, x.size))
    boot = x[idx].mean(axis=1)
    alpha = (1 - level) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return mean, (float(lo), float(hi))


def paired_winrate(
    run: pd.Series,
    base: pd.Series,
    higher_is_better: bool,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, tuple[float, float], int]:
    """Fraction of prompts where ``run`` beats ``base`` (ties count one half).

    Both Series hold one mean score per prompt, indexed by prompt index. The
    comparison is paired, so the prompt sets must match exactly.
    """
    if set(run.index) != set(base.index):
        only_run = len(set(run.index) - set(base.index))
        only_base = len(set(base.index) - set(run.index))
        raise ValueError(
            f"win rate needs the same prompts: {only_run} prompt(s) only in the run, "
            f"{only_base} only in the baseline"
        )
    base = base.reindex(run.index)
    r = run.to_numpy(dtype=float)
    b = base.to_numpy(dtype=float)
    better = r > b if higher_is_better else r < b
    wins = np.where(r == b, 0.5, better.astype(float))
    mean, ci = bootstrap_mean_ci(wins, n_boot=n_boot, level=level, seed=seed)
    return mean, ci, int(wins.size)
