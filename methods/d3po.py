"""D3PO / SPO-style online DPO (Yang et al., CVPR 2024) on the sampler's MDP, the online baseline
PSO and SPO compare with.

Two trajectories per prompt are sampled from the current model and compared by a reward. Each
stochastic transition is its own training unit (D3PO trains step by step, timesteps shuffled per
sample). With r_s = clip(p_theta(x_{t-1}^s | x_t^s) / p_ref(x_{t-1}^s | x_t^s), 1 - eps, 1 + eps)
for the two samples s = 0, 1 at the same step, and pref_s = +1 for the preferred, -1 for the other,

    L = -log sigmoid( beta * (pref_0 * log r_0 + pref_1 * log r_1) )

Clipping the likelihood ratio (their "Q-value" bound) stops a step from moving the policy far from
the reference. The official defaults are beta 0.1, eps 0.1 (PSO's online code uses beta 50).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.method import TrainContext
from bench.methods.online import OnlineMethod, unit_log_probs


def d3po_loss(logratio_0, logratio_1, first_preferred, beta: float, eps: float) -> torch.Tensor:
    """Per-unit D3PO loss from log p_theta - log p_ref of the two samples at one step."""
    clip = lambda lr: torch.clamp(torch.exp(lr), 1 - eps, 1 + eps).log()
    pref = first_preferred.to(logratio_0.dtype) * 2 - 1
    return -F.logsigmoid(beta * (pref * clip(logratio_0) - pref * clip(logratio_1)))


class D3PO(OnlineMethod):
    name = "d3po"

    def samples_per_prompt(self) -> int:
        return 2

    def units_per_prompt(self, ctx: TrainContext) -> int:
        return len(ctx.model.stochastic_timesteps())  # one unit per pair and stochastic step

    def loss(self, ctx: TrainContext, data, generator: torch.Generator):
        r, batch, units = self.next_units(ctx)
        k = self.units_per_prompt(ctx)
        pair, step = units // k, units % k
        prompts = [ctx.prompts[int(i)] for i in batch["prompt_index"][pair]] * 2
        to = dict(device=ctx.device, dtype=ctx.model.dtype)
        states = batch["states"][pair]  # (B, 2, N + 1, C, h, w)
        x_t = torch.cat([states[torch.arange(len(units)), s, step] for s in (0, 1)]).to(**to)
        x_prev = torch.cat([states[torch.arange(len(units)), s, step + 1] for s in (0, 1)]).to(**to)
        logratio = unit_log_probs(ctx, x_t, x_prev, step.repeat(2), prompts, reference=True)
        first_preferred = (batch["rewards"][pair, 0] > batch["rewards"][pair, 1]).to(ctx.device)
        lr0, lr1 = logratio.chunk(2)
        losses = d3po_loss(lr0, lr1, first_preferred, float(self.cfg["beta"]), float(self.cfg["eps"]))
        return losses.mean(), {"round": r}
