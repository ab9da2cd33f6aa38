"""FID from streaming float64 statistics: equal to clean-fid's on the same features, independent
of how the features are batched, and saved statistics read back exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.errors import DataError
from bench.metrics.fid import FeatureStats, fid, frechet_distance


def features(seed: int, n: int, dim: int = 48, shift: float = 0.0):
    r = np.random.default_rng(seed)
    mix = r.normal(size=(dim, dim)) / np.sqrt(dim)
    return 5.0 + shift + r.normal(size=(n, dim)) @ mix  # far from zero: a one-pass sum of squares would lose digits


def streamed(feats, chunk):
    stats = FeatureStats(feats.shape[1])
    for start in range(0, len(feats), chunk):
        stats.update(torch.from_numpy(feats[start : start + chunk]))
    return stats


def test_fid_equals_clean_fid_on_the_same_features():
    from cleanfid.fid import fid_from_feats

    a, b = features(0, 400), features(1, 300, shift=0.1)
    want = fid_from_feats(a, b)
    got = fid(streamed(a, 64), streamed(b, 7))
    assert got == pytest.approx(want, rel=1e-6)
    assert streamed(a, 400).cov == pytest.approx(np.cov(a, rowvar=False), rel=1e-10, abs=1e-12)


def test_batching_does_not_change_the_statistics():
    a = features(2, 257)
    one, many = streamed(a, 257), streamed(a, 10)
    assert np.allclose(one.mean, many.mean, rtol=0, atol=1e-12) and np.allclose(one.cov, many.cov, rtol=0, atol=1e-12)


def test_identical_statistics_give_zero_and_saved_statistics_read_back(tmp_path):
    a = streamed(features(3, 200), 50)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    a.save(tmp_path / "ref.npz")
    mu, sigma, n = FeatureStats.load(tmp_path / "ref.npz")
    assert n == 200 and np.array_equal(mu, a.mean) and np.array_equal(sigma, a.cov)
    assert frechet_distance(mu, sigma, a.mean, a.cov) == pytest.approx(0.0, abs=1e-6)
    (tmp_path / "bad.npz").write_bytes(b"not npz")
    with pytest.raises(DataError, match="cannot read FID statistics .*bad.npz.*delete the file"):
        FeatureStats.load(tmp_path / "bad.npz")
    with pytest.raises(DataError, match="at least 2 images"):
        FeatureStats(4).update(np.ones((1, 4))).cov
    with pytest.raises(ValueError, match=r"expected features of shape \(N, 4\)"):
        FeatureStats(4).update(np.ones((3, 5)))
