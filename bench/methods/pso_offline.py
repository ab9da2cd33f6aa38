"""Offline PSO: Pairwise Sample Optimization for timestep-distilled models (Miao et al., ICLR 2025), Eq. 6.

The likelihood ratio of the model to the frozen pre-trained distilled model is taken over the
few-step sampler's own trajectory, not over all 1000 DDPM steps. Both the target (preferred)
and the reference (dispreferred) trajectories are forward-noised from their clean latents:

    M = sum_{n=2..N} [ (||eps^tau - eps_th(x^tau_{t_n})||^2 - ||eps^tau - eps_pre(x^tau_{t_n})||^2)
                     - (||eps^rho - eps_th(x^rho_{t_n})||^2 - ||eps^rho - eps_pre(x^rho_{t_n})||^2) ]
    L = -log sigmoid(-beta * M)

t_N > ... > t_1 are the sampler's timesteps (DMD2: 999, 749, 499, 249). The last step t_1 -> x_0
is deterministic (the model outputs its x0 estimate) and is left out, so the sum starts at n = 2.

On a flow model the errors are the velocity's, ||(eps - x0) - v_th(x_sigma)||^2 at x_sigma =
(1 - sigma) x0 + sigma eps (the model's ``training_target``), at the few-step sampler's sigmas but the
last, which lands on the clean image as DMD2's last step does (FLUX.1-schnell: sigma 1, 0.75, 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.methods.preference_data import Pairs, PairMethod, PairSpec, predict_pairs
from bench.models.diffusion import trained_timesteps
from bench.schema import MISSING, above, one_of, setting


def pso_offline_loss(err_tau, pre_tau, err_rho, pre_rho, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Eq. 6 from squared errors of shape (pairs, trained steps); returns the loss
    and the implicit reward margin -M (positive when the target is favoured)."""
    m = ((err_tau - pre_tau) - (err_rho - pre_rho)).sum(1)
    return -F.logsigmoid(-beta * m), -m


def pso_timesteps(model) -> list:
    """The timesteps of the sum: an epsilon model's stochastic steps; a flow model's sampler steps but the
    last (all of them are its SDE's, the last landing on sigma 0)."""
    return trained_timesteps(model.timesteps()) if model.predicts == "velocity" else model.stochastic_timesteps()


class OfflinePSO(PairMethod):
    @dataclass(kw_only=True)
    class Spec(PairSpec):
        beta: float = setting(MISSING, "the DPO strength (the paper's offline value: 50)", above(0))
        reduction: str = setting("mean", "||.||^2 meaned over latent elements, or summed; the paper does not say, and it rescales beta", one_of("mean", "sum"))
        share_noise: bool = setting(True, "one noise draw per timestep for target and reference (not stated in the paper)")

    def loss(self, ctx, data, generator: torch.Generator):
        steps = pso_timesteps(ctx.model)
        pairs = self.pairs(ctx, data, generator)
        n, k = pairs.x_w.shape[0], len(steps)
        # Every pair at every trained timestep, in one batch: row (i, n) = pair i at step t_n.
        repeat = lambda x: x.repeat_interleave(k, dim=0)
        stacked = Pairs(repeat(pairs.x_w), repeat(pairs.x_l), [p for p in pairs.prompts for _ in range(k)])
        t = torch.tensor(steps).repeat(n)
        tau, rho = predict_pairs(ctx, stacked, generator, t=t, share_noise=self.spec.share_noise)
        reduction = self.spec.reduction
        (err_tau, pre_tau), (err_rho, pre_rho) = tau.errors(reduction), rho.errors(reduction)
        per_pair = lambda e: e.reshape(n, k)
        losses, margin = pso_offline_loss(*map(per_pair, (err_tau, pre_tau, err_rho, pre_rho)), self.spec.beta)
        return losses.mean(), {"implicit_acc": float((margin > 0).float().mean())}

    def plan_micro(self, p):
        rows = 2 * p.batch_size * p.stochastic_steps  # both images of every pair at every trained timestep, one pass
        return p.work(p.passes(grad=[(rows, 1)], nograd=[(rows, 1)]))
