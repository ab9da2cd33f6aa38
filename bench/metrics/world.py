"""The micro world's exact evaluator as a metric: GenEval's rules on a prompt of the world's grammar.

``world-geneval`` reads what to check from the prompt alone (``bench.world.scene.spec_of_caption``:
the grammar's captions map one-to-one to GenEval-style specs), finds the objects with the exact
detector of ``bench.world.evaluate`` on the image resized to the world's 64 px, and scores 1 where
the image shows what the caption asks, else 0. A prompt the grammar cannot write scores NaN, so the
suite's mean is over world prompts only. The per-tag accuracy and the overall score (the mean of the
tags, as GenEval averages) come from the suite's ``tag`` groups.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
from PIL import Image

from bench.metrics import Metric, MetricInfo

RESOLUTION = 64  # the world renders and its detector is measured at 64 px


def at_world_resolution(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) at 64 x 64: nearest-neighbour up (a 32 px image keeps its exact colors), box-filtered down."""
    if pixels.shape[:2] == (RESOLUTION, RESOLUTION):
        return pixels
    image = Image.fromarray(pixels)
    method = Image.Resampling.NEAREST if pixels.shape[0] < RESOLUTION else Image.Resampling.BOX
    return np.asarray(image.resize((RESOLUTION, RESOLUTION), method))


class WorldGenEval(Metric):
    """1 where the micro world's exact detector finds what the caption asks (GenEval's rules), else 0."""

    info = MetricInfo(name="world-geneval", version="1", higher_is_better=True,
                      scale="1 if the image shows what its world caption asks (exact detector, GenEval's rules), else 0; NaN off the grammar")

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        from bench.world.evaluate import score
        from bench.world.scene import spec_of_caption

        pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out = []
        for image, prompt in zip(pixels, prompts):
            spec = spec_of_caption(prompt)
            out.append(float("nan") if spec is None else float(score(at_world_resolution(image), spec)))
        return torch.tensor(out, dtype=torch.float64)
