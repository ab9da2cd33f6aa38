"""Flow-GRPO (Liu et al., NeurIPS 2025): group-relative policy optimization of a flow model through
the SDE that shares its ODE's marginals.

Each round samples a group of ``samples_per_prompt`` trajectories per prompt with the training sampler,
Flow-GRPO's SDE (``flow_sde``, ``bench.models.flow``), usually at fewer steps than evaluation
("denoising reduction": 10 in training, 40 at test for SD3.5-M). The advantage of a trajectory is
its reward less the mean of its prompt's group, over the group's standard deviation (the paper) or
over that of the whole round (the code's ``global_std``), clipped to [-adv_clip_max, adv_clip_max].
Each trained transition is a unit; with ratio = p_theta / p_old,

    L = max( -A ratio, -A clip(ratio, 1 - clip_range, 1 + clip_range) ) + beta KL(p_theta || p_ref)

where the KL of two Gaussian steps with one standard deviation is ||mu_theta - mu_ref||^2 / (2 var),
var the step's variance sigma_t^2 |dt| (the paper's closed form, summed over latent elements). The
authors' code (yifan123/flow_grpo, scripts/train_sd3.py, config/grpo.py), whose choices are this
recipe's defaults and the ``flow-grpo`` preset, differs from those expressions (``flow-grpo-paper``):

* ``logprob_reduction: mean``: log-probabilities meaned over latent elements, as ``sde_step_with_logprob``;
* ``kl_variance: sde``: the KL divides by sigma_t^2 alone (``std_dev_t``, without |dt|), meaned over elements;
* ``global_std: true``: the advantage's std over every reward of the round (its configs' ``sample.global_std``);
* ``detach_uncond: true``: with CFG, the unconditional velocity carries no gradient;
* ``timestep_fraction: 0.99``: only the first int(0.99 N) steps train (9 of 10: the last step, which
  lands on sigma 0, is sampled but not trained).

With summed densities the ratio of a whole latent leaves the code's clip range (1e-4) after one update,
so the clip stops the gradients of every later step of a round (measured in docs/world.md).

Groups are keyed by prompt text, as the code's ``PerPromptStatTracker``: a prompt drawn twice in a
round is one group. The reference is the model with its LoRA adapters off.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.errors import UsageError
from bench.method import TrainContext
from bench.methods.ddpo import DDPO, ppo_loss
from bench.methods.online import reduce_log_prob, step_groups, transition_at
from bench.models.diffusion import gaussian_log_prob
from bench.schema import Rule, at_least, one_of, setting


def group_advantages(rewards: torch.Tensor, prompts: list[str], global_std: bool, clip_max: float) -> torch.Tensor:
    """(trajectories,) rewards -> advantages: minus the mean of the trajectory's prompt group, over the
    group's population std (or the round's, ``global_std``) + 1e-4, clipped; as ``PerPromptStatTracker``."""
    rewards = rewards.double()
    advantages = torch.empty_like(rewards)
    round_std = rewards.std(unbiased=False) + 1e-4
    for prompt in sorted(set(prompts)):
        rows = torch.tensor([p == prompt for p in prompts])
        group = rewards[rows]
        std = round_std if global_std else group.std(unbiased=False) + 1e-4
        advantages[rows] = (group - group.mean()) / std
    return advantages.clamp(-clip_max, clip_max)


def gaussian_step_kl(mean: torch.Tensor, mean_ref: torch.Tensor, variance: torch.Tensor, reduction: str) -> torch.Tensor:
    """KL between two Gaussian steps of one variance, ||mean - mean_ref||^2 / (2 variance), per sample,
    summed or meaned over latent elements."""
    sq = ((mean.double() - mean_ref.double()) ** 2).flatten(1)
    return (sq.sum(1) if reduction == "sum" else sq.mean(1)) / (2 * variance)


class FlowGRPO(DDPO):
    name = "flow-grpo"

    @dataclass(kw_only=True)
    class Spec(DDPO.Spec):
        samples_per_prompt: int = setting(8, "the group: trajectories per prompt whose rewards are normalized together (the code: 24)", at_least(2))
        prompts_per_round: int = setting(4, "groups (prompts) sampled per round (the code: 48)", at_least(1))
        beta: float = setting(0.04, "the KL weight (the code: 0.04 GenEval and OCR, 0.01 PickScore); 0: no reference model", at_least(0))
        global_std: bool = setting(True, "the advantage's std over the whole round (the code's sample.global_std); false: the group's (the paper)")
        kl_variance: str = setting("sde", "sde: KL over sigma_t^2 alone (the code); step: over the step's variance sigma_t^2 |dt| (the paper's closed form)", one_of("sde", "step"))
        detach_uncond: bool = setting(True, "with CFG, no gradient through the unconditional velocity (the code)")
        timestep_fraction: float = setting(0.99, "the fraction of the sampler's steps trained, the first int(fraction x N) (the code: 0.99; the paper: all)", Rule("in (0, 1]", lambda v: 0 < v <= 1))

    @property
    def uses_reference(self) -> bool:
        return self.spec.beta > 0

    def prepare(self, ctx: TrainContext):
        if self.spec.kl_variance == "sde" and self.spec.beta > 0 and ctx.model.predicts != "velocity":
            raise UsageError(f"kl_variance: sde divides by the flow SDE's sigma_t, and model '{ctx.model.name}' is no flow model: "
                             "set method.kl_variance=step (the Gaussian step's own variance)")
        return super().prepare(ctx)

    def trained_steps(self, ctx: TrainContext) -> int:
        """The first int(timestep_fraction x N) stochastic steps (at least one)."""
        return max(1, int(len(ctx.model.stochastic_timesteps()) * self.spec.timestep_fraction))

    def round_advantages(self, ctx: TrainContext, batch) -> torch.Tensor:
        prompts = [ctx.prompts[int(i)] for i in batch["prompt_index"] for _ in range(self.samples_per_prompt())]
        return group_advantages(batch["rewards"].flatten(), prompts, self.spec.global_std, self.spec.adv_clip_max)

    def unit_losses(self, ctx: TrainContext, x_t, x_prev, step, prompts, old, adv) -> tuple[torch.Tensor, dict]:
        """The clipped surrogate plus beta times the KL of the step to the reference's."""
        log_prob, kl = self.unit_terms(ctx, x_t, x_prev, step, prompts)
        policy = ppo_loss(log_prob, old, adv, self.spec.clip_range)
        ratio = torch.exp(log_prob.detach() - old)
        logs = {"policy_loss": float(policy.detach().mean()), "clipfrac": float(((ratio - 1).abs() > self.spec.clip_range).double().mean())}
        if self.spec.beta > 0:
            logs["kl"] = float(kl.detach().mean())
        return policy + self.spec.beta * kl, logs

    def unit_terms(self, ctx: TrainContext, x_t, x_prev, step: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """log p_theta(x_prev | x_t) of each unit at its own step, and its KL to the reference's step (0 without one)."""
        model, reduction = ctx.model, self.spec.logprob_reduction
        log_prob = torch.zeros(len(step), dtype=torch.float64, device=ctx.device)
        kl = torch.zeros_like(log_prob)
        steps = model.timesteps()
        for i, rows, sub in step_groups(step, prompts, ctx.device):
            ours = transition_at(ctx, x_t[rows], i, sub, detach_uncond=self.spec.detach_uncond)
            lp = reduce_log_prob(gaussian_log_prob(x_prev[rows].double(), ours.mean.double(), ours.std.double()), x_prev[rows], reduction)
            index = (rows.nonzero().squeeze(1),)
            log_prob = log_prob.index_put(index, lp)
            if self.spec.beta > 0:
                with torch.no_grad(), ctx.reference():
                    ref = transition_at(ctx, x_t[rows], i, sub)
                variance = ours.std.double() ** 2
                if self.spec.kl_variance == "sde":  # the code's std_dev_t: sigma_t without sqrt(|dt|)
                    t, t_prev = steps[i], steps[i + 1] if i + 1 < len(steps) else -1
                    variance = variance / (model.sigma(t) - model.sigma(t_prev))
                kl = kl.index_put(index, gaussian_step_kl(ours.mean, ref.mean, variance, reduction))
        return log_prob, kl

    def plan_units(self, p):
        return self.samples_per_prompt() * max(1, int(p.stochastic_steps * self.spec.timestep_fraction))

    def plan_micro(self, p):
        passes = p.split(p.batch_size * p.cfg, min(p.batch_size, p.stochastic_steps))
        return p.work(p.passes(grad=passes, nograd=passes if self.spec.beta > 0 else []))
