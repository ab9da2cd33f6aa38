"""Weight-free image metrics: no model, no download, deterministic on the stored pixels.

They are cheap sanity columns next to learned rewards: a fine-tune that games a
reward often shows up first as drift in brightness, contrast, colour or
compressibility.
"""

from __future__ import annotations

import io
from typing import Sequence

import torch
from PIL import Image

from bench.metrics import Metric, MetricInfo

# Rec.601 luma weights for R, G, B.
_LUMA = (0.299, 0.587, 0.114)


def _luma(images: torch.Tensor) -> torch.Tensor:
    """Rec.601 luma ``(N, H*W)`` in float64, same [0, 1] range as the input."""
    x = images.to(torch.float64)
    w = torch.tensor(_LUMA, dtype=torch.float64, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(dim=1).flatten(1)


class Brightness(Metric):
    """Mean Rec.601 luma: tracks global exposure drift (0 = black, 1 = white)."""
    differentiable = True
    needs_prompts = False
    info = MetricInfo(name="brightness", version="1", higher_is_better=True, scale="mean Rec.601 luma in [0, 1]")

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        return _luma(images).mean(dim=1)


class Contrast(Metric):
    """Population std of Rec.601 luma: tracks washed-out or over-punchy images."""
    differentiable = True
    needs_prompts = False
    info = MetricInfo(
        name="contrast", version="1", higher_is_better=True, scale="population std of Rec.601 luma in [0, 1]"
    )

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        return _luma(images).std(dim=1, correction=0)


class Colorfulness(Metric):
    """Hasler & Suesstrunk (2003) colorfulness, on the 0-255 scale the paper's thresholds use.

    rg = R - G, yb = (R + G) / 2 - B; C = sqrt(std_rg^2 + std_yb^2) + 0.3 * sqrt(mean_rg^2 + mean_yb^2),
    with population standard deviations.
    """
    differentiable = True
    needs_prompts = False
    info = MetricInfo(
        name="colorfulness", version="1", higher_is_better=True, scale="Hasler-Suesstrunk C on 0-255 pixel values"
    )

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        x = images.to(torch.float64).flatten(2) * 255.0  # (N, 3, H*W)
        r, g, b = x[:, 0], x[:, 1], x[:, 2]
        rg = r - g
        yb = 0.5 * (r + g) - b
        sigma = torch.sqrt(rg.var(dim=1, correction=0) + yb.var(dim=1, correction=0))
        mu = torch.sqrt(rg.mean(dim=1) ** 2 + yb.mean(dim=1) ** 2)
        return sigma + 0.3 * mu


class JpegCompressibility(Metric):
    """DDPO's jpeg_compressibility reward: minus the JPEG size in kB (PIL, quality 95).

    Kept byte-for-byte with DDPO (uint8 via round(x * 255), kB = bytes / 1000) so
    numbers are comparable with that paper's compressibility task.
    """
    needs_prompts = False
    info = MetricInfo(
        name="jpeg_compressibility",
        version="1",
        higher_is_better=True,
        scale="minus kB (1000 bytes) of PIL JPEG at quality 95",
    )

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        u8 = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        sizes = []
        for arr in u8:
            buf = io.BytesIO()
            Image.fromarray(arr).save(buf, format="JPEG", quality=95)
            sizes.append(buf.tell() / 1000)
        return -torch.tensor(sizes, dtype=torch.float64)
