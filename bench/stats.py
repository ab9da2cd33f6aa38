"""Statistics for comparing runs, on the unit that was sampled: the prompt.

A suite samples prompts, and the images of one prompt are correlated (T2I-CompBench draws 10 per
prompt, DreamBench 4), so every interval here resamples or counts prompts, never images:

* ``cluster_bootstrap_mean_ci``: the mean over images with a bootstrap that draws prompts with all
  their images (a cluster bootstrap), as an expanded percentile interval (Hesterberg 2015), whose
  coverage holds at the 30-odd prompts of a small suite where the plain percentile falls short;
  where every prompt's mean is the same (a GenEval tag all wrong), the bootstrap has nothing to
  resample, and a 0/1 verdict gets Wilson's interval over the prompts instead of a point;
* ``macro_mean_ci``: the unweighted mean of the groups' means (GenEval's overall score over its
  six tags), with a bootstrap that resamples prompts within each group;
* ``paired_difference``: the mean of per-prompt differences (run minus base) with the paired
  t-interval (``scipy.stats.ttest_rel``) and a sign-flip permutation test
  (``scipy.stats.permutation_test``); ``holm`` corrects a table's p-values for its many metrics;
* ``winrate``: the fraction of prompts the run wins, ties counted one half, with the Wilson score
  interval (``binomtest(...).proportion_ci(method="wilson")``), which never collapses at 0 or 1;
* ``detectable_difference``: the smallest mean difference a paired t-test on this many prompts
  finds with 80% power, for the observed spread.

Everything is deterministic given ``seed``: two summaries of the same scores are byte-identical.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import optimize, stats

PERMUTATION_TEST = "sign-flip permutation test of the mean per-prompt difference (scipy.stats.permutation_test), two-sided"
POWER = 0.8


def _check(x: np.ndarray, level: float, what: str) -> None:
    if x.size == 0:
        raise ValueError(f"{what} needs at least one value")
    if np.isnan(x).any():
        raise ValueError(f"{what} got {int(np.isnan(x).sum())} NaN value(s); drop or fix them first")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")


def expanded_alpha(n: int, level: float) -> float:
    """The tail probability of Hesterberg's expanded percentile interval for ``n`` sampled units: the
    bootstrap distribution of a mean is too narrow by sqrt((n - 1) / n) and normal where it should be
    Student's t, so the quantiles are taken further out: 2 Phi(-sqrt(n / (n - 1)) t_{n-1, 1 - alpha/2})."""
    if n < 2:
        return 1 - level
    return float(2 * stats.norm.cdf(-np.sqrt(n / (n - 1)) * stats.t.ppf(1 - (1 - level) / 2, n - 1)))


