"""DiffusionNFT (Zheng et al., 2025): online reinforcement of a flow model on the forward process.

Each round samples ``samples_per_prompt`` clean images per prompt from the *old* policy, with any
solver and no CFG (the preset: the model's Euler ODE at guidance 1), and keeps only the final
latents x0 and their rewards: no trajectories, no likelihoods. A reward becomes an optimality
probability r = 1/2 + 1/2 clip(A / adv_clip_max, -1, 1), A being the reward less its prompt group's
mean over the round's std (as Flow-GRPO's code, ``bench.methods.flow_grpo.group_advantages``).
Training noises x0 forward, x_t = (1 - t) x0 + t eps, and contrasts two implicit policies built from
the trained velocity v_theta and the old one v_old:

    v+ = beta v_theta + (1 - beta) v_old        v- = (1 + beta) v_old - beta v_theta
    L  = r ||v+ - v||^2 + (1 - r) ||v- - v||^2,  v = eps - x0

so a good sample pulls v_theta toward its flow and a bad one pushes it away. The old policy is the
trained weights' slow copy, theta_old <- eta theta_old + (1 - eta) theta after each round, with eta =
min(old_decay_rate x optimizer steps, old_decay_max); it samples the rounds and gives v_old.

The authors' code (NVlabs/DiffusionNFT, ``scripts/train_nft_sd3.py``, ``config/nft.py``), whose
choices are the ``diffusion-nft`` preset, writes each branch in x0 space with a detached adaptive
weight, L+- = mean((x0+- - x0)^2) / max(mean|x0+- - x0|, 1e-5) with x0+- = x_t - t v+-
(``adaptive_weight``; in velocity terms t mean((v+- - v)^2) / mean|v+- - v|), scales the policy term
by adv_clip_max / beta, adds kl_weight mean((v_theta - v_ref)^2) to the base model (LoRA off), and
trains each sample at int(0.99 N) of the sampler's own N timesteps in a random order, fresh noise at
each. ``diffusion-nft-paper`` keeps the paper's objective as written above.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from bench.errors import UsageError
from bench.generate import image_seed
from bench.method import TrainContext
from bench.methods.flow_grpo import group_advantages
from bench.methods.online import OnlineMethod, OnlineRounds, SampledSpec
from bench.schema import Rule, above, at_least, setting


def optimality(advantages: torch.Tensor, clip_max: float) -> torch.Tensor:
    """r = 1/2 + 1/2 clip(A / clip_max, -1, 1): the probability that a sample is a good one."""
    return (advantages / clip_max / 2 + 0.5).clamp(0, 1)


def implicit_policies(v_theta: torch.Tensor, v_old: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The positive and negative velocities: beta v_theta + (1 - beta) v_old, (1 + beta) v_old - beta v_theta."""
    return beta * v_theta + (1 - beta) * v_old, (1 + beta) * v_old - beta * v_theta


def branch_loss(v: torch.Tensor, x_t: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, adaptive: bool) -> torch.Tensor:
    """One branch's error per sample: with ``adaptive`` (the code) its x0 prediction x_t - t v against x0,
    squared, over its detached mean absolute error (at least 1e-5); else the paper's velocity error
    mean((v - (noise - x0))^2)."""
    if not adaptive:
        return ((v - (noise - x0)) ** 2).flatten(1).mean(1)
    err = x_t - t.reshape(-1, *([1] * (x0.dim() - 1))) * v - x0
    return (err**2).flatten(1).mean(1) / err.abs().flatten(1).mean(1).clamp_min(1e-5).detach()


class SlowCopy:
    """The old policy's weights: a slow copy of the trainable parameters, swapped in (their storages
    exchanged, nothing copied) to sample the rounds and to give v_old; while swapped in, ``weights``
    holds the trained ones."""

    def __init__(self, unet: torch.nn.Module):
        self.params = {n: p for n, p in unet.named_parameters() if p.requires_grad}
        self.weights = {n: p.detach().clone() for n, p in self.params.items()}
        self.round = 0  # the round these weights sample

    def _exchange(self) -> None:
        for n, p in self.params.items():
            p.data, self.weights[n] = self.weights[n], p.data

    @contextmanager
    def swapped_in(self):
        self._exchange()
        try:
            yield
        finally:
            self._exchange()

    @torch.no_grad()
    def update(self, eta: float) -> None:
        for n, p in self.params.items():
            self.weights[n].mul_(eta).add_(p.detach(), alpha=1 - eta)


