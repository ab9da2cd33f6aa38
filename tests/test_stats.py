import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from bench import stats
from bench.report import render_table, summarize
from bench.stats import bootstrap_mean_ci, cluster_bootstrap_mean_ci


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
    m, (lo, hi) = bootstrap_mean_ci([0.1] * 7)
    assert lo == hi == m == pytest.approx(0.1)
    assert bootstrap_mean_ci([3.5]) == (3.5, (3.5, 3.5))


def test_a_verdict_alike_on_every_prompt_gets_wilsons_interval_over_the_prompts():
    """A GenEval tag every image of which is wrong (or 3 of 4 right on each prompt) has no spread for the
    bootstrap: its 0/1 verdicts get Wilson's interval with the prompts as the sample, not a point."""
    zeros = np.zeros(32)
    m, (lo, hi) = stats.cluster_bootstrap_mean_ci(zeros, np.repeat(np.arange(8), 4))
    assert m == lo == 0.0 and hi == pytest.approx(sps.binomtest(0, 8).proportion_ci(0.95, "wilson").high)
    m, (lo, hi) = stats.cluster_bootstrap_mean_ci([1, 1, 0, 1, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 1, 1])
    assert m == 0.75 and lo < 0.75 < hi and (lo, hi) == stats.wilson_interval(1.5, 2)
    assert stats.cluster_bootstrap_mean_ci([1.0]) == (1.0, stats.wilson_interval(1, 1)) and stats.wilson_interval(1, 1)[0] < 0.25
    # every interval holds its proportion past rounding: 0 of 48 once gave a lower end of 7e-18, above the mean, which the report's chart refused
    assert all(stats.wilson_interval(0, n)[0] == 0.0 and stats.wilson_interval(n, n)[1] == 1.0 for n in range(1, 500))


def test_bootstrap_rejects_nan_and_empty():
    with pytest.raises(ValueError, match="NaN"):
        bootstrap_mean_ci([1.0, float("nan")])
    with pytest.raises(ValueError):
        bootstrap_mean_ci([])


def test_expanded_percentile_tail():
    # Hesterberg's expanded percentile: alpha' = 2 Phi(-sqrt(n/(n-1)) t_{n-1, 0.975}); wider than 0.05, tending to it
    assert stats.expanded_alpha(10, 0.95) == pytest.approx(2 * sps.norm.cdf(-np.sqrt(10 / 9) * sps.t.ppf(0.975, 9)))
    assert stats.expanded_alpha(10, 0.95) < stats.expanded_alpha(100, 0.95) < 0.05
    assert stats.expanded_alpha(10_000, 0.95) == pytest.approx(0.05, abs=1e-3)


def _simulated_runs(n_runs, prompts, images, icc, seed):
    """Scores of ``n_runs`` runs with true mean 0: a prompt effect (variance icc) shared by its images plus image noise."""
    rng = np.random.default_rng(seed)
    prompt_effect = rng.normal(0, np.sqrt(icc), (n_runs, prompts, 1))
    return prompt_effect + rng.normal(0, np.sqrt(1 - icc), (n_runs, prompts, images))


def test_prompt_interval_covers_the_true_mean_and_the_image_interval_does_not():
    runs = _simulated_runs(2000, prompts=32, images=4, icc=0.5, seed=0)  # micro's 32 prompts; 4 correlated images each
    clusters = np.repeat(np.arange(32), 4)
    by_prompt = by_image = 0
    for i, run in enumerate(runs):
        _, (lo, hi) = cluster_bootstrap_mean_ci(run.ravel(), clusters, n_boot=1000, seed=i)
        by_prompt += lo <= 0 <= hi
        _, (lo, hi) = cluster_bootstrap_mean_ci(run.ravel(), None, n_boot=1000, seed=i)  # the old image-level interval
        by_image += lo <= 0 <= hi
    assert 0.93 <= by_prompt / len(runs) <= 0.97
    assert by_image / len(runs) < 0.85  # measured 0.78 (the prompt interval 0.94): images of a prompt are not independent draws


