"""The micro world's exact evaluator as a metric: GenEval's rules on a prompt of the world's grammar.

``world-geneval`` reads what to check from the prompt alone (``bench.world.scene.spec_of_caption``:
the grammar's captions map one-to-one to GenEval-style specs), finds the objects with the exact
detector of ``bench.world.evaluate`` on the image resized to the world's 64 px, and scores 1 where
the image shows what the caption asks, else 0. A prompt the grammar cannot write scores NaN, so the
suite's mean is over world prompts only. The per-tag accuracy and the overall score (the mean of the
tags, as GenEval averages) come from the suite's ``tag`` groups.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from bench.metrics import DistributionMetric, Metric, MetricInfo

RESOLUTION = 64  # the world renders and its detector is measured at 64 px
REFERENCE_SEED = 13  # world-clip-i's renders of a caption: layouts drawn from (this, crc32 of the caption)


def at_world_resolution(pixels: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) at 64 x 64: nearest-neighbour up (a 32 px image keeps its exact colors), box-filtered down."""
    if pixels.shape[:2] == (RESOLUTION, RESOLUTION):
        return pixels
    image = Image.fromarray(pixels)
    method = Image.Resampling.NEAREST if pixels.shape[0] < RESOLUTION else Image.Resampling.BOX
    return np.asarray(image.resize((RESOLUTION, RESOLUTION), method))


