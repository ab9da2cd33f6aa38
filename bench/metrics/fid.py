"""FID and KID on the clean-fid protocol, from statistics accumulated streaming.

The protocol is clean-fid's ``mode="clean"`` (Parmar et al., 2022), reproduced here so that a run
needs no clean-fid install and writes nothing into site-packages:

* each image (uint8 RGB, any size) is resized to 299x299 with PIL bicubic on float32 pixels, one
  channel at a time, clipped to [0, 255] and not quantized (``cleanfid.resize.build_resizer("clean")``);
* the pixels go through ``(x - 128) / 128`` into the ``layers`` of the TorchScript Inception-v3
  ``inception-2015-12-05.pt`` (the StyleGAN2-ADA metrics file clean-fid downloads), whose pool3
  output is the 2048-d feature (``cleanfid.inception_torchscript.InceptionV3W``).

``FeatureStats`` folds feature batches into a float64 mean and scatter matrix with Chan et al.'s
pairwise update, so memory does not grow with the image count and the result does not depend on
the batch size; its covariance is the unbiased one ``np.cov`` gives. ``frechet_distance`` is the
formula of clean-fid and pytorch-fid (``scipy.linalg.sqrtm`` of the covariance product, a small
diagonal offset where it is singular, the imaginary round-off dropped), so on the same features the
FID equals ``cleanfid.fid.fid_from_feats``. ``kernel_distance`` is clean-fid's KID estimator
(cubic polynomial kernel, 100 subsets of at most 1,000 images) with a seeded generator where
clean-fid draws from numpy's global one. ``tests/test_fid.py`` checks all three against clean-fid.

An interval needs the metric on many subsets of the generated rows against the same real set
(``bench.distribution``): ``FrechetToReal`` and ``kid_replicates`` compute those from the rows
already in memory, cheaper than calling the point formulas once per subset.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from bench.errors import DataError
from bench.images import thread_map
from bench.io import write_bytes
from bench.metrics import DistributionMetric, LearnedMetric, MetricInfo, seeded

INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
# The sha256 k-diffusion pins for this URL (crowsonkb/k-diffusion, k_diffusion/evaluation.py, checked by its
# utils.download_file); clean-fid itself (cleanfid/downloads_helper.py) downloads it unchecked.
INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
INCEPTION_FILE = "inception-2015-12-05.pt"
CLEAN_SIZE = 299
KID_SUBSETS, KID_SUBSET_SIZE, KID_SEED = 100, 1000, 0
BLOCK = 512  # generated rows per kernel block in ``kid_replicates`` (a block against 30k rows: 120 MB)


# --------------------------------------------------------------------------- statistics


class FeatureStats:
    def __init__(self, dim: int):
        self.n = 0
        self._mean = np.zeros(dim, dtype=np.float64)
        self._scatter = np.zeros((dim, dim), dtype=np.float64)  # sum of (x - mean)(x - mean)^T

    @classmethod
    def from_moments(cls, mu, sigma, n: int) -> "FeatureStats":
        """Statistics of ``n`` features with mean ``mu`` and unbiased covariance ``sigma`` (saved ones)."""
        stats = cls(len(mu))
        stats.n, stats._mean[:] = int(n), mu
        stats._scatter[:] = np.asarray(sigma, dtype=np.float64) * max(int(n) - 1, 1)
        return stats

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


@dataclass
class FeatureSet:
    """What a set-level metric reduces: the streaming statistics of a set's features and, for the
    metrics that need every row (KID, and a generated set's interval), the features themselves
    (float32, at most 30k x 2048 here) with each row's owner (its prompt, or its real file)."""

    stats: FeatureStats
    feats: np.ndarray | None = None
    owners: np.ndarray | None = None  # not saved: the real set's intervals are not computed

    def save(self, path: str | Path) -> None:
        """``mu``/``sigma`` as clean-fid names them (usable with ``frechet_distance`` directly), ``n``, and ``feats`` when kept."""
        buf = io.BytesIO()
        extra = {"feats": self.feats} if self.feats is not None else {}
        np.savez(buf, mu=self.stats.mean, sigma=self.stats.cov if self.stats.n > 1 else np.zeros_like(self.stats._scatter), n=self.stats.n, **extra)
        write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> "FeatureSet":
        try:
            with np.load(path) as data:
                feats = data["feats"] if "feats" in data.files else None
                return cls(FeatureStats.from_moments(data["mu"], data["sigma"], int(data["n"])), feats)
        except (OSError, KeyError, ValueError) as err:
            raise DataError(f"cannot read FID statistics {path}: {err} (delete the file to recompute it)") from None


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2))."""
    from scipy import linalg

    mu1, mu2, sigma1, sigma2 = np.atleast_1d(mu1), np.atleast_1d(mu2), np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f"statistics of different feature sizes: {mu1.shape} vs {mu2.shape}")
    with warnings.catch_warnings():  # a singular product (fewer images than dimensions) is handled below, as clean-fid does
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
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


def kid_subsets(feats1, feats2, num_subsets: int = KID_SUBSETS, max_subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> np.ndarray:
    """The per-subset values whose mean is KID, as ``cleanfid.fid.kernel_distance`` draws them: the
    unbiased MMD^2 with the kernel (x.y / d + 1)^3 of m = min(n1, n2, max_subset_size) images drawn
    without replacement from each set (first from ``feats2``, then ``feats1``). Computed in float64;
    ``seed`` fixes the draws, which clean-fid takes from numpy's global generator."""
    x_all, y_all = np.asarray(feats2, dtype=np.float64), np.asarray(feats1, dtype=np.float64)
    d = y_all.shape[1]
    m = min(len(x_all), len(y_all), max_subset_size)
    if m < 2:
        raise DataError(f"KID needs at least 2 images in each set, got {len(y_all)} and {len(x_all)}")
    rng = np.random.RandomState(seed)  # the legacy generator: np.random.seed(s) + np.random.choice draw the same subsets
    values = np.empty(num_subsets)
    for i in range(num_subsets):
        x = x_all[rng.choice(len(x_all), m, replace=False)]
        y = y_all[rng.choice(len(y_all), m, replace=False)]
        a = (x @ x.T / d + 1) ** 3 + (y @ y.T / d + 1) ** 3
        b = (x @ y.T / d + 1) ** 3
        values[i] = ((a.sum() - np.diag(a).sum()) / (m - 1) - b.sum() * 2 / m) / m
    return values


