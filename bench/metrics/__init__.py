"""Metric contract and the built-in metric table.

A metric scores a batch of images (float32 tensor ``(N, 3, H, W)`` in ``[0, 1]``,
decoded from the stored uint8 PNGs so that a cached re-run scores exactly the
same pixels) and returns one float per image. Its identity is its name, its
version and its scale: two numbers with different identities never share a
column.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch


@dataclass(frozen=True)
class MetricInfo:
    name: str
    version: str
    higher_is_better: bool
    scale: str  # what one unit means, e.g. "kB of JPEG at quality 95", "logit_scale * cos"
    model_id: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class ReferenceSet:
    """The real images a generated image is compared with (a DreamBench subject's photos)."""

    key: str
    paths: tuple[Path, ...]


class Metric:
    """Base class: subclasses set ``info`` and implement :meth:`score`.

    A metric with ``needs_refs = True`` (DINO, CLIP-I) also gets, for every image, the
    ``ReferenceSet`` of its prompt, and only runs on suites that have them. A
    ``differentiable`` one can be a reward that methods back-propagate through.
    """

    info: MetricInfo
    needs_refs = False
    differentiable = False  # True: ``score`` is built from differentiable torch ops (reward back-propagation)

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def higher_is_better(self) -> bool:
        return self.info.higher_is_better

    def to(self, device: torch.device | str) -> "Metric":
        return self

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs: Sequence[ReferenceSet] | None = None) -> torch.Tensor:
        """Return a float64 tensor ``(N,)`` of per-image scores."""
        raise NotImplementedError


# name -> ("module:Class", one-line description); imported lazily by the registry.
BUILTIN_METRICS: dict[str, tuple[str, str]] = {
    "brightness": ("bench.metrics.weightfree:Brightness", "mean Rec.601 luma in [0, 1] (weight-free)"),
    "colorfulness": (
        "bench.metrics.weightfree:Colorfulness",
        "Hasler-Suesstrunk colorfulness on the 0-255 scale (weight-free)",
    ),
    "jpeg_compressibility": (
        "bench.metrics.weightfree:JpegCompressibility",
        "minus the JPEG size in kB at quality 95, as DDPO defines it (weight-free)",
    ),
    "contrast": ("bench.metrics.weightfree:Contrast", "standard deviation of Rec.601 luma in [0, 1] (weight-free)"),
    "ref_color": (
        "bench.metrics.reference:ColorHistogramSimilarity",
        "histogram intersection of 8x8x8 RGB histograms with the prompt's reference images, in [0, 1] (weight-free)",
    ),
    "ref_layout": (
        "bench.metrics.reference:ThumbnailCorrelation",
        "Pearson correlation of 8x8 RGB thumbnails with the prompt's reference images, in [-1, 1] (weight-free)",
    ),
}
