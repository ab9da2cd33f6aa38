"""DDPO (Black et al., ICLR 2024) and, on a latent consistency model's MDP, RLCM (Oertell et al.,
2024): policy-gradient fine-tuning with PPO's clipped ratio on the sampler's own transitions.

Each round samples ``samples_per_prompt`` trajectories per prompt from the current model and
records log p_old of every stochastic transition. The advantage of a trajectory is its reward
normalized over the samples of the same prompt (DDPO's per-prompt statistics; over the whole round
when there is one sample per prompt), clipped to [-adv_clip_max, adv_clip_max]. Each transition is
a unit; with ratio = p_theta / p_old,

    L = max( -A * ratio, -A * clip(ratio, 1 - clip_range, 1 + clip_range) )

No reference model: the clip range (1e-4 in DDPO) keeps each update near the sampling policy.
The public code (kvablack/ddpo-pytorch) means log-probabilities over latent elements
(``logprob_reduction: mean``, the preset's default); summed (the paper's densities), a ratio moves by
thousands of times more per update and a 1e-4 clip range stops almost every unit's gradient.
"""

from __future__ import annotations

import torch

from dataclasses import dataclass

from bench.method import TrainContext
from bench.methods.online import LogProbSpec, OnlineMethod, SampledSpec, reduce_log_prob, unit_log_probs
from bench.schema import above, at_least, setting


def advantages(rewards: torch.Tensor, clip_max: float) -> torch.Tensor:
    """(prompts, samples) rewards -> advantages normalized per prompt (per round with one sample)."""
    if rewards.shape[1] > 1:
        a = (rewards - rewards.mean(1, keepdim=True)) / (rewards.std(1, keepdim=True) + 1e-8)
    else:
        a = (rewards - rewards.mean()) / (rewards.std() + 1e-8)
    return a.clamp(-clip_max, clip_max)


def ppo_loss(log_prob, old_log_prob, advantage, clip_range: float) -> torch.Tensor:
    """Per-unit clipped surrogate loss."""
    ratio = torch.exp(log_prob - old_log_prob)
    return torch.maximum(-advantage * ratio, -advantage * torch.clamp(ratio, 1 - clip_range, 1 + clip_range))


class DDPO(OnlineMethod):
    name = "ddpo"
    uses_reference = False  # PPO's clip keeps it near the sampling policy: no reference model

    @dataclass(kw_only=True)
    class Spec(SampledSpec, LogProbSpec):
        prompts_per_round: int = setting(8, "training prompts sampled per round", at_least(1))
        samples_per_prompt: int = setting(4, "trajectories per prompt; advantages are normalized over them", at_least(1))
        clip_range: float = setting(1.0e-4, "PPO's ratio clip (DDPO's train_clip_range)", above(0))
        adv_clip_max: float = setting(5.0, "advantages clipped to [-adv_clip_max, adv_clip_max] (DDPO's train_adv_clip_max)", above(0))

    def samples_per_prompt(self) -> int:
        return self.spec.samples_per_prompt

    def trained_steps(self, ctx: TrainContext) -> int:
        """How many of a trajectory's stochastic steps train (DDPO: all)."""
        return len(ctx.model.stochastic_timesteps())

    def units_per_prompt(self, ctx: TrainContext) -> int:
        return self.samples_per_prompt() * self.trained_steps(ctx)  # a trajectory at each trained step

    def unit_group(self, ctx: TrainContext) -> int:
        return self.trained_steps(ctx)  # a trajectory's steps travel together, as ddpo-pytorch batches them

    def unit_steps(self, ctx: TrainContext, r: int, traj: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """The sampler step each unit trains: a trajectory's ``slot``-th trained step (DDPO: its first ones, in order)."""
        return slot

    def round_advantages(self, ctx: TrainContext, batch) -> torch.Tensor:
        """Every trajectory's advantage in the round, flat: normalized per prompt."""
        return advantages(batch["rewards"], self.spec.adv_clip_max).flatten()

    def loss(self, ctx: TrainContext, data, generator: torch.Generator):
        r, batch, units = self.next_units(ctx, data)
        s, k = self.samples_per_prompt(), self.trained_steps(ctx)
        traj = units // k
        step = self.unit_steps(ctx, r, traj, units % k)
        states = batch["states"].flatten(0, 1)[traj]
        old = batch["log_probs"].flatten(0, 1)[traj, step].to(ctx.device)  # summed over elements when sampled
        adv = self.round_advantages(ctx, batch)[traj].to(ctx.device)
        prompts = [ctx.prompts[int(batch["prompt_index"][int(i) // s])] for i in traj]
        to = dict(device=ctx.device, dtype=ctx.model.dtype)
        rows = torch.arange(len(units))
        x_t, x_prev = states[rows, step].to(**to), states[rows, step + 1].to(**to)
        old = reduce_log_prob(old, x_prev, self.spec.logprob_reduction)
        losses, logs = self.unit_losses(ctx, x_t, x_prev, step, prompts, old, adv)
        return losses.mean(), {"round": r, **logs}

    def unit_losses(self, ctx: TrainContext, x_t, x_prev, step, prompts, old, adv) -> tuple[torch.Tensor, dict]:
        """Each unit's clipped surrogate, from its log-probability now against ``old`` at sampling."""
        log_prob = unit_log_probs(ctx, x_t, x_prev, step, prompts, reduction=self.spec.logprob_reduction)
        return ppo_loss(log_prob, old, adv, self.spec.clip_range), {}

    def plan_units(self, p):
        return self.samples_per_prompt() * p.stochastic_steps

    def plan_micro(self, p):
        return p.work(p.passes(grad=p.split(p.batch_size * p.cfg, min(p.batch_size, p.stochastic_steps))))  # no reference model