def kernel_distance(feats1, feats2, num_subsets: int = KID_SUBSETS, max_subset_size: int = KID_SUBSET_SIZE, seed: int = KID_SEED) -> float:
    """KID as ``cleanfid.fid.kernel_distance``: the mean of ``kid_subsets``."""
    return float(kid_subsets(feats1, feats2, num_subsets, max_subset_size, seed).mean())


def sqrt_psd(sigma) -> np.ndarray:
    """The symmetric square root of a covariance, from its eigen-decomposition (negative round-off clipped)."""
    from scipy import linalg

    w, v = linalg.eigh(np.asarray(sigma, dtype=np.float64))
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


class FrechetToReal:
    """The Frechet distance of subsets of ``feats`` to fixed real statistics. tr((S_g S_r)^(1/2)) is
    taken as the sum of the square roots of the eigenvalues of the symmetric S_r^(1/2) S_g S_r^(1/2),
    which has the same eigenvalues: S_r^(1/2) once, then per subset one Gram matrix of the whitened
    rows and one ``eigvalsh`` (of the smaller of rows x rows and dim x dim), instead of ``sqrtm`` of a
    non-symmetric product. Equal to ``frechet_distance`` (tests/test_fid.py), several times cheaper."""

    def __init__(self, feats, ref: FeatureStats):
        feats = np.asarray(feats, dtype=np.float64)
        self.center = feats.mean(0)
        self.x = feats - self.center  # centered once: the subsets' sums of squares keep their digits
        self.y = self.x @ sqrt_psd(ref.cov)
        self.ref_mean, self.ref_trace = ref.mean, float(np.trace(ref.cov))

    def __call__(self, rows) -> float:
        from scipy import linalg

        x, y = self.x[rows], self.y[rows]
        n = len(x)
        if n < 2:
            raise DataError(f"a covariance needs at least 2 images, got {n}")
        mean = x.mean(0)
        y = y - y.mean(0)
        gram = y @ y.T if n < y.shape[1] else y.T @ y  # the same nonzero eigenvalues
        root = np.sqrt(np.clip(linalg.eigvalsh(gram / (n - 1)), 0, None)).sum()
        diff = self.center + mean - self.ref_mean
        return float(diff @ diff + ((x - mean) ** 2).sum() / (n - 1) + self.ref_trace - 2 * root)


