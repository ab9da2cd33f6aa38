"""Supervised fine-tuning on the preferred images (rejection sampling / RAFT, and the "SFT"
baseline of Diffusion-DPO and DSPO, which trains on Pick-a-Pic winners).

1. Preferred images: the best of K self-generated samples per training prompt under the
   configured reward, or the preferred image of each pair of a dataset (``data=pickapic-v2``).
2. Fine-tune with the plain diffusion loss on them:

       L = E_{t ~ U[0, T), eps ~ N(0, I)} || eps - eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, c) ||^2

Self-generated samples are the latents the sampler produced, so no re-encoding is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.methods.preference_data import PairMethod, PairSpec
from bench.schema import at_least, one_of, setting


class SFT(PairMethod):
    image_references = False
    uses_reference = False  # no frozen model: a full fine-tuning keeps no copy of the UNet

    @dataclass(kw_only=True)
    class Spec(PairSpec):
        samples_per_prompt: int = setting(8, "the best of K self-generated samples per training prompt is fine-tuned on (K=8: measured on the micro world)", at_least(1))
        timesteps: str = setting("uniform", "uniform over [0, T), or sampler: only the sampler's own timesteps", one_of("uniform", "sampler"))

    def loss(self, ctx, data, generator: torch.Generator):
        pairs = self.pairs(ctx, data, generator)
        cond = ctx.model.encode_prompts(pairs.prompts)
        steps = ctx.model.timesteps() if self.spec.timesteps == "sampler" else None
        return ctx.model.diffusion_loss(pairs.x_w, cond, generator, timesteps=steps).mean(), {}

    def plan_micro(self, p):
        return p.work(p.passes(grad=[(p.batch_size, 1)]))  # the epsilon loss on the preferred images
