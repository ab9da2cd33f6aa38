"""Online PSO (Miao et al., ICLR 2025), Eq. 7 and Algorithm 2, for few-step models.

Training alternates rounds of sampling and fitting. In each round, for ``prompts_per_round``
training prompts, two trajectories are sampled from the *current* model with its own stochastic
few-step sampler; the one the reward scores higher is the target tau, the other the reference
rho (Alg. 2: tau = 1 if s_1 > s_2, else 2). Then ``epochs_per_round`` epochs over the round's
pairs. With the sampler's Gaussian transitions p(x_{t_{n-1}} | x_{t_n}) = N(mu(x_{t_n}), sigma_{t_n}^2 I),

    log-ratio(x) = sum_{n=2..N} log p_theta(x_{t_{n-1}} | x_{t_n}) - log p_pre(x_{t_{n-1}} | x_{t_n})
                 = -sum_{n=2..N} ( ||x_{t_{n-1}} - mu_theta||^2 - ||x_{t_{n-1}} - mu_pre||^2 ) / (2 sigma_{t_n}^2)
    L = -log sigmoid( beta * (log-ratio(tau) - log-ratio(rho)) )

The factor 1/(2 sigma_{t_n}^2), printed outside the sum in the paper, is taken per step. The last
step (t_1 -> x_0) is deterministic and not trained. p_pre is the model with its LoRA adapters off.

Rounds are sampled, kept for resume and ordered by ``methods/online.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dataclasses import dataclass

from bench.method import TrainContext
from bench.methods.online import OnlineMethod, OnlineSpec, transition_log_probs
from bench.schema import MISSING, above, setting


def pso_online_loss(logratio_tau: torch.Tensor, logratio_rho: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Eq. 7 from the trajectory log-likelihood ratios (model over pre-trained model)."""
    margin = logratio_tau - logratio_rho
    return -F.logsigmoid(beta * margin), margin


def trajectory_logratio(ctx: TrainContext, states: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """sum over the stochastic steps of log p_theta - log p_pre of each recorded transition.

    ``states`` is (B, N + 1, C, h, w): x_{t_N}, ..., x_{t_1}, x_0 as sampled."""
    cond = ctx.model.encode_prompts(prompts)
    total = torch.zeros(states.shape[0], device=ctx.device, dtype=torch.float64)
    for i in range(len(ctx.model.stochastic_timesteps())):
        with torch.no_grad(), ctx.reference():
            pre = transition_log_probs(ctx, states[:, i], states[:, i + 1], i, prompts, cond)
        total = total + (transition_log_probs(ctx, states[:, i], states[:, i + 1], i, prompts, cond) - pre)
    return total


class OnlinePSO(OnlineMethod):
    name = "pso-online"

    @dataclass(kw_only=True)
    class Spec(OnlineSpec):
        beta: float = setting(MISSING, "the DPO strength over the summed log-ratios (the paper's online value: 5)", above(0))

    def samples_per_prompt(self) -> int:
        return 2

    def round_pairs(self, ctx: TrainContext, r: int) -> dict[str, torch.Tensor]:
        """Round r as (target, reference) pairs: Alg. 2 makes the second trajectory the target on ties."""
        return as_pairs(self.rounds(ctx).get(ctx, r))

    def loss(self, ctx: TrainContext, data, generator: torch.Generator):
        r, batch, idx = self.next_units(ctx, data)
        pairs = as_pairs(batch)
        prompts = [ctx.prompts[int(i)] for i in pairs["prompt_index"][idx]]
        to = dict(device=ctx.device, dtype=ctx.model.dtype)
        states = torch.cat([pairs["states_tau"][idx], pairs["states_rho"][idx]]).to(**to)
        tau, rho = trajectory_logratio(ctx, states, prompts * 2).chunk(2)
        losses, margin = pso_online_loss(tau, rho, self.spec.beta)
        return losses.mean(), {"implicit_acc": float((margin > 0).float().mean()), "round": r}

    def plan_micro(self, p):
        rows = 2 * p.batch_size * p.cfg  # target and reference trajectories of every pair, at each trained transition
        return p.work(p.passes(grad=[(rows, p.stochastic_steps)], nograd=[(rows, p.stochastic_steps)]))


def as_pairs(data: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Two samples per prompt as (target, reference): the higher reward first; on a tie the second
    sample is the target, as Alg. 2 (tau = 1 only if s_1 > s_2)."""
    first_wins = data["rewards"][:, 0] > data["rewards"][:, 1]
    pick = lambda x, a, b: torch.where(first_wins.reshape(-1, *([1] * (x.dim() - 2))), x[:, a], x[:, b])
    return {
        "states_tau": pick(data["states"], 0, 1),
        "states_rho": pick(data["states"], 1, 0),
        "prompt_index": data["prompt_index"],
        "reward_tau": pick(data["rewards"], 0, 1),
        "reward_rho": pick(data["rewards"], 1, 0),
    }