def kid_replicates(feats, ref_feats, masks) -> np.ndarray:
    """KID of each subset of the generated rows (``masks``: one bool row per subset) against all real
    rows, with every pair of images instead of random subsets (the value the subset average
    estimates), less the real set's own term, which is the same for every subset: what varies between
    subsets, not KID's level. One pass of kernel blocks (float64) serves all subsets."""
    x, r = np.asarray(feats, dtype=np.float64), np.asarray(ref_feats, dtype=np.float64)
    d, w = x.shape[1], np.asarray(masks, dtype=np.float64)
    k = w.sum(1)
    if k.min() < 2:
        raise DataError(f"KID needs at least 2 images in each subset, got {int(k.min())}")
    within, cross = np.zeros(len(w)), np.empty(len(x))
    for start in range(0, len(x), BLOCK):
        block = slice(start, start + BLOCK)
        within += np.einsum("bi,ib->b", w[:, block], ((x[block] @ x.T / d + 1) ** 3) @ w.T)
        cross[block] = ((x[block] @ r.T / d + 1) ** 3).sum(1)
    self_kernel = ((x * x).sum(1) / d + 1) ** 3  # the pairs of an image with itself, not in the unbiased sum
    return (within - w @ self_kernel) / (k * (k - 1)) - 2 * (w @ cross) / (k * len(r))


# --------------------------------------------------------------------------- the clean-fid protocol


