"""Similarity to reference images, the DreamBench protocol: the mean, over a subject's real
images, of a similarity between an embedding of the generated image and of each real one.

``ReferenceMetric`` holds the protocol (embed the references once per set, average the pairwise
similarities); a subclass supplies the embedding and the similarity. DINO and CLIP-I are the
learned embeddings; the two here are weight-free, for offline smoke runs and CPU tests:

* ``ref_color``: histogram intersection (Swain & Ballard, 1991) of joint RGB histograms with 8
  bins per channel, in [0, 1]: do the images share the subject's colours?
* ``ref_layout``: Pearson correlation of 8x8 RGB thumbnails, in [-1, 1]: do they share its
  coarse layout, regardless of exposure and contrast?
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from bench.images import open_rgb, square, thread_map
from bench.metrics import Metric, MetricInfo, ReferenceSet

REFERENCE_SIZE = 64  # references are resized and center-cropped to this before embedding


class ReferenceMetric(Metric):
    needs_refs = True
    needs_prompts = False  # compares images with the subject's photos

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) float in [0, 1] -> (N, D)."""
        raise NotImplementedError

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """(N, D), (M, D) -> (N, M)."""
        raise NotImplementedError

    def embed_references(self, paths: Sequence) -> torch.Tensor:
        """The reference photos' embeddings; here resized and center-cropped to ``REFERENCE_SIZE``
        (a learned metric overrides this with its own preprocessing of the full-size photos)."""
        pixels = torch.stack(thread_map(lambda p: square(open_rgb(p), REFERENCE_SIZE), paths))
        return self.embed(pixels.double() / 255)

    def references(self, refs: ReferenceSet) -> torch.Tensor:
        cache = self.__dict__.setdefault("_reference_embeddings", {})  # once per reference set
        if refs.key not in cache:
            cache[refs.key] = self.embed_references(refs.paths)
        return cache[refs.key]

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs: Sequence[ReferenceSet] | None = None) -> torch.Tensor:
        if refs is None or len(refs) != images.shape[0]:
            raise ValueError(f"metric {self.name} needs one reference set per image")
        gen = self.embed(images)
        out = [self.similarity(gen[i : i + 1], self.references(r).to(gen.device)).mean() for i, r in enumerate(refs)]
        return torch.stack(out).double().cpu()


class ColorHistogramSimilarity(ReferenceMetric):
    info = MetricInfo(
        name="ref_color", version="1", higher_is_better=True, scale="histogram intersection of 8x8x8 RGB histograms, mean over references, in [0, 1]"
    )
    bins = 8

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        q = (images.double() * 255).round().clamp(0, 255).long() * self.bins // 256  # (N, 3, H, W) bin per channel
        index = (q[:, 0] * self.bins + q[:, 1]) * self.bins + q[:, 2]
        hist = torch.zeros(images.shape[0], self.bins**3, dtype=torch.float64, device=images.device)
        hist.scatter_add_(1, index.flatten(1), torch.ones_like(index.flatten(1), dtype=torch.float64))
        return hist / hist.sum(1, keepdim=True)

    def similarity(self, a, b):
        return torch.minimum(a[:, None], b[None]).sum(-1)


class ThumbnailCorrelation(ReferenceMetric):
    info = MetricInfo(
        name="ref_layout", version="1", higher_is_better=True, scale="Pearson correlation of 8x8 RGB thumbnails, mean over references, in [-1, 1]"
    )

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        thumb = F.adaptive_avg_pool2d(images.double(), 8).flatten(1)
        thumb = thumb - thumb.mean(1, keepdim=True)
        return thumb / thumb.norm(dim=1, keepdim=True).clamp_min(1e-12)

    def similarity(self, a, b):
        return a @ b.T
