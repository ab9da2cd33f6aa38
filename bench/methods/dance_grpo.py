"""DanceGRPO (Xue et al., 2025): group-relative policy optimization of a flow model through an SDE
with a constant diffusion coefficient.

The rounds sample ``samples_per_prompt`` trajectories per prompt through DanceGRPO's SDE
(``dance_sde``, ``bench.models.flow``: the Flow-GRPO step with sigma_t = eta, the official 0.3), all
of a prompt's group from one initial noise (``init_same_noise``), so the group differs only by the
SDE's noise; the code rewards the last step's clean estimate rather than the final sample
(``reward_on_estimate``). The advantage is the reward less its group's mean over the group's (unbiased) std +
1e-8, clipped to [-adv_clip_max, adv_clip_max] (DDPO's); the loss is PPO's clipped ratio with no
KL term and no reference model:

    L = max( -A ratio, -A clip(ratio, 1 - clip_range, 1 + clip_range) )

The authors' code (XueZeyue/DanceGRPO, ``fastvideo/train_grpo_flux.py`` and its
``finetune_flux_grpo.sh``), whose choices are the ``dance-grpo`` preset, means each transition's
log-density over latent elements (the clip range 1e-4 is read on that scale), never trains a
trajectory's last transition, and trains each trajectory at its own random int(0.6 (N - 1)) of the
others (``timestep_fraction``, drawn per trajectory and round, seeded). ``dance-grpo-paper`` keeps the
paper's written objective: summed densities, every step of every trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.generate import image_seed
from bench.method import TrainContext
from bench.methods.ddpo import DDPO
from bench.methods.online import OnlineRounds
from bench.schema import Rule, at_least, setting


class DanceRounds(OnlineRounds):
    """DanceGRPO's rounds: a prompt's trajectories start from one noise (``--init_same_noise``), and the
    reward scores the last step's clean estimate x - sigma v where the code's does (``reward_on_estimate``)."""

    def __init__(self, spec, *args, **kwargs):
        super().__init__(spec, *args, **kwargs)
        self.shared_noise, self.reward_on_estimate = spec.init_same_noise, spec.reward_on_estimate

    def initial_latents(self, ctx: TrainContext, r: int, samples: range) -> torch.Tensor | None:
        if not self.shared_noise:
            return None
        shape = ctx.model.latent_shape()
        group_noise = lambda group: torch.randn(shape, generator=torch.Generator().manual_seed(image_seed(f"{self.name}-init", r, group, self.seed)), dtype=torch.float64)  # noqa: E731
        return torch.stack([group_noise(i // self.samples_per_prompt) for i in samples])

    def rewarded_latents(self, x0: torch.Tensor, transitions: list) -> torch.Tensor:
        """The code decodes ``pred_original`` of the last step: its clean estimate, without the noise that step draws."""
        return transitions[-1].x0_hat if self.reward_on_estimate else x0


class DanceGRPO(DDPO):
    name = "dance-grpo"

    @dataclass(kw_only=True)
    class Spec(DDPO.Spec):
        samples_per_prompt: int = setting(12, "the group: trajectories per prompt whose rewards are normalized together (the code: num_generations 12)", at_least(2))
        prompts_per_round: int = setting(4, "groups (prompts) sampled per round (the code: one per GPU, 16)", at_least(1))
        timestep_fraction: float = setting(0.6, "each trajectory trains a random int(fraction x its trainable steps) of them (the code: 0.6)", Rule("in (0, 1]", lambda v: 0 < v <= 1))
        train_last_step: bool = setting(False, "whether the last transition (onto sigma 0) trains; the code never trains it, the paper's objective sums every step")
        init_same_noise: bool = setting(True, "a prompt's trajectories start from one initial noise (the code's --init_same_noise)")
        reward_on_estimate: bool = setting(True, "the reward scores the last step's clean estimate x - sigma v (the code); false: the final sample")

    rounds_class = DanceRounds

    def trainable_steps(self, ctx: TrainContext) -> int:
        n = len(ctx.model.stochastic_timesteps())
        return n if self.spec.train_last_step else max(1, n - 1)

    def trained_steps(self, ctx: TrainContext) -> int:
        return max(1, int(self.trainable_steps(ctx) * self.spec.timestep_fraction))

    def unit_steps(self, ctx: TrainContext, r: int, traj: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
        """Each trajectory's own seeded order of its trainable steps, read at the unit's slot (the code's per-sample randperm)."""
        n = self.trainable_steps(ctx)
        order = lambda j: torch.randperm(n, generator=torch.Generator().manual_seed(image_seed(f"{self.name}-steps", r, j, self.spec.seed)))  # noqa: E731
        orders = {int(j): order(int(j)) for j in traj.unique()}
        return torch.stack([orders[int(j)][int(k)] for j, k in zip(traj, slot)])

    def plan_units(self, p):
        return self.samples_per_prompt() * max(1, int((p.stochastic_steps - 1) * self.spec.timestep_fraction))