def test_cluster_bootstrap_resamples_whole_prompts():
    # one prompt with 9 images at 1, nine prompts with one image at 0: resampling prompts keeps each prompt's weight
    values = np.r_[np.ones(9), np.zeros(9)]
    clusters = np.r_[np.zeros(9), np.arange(1, 10)]
    mean, (lo, hi) = cluster_bootstrap_mean_ci(values, clusters, n_boot=2000)
    assert mean == 0.5
    _, (lo_img, hi_img) = cluster_bootstrap_mean_ci(values, None, n_boot=2000)
    assert hi - lo > 1.5 * (hi_img - lo_img)  # 0.86 against 0.56: one prompt holds half the images
    assert cluster_bootstrap_mean_ci(values, clusters, n_boot=2000) == (mean, (lo, hi))  # seeded: byte-identical


def _series(vals):
    return pd.Series(vals, index=range(len(vals)), dtype=float)


def test_winrate_counts_wins_ties_losses():
    w = stats.winrate(_series([2, 2, 2, 1, 0]), _series([1, 1, 1, 1, 1]), higher_is_better=True)  # 3 wins, 1 tie, 1 loss
    assert (w["value"], w["wins"], w["ties"], w["losses"], w["n_prompts"]) == (pytest.approx(0.7), 3, 1, 1, 5)
    assert stats.winrate(_series([2, 2, 2, 1, 0]), _series([1, 1, 1, 1, 1]), higher_is_better=False)["value"] == pytest.approx(0.3)


def test_wilson_interval_equals_scipy():
    for k, n in [(0, 32), (32, 32), (7, 32), (1, 3), (500, 1000)]:
        for level in (0.9, 0.95):
            ci = sps.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
            assert stats.wilson_interval(k, n, level) == (pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12))


def test_a_win_or_loss_on_every_prompt_keeps_an_interval():
    all_win = stats.winrate(_series(np.arange(32) + 1), _series(np.arange(32)), True)
    assert all_win["value"] == 1.0 and all_win["ci"][1] == 1.0
    assert all_win["ci"][0] == pytest.approx(32 / (32 + sps.norm.ppf(0.975) ** 2))  # Wilson's lower bound at k = n: 0.89
    all_lose = stats.winrate(_series(np.arange(32)), _series(np.arange(32) + 1), True)
    assert all_lose["value"] == 0.0 and all_lose["ci"][0] == 0.0 and all_lose["ci"][1] > 0.1
    ties = stats.winrate(_series([1, 2, 3]), _series([1, 2, 3]), True)
    assert ties["value"] == 0.5 and ties["ci"][0] < 0.5 < ties["ci"][1]


def test_winrate_aligns_on_index_not_position():
    run = pd.Series([1.0, 0.0], index=[10, 20])
    base = pd.Series([1.0, 0.5], index=[20, 10])  # prompt 10: 1 > 0.5 win; prompt 20: 0 < 1 loss
    assert stats.winrate(run, base, True)["value"] == pytest.approx(0.5)  # positional pairing would give 0.25


def test_winrate_rejects_different_prompt_sets():
    with pytest.raises(ValueError, match="1 prompt"):
        stats.winrate(_series([1, 2, 3]), _series([1, 2]), True)