def cluster_bootstrap_mean_ci(values, clusters=None, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Mean of ``values`` (one per image) and its interval from a bootstrap that resamples
    ``clusters`` (the prompt of each image) with all their images; without ``clusters`` every value
    is its own unit. The resample indices are drawn in one ``(n_boot, n_clusters)`` call, so the
    interval depends only on ``seed``. NaNs are rejected rather than dropped: a missing score means
    something upstream failed."""
    x = np.asarray(values, dtype=float).ravel()
    _check(x, level, "a mean's interval")
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    mean = float(x.mean())
    keys = np.arange(x.size) if clusters is None else pd.factorize(np.asarray(clusters), sort=True)[0]
    sums = np.bincount(keys, weights=x)
    counts = np.bincount(keys).astype(float)
    if sums.size < 2 or np.all(sums / counts == sums[0] / counts[0]):  # every prompt's mean alike: nothing to resample
        if np.isin(x, (0.0, 1.0)).all():  # a 0/1 verdict: Wilson's interval over the prompts, never a point
            return mean, wilson_interval(mean * sums.size, sums.size, level)
        return mean, (mean, mean)
    idx = np.random.default_rng(seed).integers(0, sums.size, size=(n_boot, sums.size))
    boot = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    alpha = expanded_alpha(sums.size, level)
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return mean, (float(lo), float(hi))


def macro_mean_ci(values, clusters, strata, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """The unweighted mean over ``strata`` (GenEval's tags: its "overall score, avg. over tasks") of
    each stratum's mean over its images, and its interval from a bootstrap that resamples the prompts
    (``clusters``; None: each value its own) within each stratum, since the suite fixes how many
    prompts each stratum has. The expanded percentile uses the smallest stratum's prompt count, the
    cautious choice. A 0/1 verdict with nothing to resample gets Wilson's interval over all prompts."""
    x = np.asarray(values, dtype=float).ravel()
    _check(x, level, "a macro mean's interval")
    keys = np.arange(x.size) if clusters is None else pd.factorize(np.asarray(clusters), sort=True)[0]
    sums, counts = np.bincount(keys, weights=x), np.bincount(keys).astype(float)
    labels = pd.Series(np.asarray(strata)).groupby(keys).first().to_numpy()  # a prompt's stratum
    members = [np.flatnonzero(labels == s) for s in pd.unique(labels)]
    mean = float(np.mean([sums[m].sum() / counts[m].sum() for m in members]))
    rng = np.random.default_rng(seed)
    boot = np.zeros(n_boot)
    for m in members:
        idx = m[rng.integers(0, m.size, size=(n_boot, m.size))]
        boot += sums[idx].sum(axis=1) / counts[idx].sum(axis=1)
    boot /= len(members)
    if np.ptp(boot) <= 1e-12 * max(1.0, abs(mean)):  # every prompt alike within its stratum
        if np.isin(x, (0.0, 1.0)).all():
            return mean, wilson_interval(mean * sums.size, sums.size, level)
        return mean, (mean, mean)
    alpha = expanded_alpha(min(m.size for m in members), level)
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return mean, (float(lo), float(hi))


def bootstrap_mean_ci(values, n_boot: int = 1000, level: float = 0.95, seed: int = 0) -> tuple[float, tuple[float, float]]:
    """Mean and interval of independent ``values`` (each its own unit, e.g. one mean per prompt)."""
    return cluster_bootstrap_mean_ci(values, None, n_boot, level, seed)


def paired(run: pd.Series, base: pd.Series, what: str) -> tuple[np.ndarray, np.ndarray]:
    """The per-prompt values of run and base in the same prompt order; the prompt sets must match."""
    if set(run.index) != set(base.index):
        only_run = len(set(run.index) - set(base.index))
        only_base = len(set(base.index) - set(run.index))
        raise ValueError(f"{what} needs the same prompts: {only_run} prompt(s) only in the run, {only_base} only in the baseline")
    return run.to_numpy(dtype=float), base.reindex(run.index).to_numpy(dtype=float)


def wilson_interval(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson's score interval of a proportion (no continuity correction): what
    ``scipy.stats.binomtest(k, n).proportion_ci(level, "wilson")`` gives for whole ``k``, written
    out so that a tie can count one half. It stays inside [0, 1] and is wider than zero at 0 and 1."""
    if n < 1:
        raise ValueError("a win rate needs at least one prompt")
    p = successes / n
    z = stats.norm.ppf(1 - (1 - level) / 2)
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(min(p, max(0.0, center - half))), float(max(p, min(1.0, center + half)))  # holds p, past rounding (p = 0 gave 7e-18)


def winrate(run: pd.Series, base: pd.Series, higher_is_better: bool, level: float = 0.95) -> dict:
    """Fraction of prompts where ``run`` beats ``base`` (ties count one half) with its Wilson interval.
    Both Series hold one mean score per prompt, indexed by prompt index."""
    r, b = paired(run, base, "a win rate")
    better = r > b if higher_is_better else r < b
    ties = int((r == b).sum())
    wins = int(better.sum())
    score = wins + 0.5 * ties
    return {"value": score / r.size, "ci": list(wilson_interval(score, r.size, level)), "n_prompts": int(r.size), "wins": wins, "ties": ties, "losses": int(r.size - wins - ties)}


def paired_t_interval(d: np.ndarray, level: float) -> tuple[float, float]:
    """The t-interval of the mean of per-prompt differences ``d`` (``scipy.stats.ttest_rel``'s)."""
    if d.size < 2 or np.allclose(d, d[0], rtol=1e-12, atol=0):  # one shift on every prompt (up to rounding): no spread
        m = float(d.mean())
        return m, m
    ci = stats.ttest_1samp(d, 0.0).confidence_interval(level)
    return float(ci.low), float(ci.high)


def sign_flip_pvalue(d: np.ndarray, n_resamples: int = 9999, seed: int = 0) -> float:
    """Two-sided p-value of "the mean per-prompt difference is zero": each prompt's difference keeps
    or flips its sign under the null (exact when 2^n <= n_resamples). 1.0 with one prompt or no difference."""
    if d.size < 2 or not np.any(d):  # one prompt, or no difference: nothing to test
        return 1.0
    res = stats.permutation_test(
        (d,), np.mean, permutation_type="samples", n_resamples=n_resamples, alternative="two-sided", vectorized=True, random_state=np.random.default_rng(seed)
    )
    return float(res.pvalue)


def detectable_difference(sd: float, n: int, level: float = 0.95, power: float = POWER) -> float | None:
    """The smallest true mean difference a two-sided t-test at alpha = 1 - ``level`` detects with
    ``power`` from ``n`` prompts whose values spread with standard deviation ``sd`` (noncentral t).
    None with fewer than 2 prompts; 0 when nothing varies."""
    if n < 2:
        return None
    if sd == 0:
        return 0.0
    df = n - 1
    crit = stats.t.ppf(1 - (1 - level) / 2, df)

    def shortfall(effect: float) -> float:  # effect = difference / sd
        nc = effect * np.sqrt(n)
        wrong_side = np.nan_to_num(stats.nct.cdf(-crit, df, nc))  # negligible, and NaN where scipy underflows
        return stats.nct.sf(crit, df, nc) + wrong_side - power

    high = (crit + 3) / np.sqrt(n)
    while shortfall(high) < 0:  # few prompts (heavy t tails) need a larger effect
        high *= 2
    effect = optimize.brentq(shortfall, 0.0, high, xtol=1e-12)
    return float(effect * sd)


def paired_difference(run: pd.Series, base: pd.Series, level: float = 0.95, n_resamples: int = 9999, seed: int = 0) -> dict:
    """Mean of per-prompt differences (run minus base), its paired t-interval, the sign-flip
    permutation test's p-value, and the smallest difference this many prompts could detect."""
    r, b = paired(run, base, "a paired difference")
    d = r - b
    sd = float(d.std(ddof=1)) if d.size > 1 else 0.0
    return {
        "value": float(d.mean()),
        "ci": list(paired_t_interval(d, level)),
        "n_prompts": int(d.size),
        "sd": sd,
        "p_value": sign_flip_pvalue(d, n_resamples, seed),
        "detectable": detectable_difference(sd, d.size, level),
    }


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjusted p-values over a family (the metrics of one table): the k-th smallest
    of m is multiplied by m - k + 1, then made monotone; it controls the family-wise error rate."""
    names = sorted(pvalues, key=lambda k: (pvalues[k], k))
    m, running, out = len(names), 0.0, {}
    for k, name in enumerate(names):
        running = max(running, min(1.0, (m - k) * pvalues[name]))
        out[name] = running
    return {name: out[name] for name in pvalues}
