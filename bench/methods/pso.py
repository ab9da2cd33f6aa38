"""PSO (Miao et al., ICLR 2025), the generic form of Eq. 5 / Alg. 1: a target image from data,
a reference trajectory sampled from the model being tuned at every step.

The target's trajectory is forward-noised from its clean latent (epsilon form); the reference's is
the current model's own few-step sampling trajectory (Gaussian-policy form). Over the stochastic
steps n = 2..N of the sampler,

    M = sum_n [ ( ||eps^tau - eps_th(x^tau_{t_n})||^2 - ||eps^tau - eps_pre(x^tau_{t_n})||^2 )
              - ( ||x^rho_{t_{n-1}} - mu_th(x^rho_{t_n})||^2 - ||x^rho_{t_{n-1}} - mu_pre(x^rho_{t_n})||^2 ) / (2 sigma_{t_n}^2) ]
    L = -log sigmoid(-beta * M)

The second bracket is -(log p_th - log p_pre) of the recorded reference transition. Targets are the
preferred images of the method's pairs (self-generated best of K, or a dataset's winners); concept
customization uses a subject's images the same way. Squared errors are summed over latent elements
by default (``reduction``), the scale the Gaussian log-probabilities of the reference term have.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.method import image_generators
from bench.methods.preference_data import PairMethod, PairSpec, draw_noise, predict
from bench.schema import MISSING, above, one_of, setting
from bench.methods.pso_online import trajectory_logratio


def pso_loss(eps_gap_tau: torch.Tensor, logratio_rho: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample Eq. 5 from the target's summed epsilon-error gap (model minus pre-trained) and the
    reference trajectory's log-likelihood ratio; returns the loss and the margin -M."""
    m = eps_gap_tau + logratio_rho
    return -F.logsigmoid(-beta * m), -m


class PSO(PairMethod):
    image_references = False  # given targets (a subject's photos) need no pre-sampled reference: it is sampled at every step

    @dataclass(kw_only=True)
    class Spec(PairSpec):
        beta: float = setting(MISSING, "the DPO strength (the paper's value for concept customization: 5)", above(0))
        reduction: str = setting("sum", "||.||^2 of the target term summed over latent elements (the scale of the reference's log-probabilities), or meaned", one_of("sum", "mean"))

    def prepare(self, ctx):
        ctx.model.stochastic_timesteps()  # fail before making data on a 1-step sampler
        return super().prepare(ctx)

    def loss(self, ctx, data, generator: torch.Generator):
        model = ctx.model
        pairs = self.pairs(ctx, data, generator)
        n = pairs.x_w.shape[0]
        steps = model.stochastic_timesteps()
        k = len(steps)
        # target: forward-noised at every trained timestep, epsilon form
        x0 = pairs.x_w.repeat_interleave(k, dim=0)
        prompts = [p for p in pairs.prompts for _ in range(k)]
        out = predict(ctx, x0, prompts, torch.tensor(steps).repeat(n), draw_noise(x0.shape, generator, ctx))
        err, pre = out.errors(self.spec.reduction)
        eps_gap = (err - pre).reshape(n, k).sum(1)
        # reference: a trajectory sampled now from the model being tuned, for the same prompts
        with torch.no_grad():
            _, states, _ = model.sample(pairs.prompts, image_generators(n, generator), trajectory=True)
        logratio = trajectory_logratio(ctx, torch.stack(states, 1), pairs.prompts)
        losses, margin = pso_loss(eps_gap, logratio, self.spec.beta)
        return losses.mean(), {"implicit_acc": float((margin > 0).float().mean())}

    def plan_micro(self, p):
        n, k, cfg = p.batch_size, p.stochastic_steps, p.cfg
        # the targets at every trained timestep (model and pre-trained), a reference trajectory sampled now,
        # and its log-ratio: each trained transition under the model (gradient) and the pre-trained model
        target = p.passes(grad=[(n * k, 1)], nograd=[(n * k, 1)])
        reference = p.sampling(n, decode=False, rewards=False)
        return p.work(target + reference + p.passes(grad=[(n * cfg, k)], nograd=[(n * cfg, k)]))