def test_paired_difference_equals_scipy():
    rng = np.random.default_rng(3)
    base = _series(rng.normal(0, 1, 40))
    run = base + 0.3 + rng.normal(0, 0.5, 40)
    d = stats.paired_difference(run, base, level=0.95, n_resamples=9999, seed=0)
    t = sps.ttest_rel(run.to_numpy(), base.to_numpy())
    ci = t.confidence_interval(0.95)
    assert d["value"] == pytest.approx(float((run - base).mean()), abs=1e-15)
    assert d["ci"] == [pytest.approx(ci.low, abs=1e-12), pytest.approx(ci.high, abs=1e-12)]
    perm = sps.permutation_test(((run - base).to_numpy(),), np.mean, permutation_type="samples", n_resamples=9999, vectorized=True, random_state=np.random.default_rng(0))
    assert d["p_value"] == perm.pvalue
    assert d["p_value"] == pytest.approx(t.pvalue, abs=0.01)  # the permutation test agrees with the t-test here
    small = stats.paired_difference(_series([0.1, -0.2, 0.4, 0.3, 0.5, 0.2]), _series(np.zeros(6)), n_resamples=9999)
    # 2^6 = 64 sign flips <= 9999: scipy enumerates them all, an exact test
    signs = np.array(np.meshgrid(*[[-1, 1]] * 6)).reshape(6, -1).T
    flipped = (signs * np.array([0.1, -0.2, 0.4, 0.3, 0.5, 0.2])).mean(axis=1)
    assert small["p_value"] == pytest.approx(np.mean(np.abs(flipped) >= 0.2166666 - 1e-9))


def test_holm_equals_the_written_out_step_down():
    p = {"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5}
    # sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1 -> 0.04, 0.09, 0.08 -> monotone 0.09, 0.5
    assert stats.holm(p) == {"a": pytest.approx(0.04), "b": pytest.approx(0.09), "c": pytest.approx(0.09), "d": pytest.approx(0.5)}
    assert stats.holm({"x": 0.3}) == {"x": 0.3}


def test_detectable_difference_has_the_stated_power():
    sd, n = 0.05, 32
    mde = stats.detectable_difference(sd, n)
    crit = sps.t.ppf(0.975, n - 1)
    nc = mde / sd * np.sqrt(n)
    assert sps.nct.sf(crit, n - 1, nc) + sps.nct.cdf(-crit, n - 1, nc) == pytest.approx(0.8, abs=1e-9)
    assert mde == pytest.approx(2.87 * sd / np.sqrt(n), rel=0.03)  # (z_0.975 + z_0.8) = 2.80, a little more for t
    assert stats.detectable_difference(sd, 4 * n) < mde / 1.9


def _frame(values, images=2):
    n = len(values) // images
    return pd.DataFrame({"prompt_index": np.repeat(np.arange(n), images), "image_index": np.tile(np.arange(images), n), "m": values, "g": np.repeat(["a", "b"] * (n // 2), images)})


def test_summary_pairs_prompts_and_marks_gains():
    rng = np.random.default_rng(0)
    base = _frame(rng.normal(0, 1, 64))
    run = base.assign(m=base["m"] + 0.8, n=base["m"] + rng.normal(0, 0.01, 64))
    base = base.assign(n=base["m"])
    specs = {k: {"higher_is_better": True, "version": "1", "scale": "x"} for k in ("m", "n")}
    s = summarize(run, specs, base, n_boot=500, baseline_id="base-run", group_by=["g"])
    assert s["unit"] == "prompt"
    assert s["delta"]["m"]["value"] == pytest.approx(0.8) and s["delta"]["m"]["verdict"] == "gain"
    assert s["delta"]["n"]["verdict"] == "no detected change" and s["delta"]["m"]["p_holm"] == pytest.approx(2 * s["delta"]["m"]["p_value"])
    assert s["winrate"]["m"]["value"] == 1.0 and s["winrate"]["m"]["ci"][0] < 1.0
    assert s["by_group"][0]["ci"]["m"]["a"][0] < s["by_group"][0]["means"]["m"]["a"] < s["by_group"][0]["ci"]["m"]["a"][1]
    table = render_table(s, "t")
    assert "+0.8*" in table and "p (Holm)" in table and "detectable Δ" in table
    assert summarize(run, specs, base, n_boot=500, baseline_id="base-run", group_by=["g"]) == s
