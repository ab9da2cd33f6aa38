"""Frechet distance between two sets of image features, from statistics accumulated streaming.

``FeatureStats`` folds feature batches into a float64 mean and scatter matrix with Chan et al.'s
pairwise update, so memory does not grow with the image count and the result does not depend on
the batch size; its covariance is the unbiased one ``np.cov`` gives. ``frechet_distance`` is the
formula clean-fid and pytorch-fid use (``scipy.linalg.sqrtm`` of the covariance product, a small
diagonal offset where the product is singular, the imaginary round-off dropped), so on the same
features the FID equals ``cleanfid.fid.fid_from_feats``. Statistics save to ``.npz`` (``mu``,
``sigma``, ``n``) to be cached as a dataset's reference statistics.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch

from bench.errors import DataError
from bench.io import write_bytes


class FeatureStats:
    def __init__(self, dim: int):
        self.n = 0
        self._mean = np.zeros(dim, dtype=np.float64)
        self._scatter = np.zeros((dim, dim), dtype=np.float64)  # sum of (x - mean)(x - mean)^T

    def update(self, feats) -> "FeatureStats":
        """Fold in a batch of features ``(N, dim)``."""
        x = feats.detach().double().cpu().numpy() if isinstance(feats, torch.Tensor) else np.asarray(feats, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self._mean.shape[0]:
            raise ValueError(f"expected features of shape (N, {self._mean.shape[0]}), got {x.shape}")
        nb = x.shape[0]
        if nb == 0:
            return self
        mean_b = x.mean(0)
        centered = x - mean_b
        delta = mean_b - self._mean
        total = self.n + nb
        self._scatter += centered.T @ centered + np.outer(delta, delta) * (self.n * nb / total)
        self._mean += delta * (nb / total)
        self.n = total
        return self

    @property
    def mean(self) -> np.ndarray:
        return self._mean.copy()

    @property
    def cov(self) -> np.ndarray:
        if self.n < 2:
            raise DataError(f"a covariance needs at least 2 images, got {self.n}")
        return self._scatter / (self.n - 1)

    def save(self, path: str | Path) -> None:
        buf = io.BytesIO()
        np.savez(buf, mu=self.mean, sigma=self.cov, n=self.n)
        write_bytes(path, buf.getvalue())

    @staticmethod
    def load(path: str | Path) -> tuple[np.ndarray, np.ndarray, int]:
        """(mu, sigma, n) of saved statistics (only the mean and covariance are kept)."""
        try:
            with np.load(path) as data:
                return data["mu"], data["sigma"], int(data["n"])
        except (OSError, KeyError, ValueError) as err:
            raise DataError(f"cannot read FID statistics {path}: {err} (delete the file to recompute it)") from None


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))."""
    from scipy import linalg

    mu1, mu2, sigma1, sigma2 = np.atleast_1d(mu1), np.atleast_1d(mu2), np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different feature sizes: {mu1.shape} vs {mu2.shape}")
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"the covariance product's square root has an imaginary part {np.abs(covmean.imag).max():.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def fid(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)