def per_world_prompt(images: torch.Tensor, prompts: Sequence[str], rule) -> torch.Tensor:
    """``rule(pixels, spec)`` on each image at the world's resolution and the spec its prompt states;
    NaN for a prompt the grammar cannot write."""
    from bench.world.scene import spec_of_caption

    pixels = (images.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = []
    for image, prompt in zip(pixels, prompts):
        spec = spec_of_caption(prompt)
        out.append(float("nan") if spec is None else float(rule(at_world_resolution(image), spec)))
    return torch.tensor(out, dtype=torch.float64)


class WorldGenEval(Metric):
    """1 where the micro world's exact detector finds what the caption asks (GenEval's rules), else 0."""

    info = MetricInfo(name="world-geneval", version="1", higher_is_better=True,
                      scale="1 if the image shows what its world caption asks (exact detector, GenEval's rules), else 0; NaN off the grammar")

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        from bench.world.evaluate import score

        return per_world_prompt(images, prompts, score)


class WorldGold(Metric):
    """The world's gold utility (``bench.world.gold``): correctness plus object size and centering, the
    truth the learned preference ``world-pick`` was trained to stand in for."""

    info = MetricInfo(name="world-gold", version="1", higher_is_better=True,
                      scale="correct (0/1) + 0.25 * size + 0.25 * centering, 0 to 1.5 (bench.world.gold); NaN off the grammar")

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        from bench.world.gold import gold_utility

        return per_world_prompt(images, prompts, gold_utility)


class OnWorldScorers:
    """A metric on the world's shipped scorers (``bench.world.scorers``), whatever ``scorers=`` says:
    they are small and need no download."""

    def __init__(self, scorers: str = "official"):
        self.device = torch.device("cpu")

    def to(self, device):
        self.device = torch.device(device)
        return self


class WorldScorer(OnWorldScorers, Metric):
    """A learned scorer of the micro world: differentiable, so a reward that methods back-propagate through."""

    differentiable = True
    part = "clip"

    def __init__(self, scorers: str = "official"):
        from bench.world.scorers import build_name, world_build

        super().__init__(scorers)
        self.info = replace(self.info, model_id=build_name(world_build()))  # retrained weights: another column

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        from bench.world.scorers import embeddings, scorer_model, text_ids

        model = scorer_model(self.part, str(self.device))
        grad = images.requires_grad and torch.is_grad_enabled()
        with torch.set_grad_enabled(grad):
            image, text = embeddings(model, images.to(self.device, torch.float32), text_ids(prompts, self.device))
            cos = (image * text).sum(-1)
            scores = (model.logit_scale.exp() * cos if self.part == "pick" else cos).double()
        return scores if grad else scores.cpu()


class WorldClip(WorldScorer):
    """CLIP score in the world: cos(image, caption) of the tiny CLIP trained contrastively on its renders."""

    info = MetricInfo(name="world-clip", version="1", higher_is_better=True, scale="cos of the world CLIP's image and caption embeddings, -1 to 1")
    part = "clip"


class WorldPick(WorldScorer):
    """The learned preference of the world, in PickScore's role: the world CLIP fine-tuned on pairs the gold utility labelled."""

    info = MetricInfo(name="world-pick", version="1", higher_is_better=True,
                      scale="logit_scale.exp() * cos of the world preference model (PickScore's form), trained on gold-labelled pairs")
    part = "pick"


class WorldClipI(WorldScorer):
    """CLIP-I in the world, DreamBench's protocol with the caption's exact renders as the subject's
    photos: the mean cos of the world CLIP's image embedding of the image with those of
    ``REFERENCES`` renders of the scene its caption states, each laid out afresh (sizes, places and
    free colors drawn from a seed of the caption, so every run compares with the same renders). It
    asks whether the image looks like a true picture of its caption, where ``world-clip`` reads the
    caption's words: a method that hacks the reward with images unlike any render loses here."""

    info = MetricInfo(name="world-clip-i", version="1", higher_is_better=True,
                      scale="mean cos of the world CLIP's image embeddings with 4 exact renders of the caption, -1 to 1; NaN off the grammar")
    differentiable = False  # NaN off the grammar; world-clip and world-pick are the rewards
    REFERENCES = 4

    def references(self, caption: str) -> torch.Tensor | None:
        """Unit embeddings ``(REFERENCES, 64)`` of the caption's renders, once per caption; None off the grammar."""
        import zlib

        from bench.world.render import render
        from bench.world.scene import layout, spec_of_caption
        from bench.world.scorers import as_float, image_embeddings, scorer_model

        cache = self.__dict__.setdefault("_references", {})
        if caption not in cache:
            spec = spec_of_caption(caption)
            if spec is None:
                cache[caption] = None
            else:
                rng = np.random.default_rng([REFERENCE_SEED, zlib.crc32(" ".join(caption.split()).encode())])
                renders = as_float(np.stack([render(layout(spec, rng), RESOLUTION) for _ in range(self.REFERENCES)]))
                with torch.no_grad():
                    cache[caption] = image_embeddings(scorer_model("clip", str(self.device)), renders.to(self.device))
        return cache[caption]

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        from bench.world.scorers import image_embeddings, scorer_model

        with torch.no_grad():
            gen = image_embeddings(scorer_model("clip", str(self.device)), images.detach().to(self.device, torch.float32))
        out = []
        for embedding, prompt in zip(gen, prompts):
            references = self.references(prompt)
            out.append(float("nan") if references is None else float((references @ embedding).mean()))
        return torch.tensor(out, dtype=torch.float64)


class WorldFID(OnWorldScorers, DistributionMetric):
    """FID in the world: the Frechet distance of the world CLIP's unit image embeddings (64-d, in
    place of Inception's pool3) between the generated set and exact renders of the world's grammar."""

    info = MetricInfo(name="world-fid", version="1", higher_is_better=False,
                      scale="Frechet distance of the world CLIP's unit image embeddings (64-d) to the suite's world renders")

    def features(self, images) -> torch.Tensor:
        from bench.world.scorers import as_float, image_embeddings, scorer_model

        pixels = as_float(np.stack([at_world_resolution(np.asarray(im.convert("RGB"))) for im in images])).to(self.device)
        with torch.no_grad():
            return image_embeddings(scorer_model("clip", str(self.device)), pixels).float().cpu()

    def feature_protocol(self) -> dict:
        from bench.world.scorers import build_name, world_build

        return {
            "library": "bench.world.scorers",
            "mode": "64px",
            "resize": "nearest up, box down to 64x64 (the world evaluator's at_world_resolution)",
            "feature_extractor": "world CLIP image embedding, unit norm, 64-d",
            "weights": build_name(world_build()),
        }

    def compute(self, gen, ref) -> float:
        from bench.metrics.fid import fid

        return fid(gen.stats, ref.stats)

    def replicates(self, gen, ref, masks):
        from bench.metrics.fid import FrechetToReal

        frechet = FrechetToReal(gen.feats, ref.stats)
        return np.array([frechet(np.flatnonzero(mask)) for mask in masks])
