"""Rejection-sampling fine-tuning (best-of-K supervised fine-tuning, as in RAFT / GORS-style filtering).

1. For every training prompt, sample K images from the base model.
2. Score them with the configured reward and keep the best one per prompt.
3. Fine-tune with the plain diffusion loss on the kept samples:

       L = E_{t ~ U[0, T), eps ~ N(0, I)} || eps - eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, c) ||^2

The kept samples are the latents the sampler produced, so no re-encoding is needed.
"""

from __future__ import annotations

import torch

from bench.method import Method, TrainContext
from bench.methods.preference_data import sample_candidates


class SFT(Method):
    def data_spec(self) -> dict:
        return {"samples_per_prompt": self.cfg["samples_per_prompt"], "reward": self.cfg["reward"], "seed": self.cfg["seed"]}

    def prepare(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        best_latents, best_rewards, mean_rewards = [], [], []
        for _, latents, rewards in sample_candidates(ctx, int(self.cfg["samples_per_prompt"]), int(self.cfg["seed"]), "sft: best-of-K samples"):
            best = int(torch.argmax(rewards))
            best_latents.append(latents[best])
            best_rewards.append(rewards[best])
            mean_rewards.append(rewards.mean())
        return {
            "latents": torch.stack(best_latents),
            "prompt_index": torch.arange(len(ctx.prompts)),
            "best_reward": torch.stack(best_rewards),
            "mean_reward": torch.stack(mean_rewards),
        }

    def loss(self, ctx: TrainContext, data: dict[str, torch.Tensor], generator: torch.Generator):
        n = data["latents"].shape[0]
        idx = torch.randint(0, n, (ctx.batch_size,), generator=generator)
        x0 = data["latents"][idx].to(ctx.device, ctx.model.dtype)
        cond = ctx.model.encode_prompts([ctx.prompts[int(i)] for i in data["prompt_index"][idx]])
        steps = ctx.model.timesteps() if self.cfg["timesteps"] == "sampler" else None
        loss = ctx.model.diffusion_loss(x0, cond, generator, timesteps=steps).mean()
        return loss, {}
