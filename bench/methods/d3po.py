"""D3PO (Yang et al., CVPR 2024): online DPO on the sampler's MDP, the online baseline PSO and SPO
compare with, as its public code (yk7333/d3po, ``scripts/rm/train_d3po.py``) trains it.

Two trajectories per prompt are sampled from the current model and compared by a reward. Each
stochastic transition is its own training unit; a micro-batch holds whole pairs at all their steps
(the code shuffles the steps of each pair and accumulates over them). With
r_s = clip(p_theta(x_{t-1}^s | x_t^s) / p_ref(x_{t-1}^s | x_t^s), 1 - eps, 1 + eps) for the two
samples s = 0, 1 at the same step, and h_s = +1 for the preferred, -1 for the other (0 for both on
a reward tie, the code's ``compare``),

    L = -log sigmoid( beta * (h_0 * log r_0 + h_1 * log r_1) )

Clipping the likelihood ratio (their "Q-value" bound) stops a step from moving the policy far from
the reference; outside the clip the unit carries no gradient. The code's log-probabilities are
meaned over latent elements (``logprob_reduction: mean``); the paper writes densities (``sum``).
The official defaults are beta 0.1, eps 0.1. The authors' online PSO code trains exactly this loss
(PSO's ``-official`` presets), at beta 50 on the few-step samplers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dataclasses import dataclass
from typing import Optional

from bench.method import TrainContext
from bench.methods.online import LogProbSpec, OnlineMethod, OnlineSpec, preference, unit_log_probs
from bench.schema import MISSING, above, inside, one_of, setting


def d3po_loss(logratio_0, logratio_1, prefer, beta: float, eps: float | None) -> torch.Tensor:
    """Per-unit D3PO loss from log p_theta - log p_ref of the two samples at one step; ``prefer``
    is +1 where the first is preferred, -1 where the second is, 0 for a tie (no gradient)."""
    clip = (lambda lr: torch.clamp(torch.exp(lr), 1 - eps, 1 + eps).log()) if eps else (lambda lr: lr)
    h = prefer.to(logratio_0.dtype)
    return -F.logsigmoid(beta * (h * clip(logratio_0) - h * clip(logratio_1)))


class D3PO(OnlineMethod):
    name = "d3po"

    @dataclass(kw_only=True)
    class Spec(OnlineSpec, LogProbSpec):
        beta: float = setting(MISSING, "the DPO strength (the code's 0.1; PSO's -official presets 50)", above(0))
        eps: Optional[float] = setting(0.1, "likelihood ratios clipped to [1 - eps, 1 + eps] (the code's train.eps; null: no clip)", inside(0, 1))
        ties: str = setting("skip", "a reward tie: skip (both samples weight 0, D3PO's compare) or second (the second is preferred)", one_of("skip", "second"))

    def samples_per_prompt(self) -> int:
        return 2

    def units_per_prompt(self, ctx: TrainContext) -> int:
        return len(ctx.model.stochastic_timesteps())  # one unit per pair and stochastic step

    def unit_group(self, ctx: TrainContext) -> int:
        return self.units_per_prompt(ctx)  # a pair's steps travel together

    def loss(self, ctx: TrainContext, data, generator: torch.Generator):
        r, batch, units = self.next_units(ctx, data)
        k = self.units_per_prompt(ctx)
        pair, step = units // k, units % k
        prompts = [ctx.prompts[int(i)] for i in batch["prompt_index"][pair]] * 2
        to = dict(device=ctx.device, dtype=ctx.model.dtype)
        states = batch["states"][pair]  # (B, 2, N + 1, C, h, w)
        x_t = torch.cat([states[torch.arange(len(units)), s, step] for s in (0, 1)]).to(**to)
        x_prev = torch.cat([states[torch.arange(len(units)), s, step + 1] for s in (0, 1)]).to(**to)
        logratio = unit_log_probs(ctx, x_t, x_prev, step.repeat(2), prompts, reference=True, reduction=self.spec.logprob_reduction)
        h = preference(batch["rewards"][pair, 0], batch["rewards"][pair, 1], self.spec.ties).to(ctx.device)
        lr0, lr1 = logratio.chunk(2)
        losses = d3po_loss(lr0, lr1, h, self.spec.beta, self.spec.eps)
        return losses.mean(), {"round": r}

    def plan_units(self, p):
        return p.stochastic_steps

    def plan_micro(self, p):
        # both samples of each unit's pair at its step: one pass per distinct step (at most one per unit)
        passes = p.split(2 * p.batch_size * p.cfg, min(p.batch_size, p.stochastic_steps))
        return p.work(p.passes(grad=passes, nograd=passes))
