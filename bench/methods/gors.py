"""GORS (Huang et al., T2I-CompBench, NeurIPS 2023), "generate, filter, fine-tune", the stable
baseline of LaSRO (GORS-LCM): rounds of K samples per prompt from the current model, the best
under the reward kept, and the model fine-tuned on the kept images.

LaSRO fine-tunes the kept samples with the LCM distillation loss against SSD-1B; with no teacher
here the kept latents are fit with the plain epsilon loss at the few-step sampler's own timesteps
(``timesteps: sampler``; ``uniform`` draws t from [0, T) as GORS does for multi-step models).
"""

from __future__ import annotations

import torch

from dataclasses import dataclass

from bench.method import TrainContext
from bench.methods.online import OnlineMethod, SampledSpec
from bench.schema import at_least, one_of, setting


class GORS(OnlineMethod):
    name = "gors"
    uses_reference = False

    @dataclass(kw_only=True)
    class Spec(SampledSpec):
        samples_per_prompt: int = setting(4, "K samples per prompt, the best kept (LaSRO does not state it)", at_least(1))
        timesteps: str = setting("sampler", "sampler: the epsilon loss at the few-step sampler's timesteps; uniform: t over [0, T)", one_of("sampler", "uniform"))

    def samples_per_prompt(self) -> int:
        return self.spec.samples_per_prompt

    def loss(self, ctx: TrainContext, data, generator: torch.Generator):
        r, batch, units = self.next_units(ctx, data)  # a unit is a prompt of the round
        best = batch["rewards"][units].argmax(1)
        x0 = batch["states"][units, best, -1].to(ctx.device, ctx.model.dtype)
        prompts = [ctx.prompts[int(batch["prompt_index"][int(u)])] for u in units]
        steps = ctx.model.timesteps() if self.spec.timesteps == "sampler" else None
        loss = ctx.model.diffusion_loss(x0, ctx.model.encode_prompts(prompts), generator, timesteps=steps).mean()
        return loss, {"round": r, "kept_reward": float(batch["rewards"][units, best].mean())}

    def plan_micro(self, p):
        return p.work(p.passes(grad=[(p.batch_size, 1)]))  # the epsilon loss on the kept samples