def clean_resize(image: Image.Image) -> np.ndarray:
    """clean-fid's "clean" resize: float32 (299, 299, 3) in [0, 255] from a uint8 RGB image."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    channels = [np.asarray(Image.fromarray(np.ascontiguousarray(pixels[:, :, c])).resize((CLEAN_SIZE, CLEAN_SIZE), Image.Resampling.BICUBIC)) for c in range(3)]
    return np.stack(channels, axis=2).clip(0, 255)


def clean_batch(images: Sequence[Image.Image]) -> torch.Tensor:
    """(N, 3, 299, 299) float32 in [0, 255]; the resizes run on threads (PIL releases the GIL)."""
    return torch.from_numpy(np.stack(thread_map(clean_resize, images))).permute(0, 3, 1, 2).contiguous()


class TinyInception(torch.nn.Module):
    """``scorers=tiny``: a small seeded random conv net in the Inception's place (same input, 64-d
    average-pooled features). Its distances mean nothing; it lets a suite with FID run offline."""

    def __init__(self, dim: int = 64):
        super().__init__()
        from torch import nn

        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 7, stride=4), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(), nn.Conv2d(32, dim, 3, stride=2), nn.AdaptiveAvgPool2d(1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class InceptionFeatures(LearnedMetric, DistributionMetric):
    """The features of the clean-fid protocol, shared by FID and KID (one forward pass for both)."""

    weight_files = f"{INCEPTION_FILE} (TorchScript Inception-v3, {INCEPTION_URL})"
    weights_url, weights_sha256 = INCEPTION_URL, INCEPTION_SHA256

    def to(self, device) -> "InceptionFeatures":
        super().to(device)
        self.dtype = torch.float32  # clean-fid runs the Inception in float32; half precision would move FID
        return self

    def backbone(self) -> tuple:
        from bench.io import cache_root

        return ("clean-fid-inception", self.weights_url, str(cache_root()))  # another BENCH_HOME may hold another file

    def load_official(self):
        path = self.url_weights(self.weights_url, self.weights_sha256)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; the official weights are TorchScript
            base = torch.jit.load(str(path), map_location="cpu")
        return (base.layers,)  # what InceptionV3W calls when the resize is done outside the network

    def load_tiny(self):
        with seeded():
            return (TinyInception(),)

    def download(self) -> list[str]:
        return [str(self.url_weights(self.weights_url, self.weights_sha256))]

    def embed(self, pixels: torch.Tensor) -> torch.Tensor:
        """Features of images already resized to 299x299, float in [0, 255] (clean-fid's ``custom_feat_extractor`` input)."""
        (net,) = self.loaded()
        x = pixels.to(self.device, torch.float32)
        with torch.no_grad():
            out = net((x - 128) / 128)
        return out.reshape(x.shape[0], -1).float().cpu()

    def features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return self.embed(clean_batch(images))

    def feature_protocol(self) -> dict:
        official = self.scorers == "official"
        return {
            "library": "clean-fid",
            "library_version": "0.1.35 (protocol reproduced in bench.metrics.fid, compared with cleanfid in tests/test_fid.py)",
            "mode": "clean",
            "resize": "PIL bicubic to 299x299 on float32 pixels, per channel, clipped to [0, 255], not quantized",
            "normalize": "(x - 128) / 128",
            "feature_extractor": "Inception-v3 pool3, 2048-d (TorchScript inception-2015-12-05.pt)" if official else "tiny random conv net, 64-d (scorers=tiny, NOT MEANINGFUL)",
            "weights": self.weights_url if official else "tiny-random",
        }


class FID(InceptionFeatures):
    info = MetricInfo(
        name="fid", version="clean-fid-clean", higher_is_better=False,
        scale="Frechet distance of Inception-v3 pool3 features, clean-fid 'clean' mode (PIL bicubic to 299)", model_id=INCEPTION_URL,
    )

    def compute(self, gen: FeatureSet, ref: FeatureSet) -> float:
        return fid(gen.stats, ref.stats)

    def replicates(self, gen: FeatureSet, ref: FeatureSet, masks: np.ndarray) -> np.ndarray:
        frechet = FrechetToReal(gen.feats, ref.stats)
        return np.array([frechet(np.flatnonzero(mask)) for mask in masks])


class KID(InceptionFeatures):
    info = MetricInfo(
        name="kid", version="clean-fid-clean", higher_is_better=False,
        scale="kernel inception distance (raw, not x1000), clean-fid 'clean' mode, cubic polynomial kernel", model_id=INCEPTION_URL,
    )
    keeps_features = True

    def protocol(self) -> dict:
        return {**self.feature_protocol(), "kid": {"kernel": "(x.y / d + 1)^3", "num_subsets": KID_SUBSETS, "max_subset_size": KID_SUBSET_SIZE, "seed": KID_SEED}}

    def compute(self, gen: FeatureSet, ref: FeatureSet) -> float:
        return kernel_distance(gen.feats, ref.feats)

    def reduce(self, gen: FeatureSet, ref: FeatureSet) -> dict:
        """KID and the std of its subset values (ddof 0), as torchmetrics and torch-fidelity report it."""
        values = kid_subsets(gen.feats, ref.feats)
        return {"value": float(values.mean()), "std": float(values.std())}

    def replicates(self, gen: FeatureSet, ref: FeatureSet, masks: np.ndarray) -> np.ndarray:
        return kid_replicates(gen.feats, ref.feats, masks)


# --------------------------------------------------------------------------- stand-ins for tests and benchmarks


class TorchScriptStandIn(torch.nn.Module):
    """A module shaped like ``inception-2015-12-05.pt`` (whose real weights are a download):
    ``layers(x)`` gives the pool3 features of (x - 128) / 128, ``forward(x, return_features=True)``
    the network's own path, reshaped to ``dim``."""

    def __init__(self, layers: torch.nn.Module, dim: int):
        super().__init__()
        self.layers, self.dim = layers, dim

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.layers(x).reshape(x.shape[0], self.dim)


def save_stand_in(path: Path, layers: torch.nn.Module, dim: int) -> Path:
    """Script ``layers`` into a TorchScript file at ``path`` (the official file name in tests)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, and still what the official file is
        torch.jit.script(TorchScriptStandIn(layers.eval(), dim)).save(str(path))
    return path


def random_inception_pool3(seed: int = 0) -> torch.nn.Sequential:
    """torchvision's Inception-v3 up to pool3 (2048-d) with random weights: the official extractor's
    architecture and cost. Random weights with untouched batch-norm statistics give nearly the same
    features for every image, so one pass over random images in training mode sets the statistics."""
    from torchvision.models import inception_v3

    with seeded(seed):
        net = inception_v3(weights=None, aux_logits=False, init_weights=False)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # a plain average over the calibration batch
    net.train()
    with torch.no_grad():
        net(torch.rand(8, 3, 299, 299, generator=torch.Generator().manual_seed(seed + 1)) * 2 - 1)
    names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c",
             "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c", "avgpool"]
    return torch.nn.Sequential(*[getattr(net, n) for n in names]).eval()