class FinalSamples(OnlineRounds):
    """Rounds that keep only each sample's final latents and reward (any solver; no log-probabilities)."""

    def sample_chunk(self, ctx: TrainContext, prompts: list[str], gens: list[torch.Generator], initial: torch.Tensor | None) -> dict[str, torch.Tensor]:
        x0 = ctx.model.sample(prompts, gens, initial=initial)
        return {"rewards": ctx.rewards(x0, prompts), "latents": x0.float().cpu()}


class DiffusionNFT(OnlineMethod):
    name = "diffusion-nft"
    rounds_class = FinalSamples

    @dataclass(kw_only=True)
    class Spec(SampledSpec):
        samples_per_prompt: int = setting(8, "the group K: samples per prompt whose rewards are normalized together (the code: 24)", at_least(2))
        prompts_per_round: int = setting(4, "groups (prompts) sampled per round (the code: 48)", at_least(1))
        beta: float = setting(1.0, "the implicit policies' step: v+ = beta v_theta + (1 - beta) v_old (the code: 1.0; 0.1 for OCR and several rewards)", above(0))
        adv_clip_max: float = setting(5.0, "r = 1/2 + 1/2 clip(A / adv_clip_max, -1, 1) (the code's adv_clip_max)", above(0))
        adaptive_weight: bool = setting(True, "each branch in x0 space over its detached mean absolute error (the code); false: the plain velocity error (the paper)")
        policy_scale: bool = setting(True, "the policy term times adv_clip_max / beta (the code); false: as written")
        kl_weight: float = setting(1.0e-4, "weight of mean((v_theta - v_ref)^2) to the base model (the code's train.beta); 0: none (the paper)", at_least(0))
        timestep_fraction: float = setting(0.99, "each sample trains at the first int(fraction x N) of a random order of the sampler's N timesteps (the code: 0.99)",
                                           Rule("in (0, 1]", lambda v: 0 < v <= 1))
        old_decay_rate: float = setting(0.001, "eta = min(rate x optimizer steps, old_decay_max) in theta_old <- eta theta_old + (1 - eta) theta", at_least(0))
        old_decay_max: float = setting(0.5, "the old policy's largest eta (the code: 0.5)", Rule("in [0, 1)", lambda v: 0 <= v < 1))

    @property
    def uses_reference(self) -> bool:
        return self.spec.kl_weight > 0

    def samples_per_prompt(self) -> int:
        return self.spec.samples_per_prompt

    def trained_steps(self, ctx: TrainContext) -> int:
        return max(1, int(len(ctx.model.timesteps()) * self.spec.timestep_fraction))

    def units_per_prompt(self, ctx: TrainContext) -> int:
        return self.samples_per_prompt() * self.trained_steps(ctx)  # a sample at each trained timestep

    def unit_group(self, ctx: TrainContext) -> int:
        return self.trained_steps(ctx)  # a sample's timesteps travel together, as the code loops over them

    def prepare(self, ctx: TrainContext) -> FinalSamples:
        if ctx.model.predicts != "velocity":
            raise UsageError(f"diffusion-nft trains a flow model's velocity, and model '{ctx.model.name}' predicts epsilon: use a flow model (model=tiny-flux, sd35-medium)")
        if ctx.model.uses_cfg(ctx.model.sampler.guidance):
            raise UsageError(f"diffusion-nft samples without CFG, and the training sampler guides at {ctx.model.sampler.guidance}: set train.sampler.guidance=1.0")
        self.old = SlowCopy(ctx.model.unet)
        return self.rounds(ctx)

    @contextmanager
    def sampling_policy(self, ctx: TrainContext):
        """Rounds sample with the old policy."""
        with self.old.swapped_in():
            yield

    def follow(self, ctx: TrainContext, r: int) -> None:
        """Bring the old policy to round r: one soft update per round passed, at the optimizer steps taken."""
        while self.old.round < r:
            self.old.round += 1
            eta = min(self.spec.old_decay_rate * self.old.round * self.steps_per_round(ctx), self.spec.old_decay_max)
            self.old.update(eta)

    def unit_timesteps(self, ctx: TrainContext, r: int, samples: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Each unit's timestep: its sample's seeded order of the sampler's timesteps, at its slot."""
        grid = torch.tensor(ctx.model.timesteps(), dtype=torch.float64)
        orders = {int(i): torch.randperm(len(grid), generator=torch.Generator().manual_seed(image_seed(f"{self.name}-t", r, int(i), self.spec.seed))) for i in samples.unique()}
        return torch.stack([grid[orders[int(i)][int(j)]] for i, j in zip(samples, slots)])

    def loss(self, ctx: TrainContext, data, generator: torch.Generator):
        self.follow(ctx, ctx.step // self.steps_per_round(ctx))  # this round's old policy, before it samples the round
        r, batch, units = self.next_units(ctx, data)
        s, k = self.samples_per_prompt(), self.trained_steps(ctx)
        samples, slots = units // k, units % k
        prompts_all = [ctx.prompts[int(i)] for i in batch["prompt_index"] for _ in range(s)]
        adv = group_advantages(batch["rewards"].flatten(), prompts_all, True, self.spec.adv_clip_max)
        x0 = batch["latents"].flatten(0, 1)[samples].to(ctx.device, ctx.model.dtype)
        t = self.unit_timesteps(ctx, r, samples, slots)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.device, x0.dtype)
        losses, logs = self.unit_losses(ctx, x0, noise, t.to(ctx.device), [prompts_all[int(i)] for i in samples], optimality(adv[samples], self.spec.adv_clip_max).to(ctx.device))
        return losses.mean(), {"round": r, **logs}

    def unit_losses(self, ctx: TrainContext, x0, noise, t, prompts: list[str], r: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Each unit's contrastive loss at timestep ``t`` (sigma x 1000) from its noise, plus the KL term."""
        model, spec = ctx.model, self.spec
        cond = model.encode_prompts(prompts, 1.0)
        t_model = t.to(x0.dtype)
        x_t = model.add_noise(x0, noise, t_model)
        with torch.no_grad(), self.old.swapped_in():
            v_old = model.denoise(x_t, t_model, cond)
        v_theta = model.denoise(x_t, t_model, cond)
        v_plus, v_minus = implicit_policies(v_theta.double(), v_old.double(), spec.beta)
        exact = dict(x_t=x_t.double(), x0=x0.double(), noise=noise.double(), t=t.double() / model.num_train_timesteps, adaptive=spec.adaptive_weight)
        positive, negative = branch_loss(v_plus, **exact), branch_loss(v_minus, **exact)
        policy = r.double() * positive + (1 - r.double()) * negative
        if spec.policy_scale:
            policy = policy * spec.adv_clip_max / spec.beta
        logs = {"policy_loss": float(policy.detach().mean()), "r_mean": float(r.mean())}
        if spec.kl_weight <= 0:
            return policy, logs
        with torch.no_grad(), ctx.reference():
            v_ref = model.denoise(x_t, t_model, cond)
        kl = ((v_theta.double() - v_ref.double()) ** 2).flatten(1).mean(1)
        return policy + spec.kl_weight * kl, {**logs, "kl": float(kl.detach().mean())}

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {**{f"old.{n}": w.cpu() for n, w in self.old.weights.items()}, "old_round": torch.tensor([self.old.round])}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for n, w in self.old.weights.items():
            w.copy_(tensors[f"old.{n}"])
        self.old.round = int(tensors["old_round"][0])

    def plan_units(self, p):
        return self.samples_per_prompt() * max(1, int(p.sampler_steps * self.spec.timestep_fraction))

    def plan_micro(self, p):
        passes = p.split(p.batch_size, 1)  # per-sample timesteps in one pass; the old policy's, and the reference's with a KL term
        return p.work(p.passes(grad=passes, nograd=passes + (passes if self.spec.kl_weight > 0 else [])))
