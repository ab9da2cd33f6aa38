"""Diffusion-KTO (Li et al., NeurIPS 2024): alignment from per-image binary labels, no pairs.

Kahneman-Tversky optimization: each image is desirable (y = 1) or undesirable (y = 0) on its
own, with its own timestep and noise. With per-image squared errors (meaned over latent
elements, as the official code):

    g   = -(||eps - eps_th(x_t)||^2 - ||eps - eps_ref(x_t)||^2)      implicit reward of the image
    z   = max(0, mean over the batch of g), not differentiated       reference point ("bce_offset none")
    h   = sigmoid((2y - 1) * beta * (g - z))
    L   = lambda_y * (1 - h)                                          lambda_D for y = 1, lambda_U for y = 0

Labels come from pairs as the official ``gt_label_wi_l`` policy does: the preferred image is
desirable, the dispreferred undesirable; each batch element is a desirable image with
probability ``positive_ratio`` (0.8 in the official launcher).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.methods.preference_data import PairMethod, PairSpec, draw_noise, predict, uniform_timesteps
from bench.schema import MISSING, above, at_least, between, setting


def kto_loss(model_err, ref_err, desirable, beta: float, lambda_d: float = 1.0, lambda_u: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image KTO loss and implicit reward g, from per-image squared errors and boolean labels."""
    g = -(model_err - ref_err)
    z = g.mean().clamp(min=0).detach()
    sign = desirable.to(g.dtype) * 2 - 1
    h = torch.sigmoid(sign * beta * (g - z))
    weight = torch.where(desirable, torch.as_tensor(lambda_d, dtype=g.dtype), torch.as_tensor(lambda_u, dtype=g.dtype))
    return weight * (1 - h), g


class DiffusionKTO(PairMethod):
    @dataclass(kw_only=True)
    class Spec(PairSpec):
        beta: float = setting(MISSING, "the KTO strength (the official default --beta_dpo 1000)", above(0))
        lambda_d: float = setting(1.0, "weight of desirable images", at_least(0))
        lambda_u: float = setting(1.0, "weight of undesirable images", at_least(0))
        positive_ratio: float = setting(0.8, "share of desirable images per batch (official launcher)", between(0, 1))

    def loss(self, ctx, data, generator: torch.Generator):
        pairs = self.pairs(ctx, data, generator)
        n = pairs.x_w.shape[0]
        desirable = torch.rand(n, generator=generator) < self.spec.positive_ratio
        x0 = torch.where(desirable.to(ctx.device).reshape(-1, 1, 1, 1), pairs.x_w, pairs.x_l)
        out = predict(ctx, x0, pairs.prompts, uniform_timesteps(ctx, n, generator), draw_noise(x0.shape, generator, ctx))
        model_err, ref_err = out.errors()
        losses, g = kto_loss(model_err, ref_err, desirable.to(ctx.device), self.spec.beta, self.spec.lambda_d, self.spec.lambda_u)
        return losses.mean(), {"desirable": float(desirable.float().mean())}

    def plan_micro(self, p):
        n = p.batch_size  # one image of each pair (desirable or not), and the frozen reference
        return p.work(p.passes(grad=[(n, 1)], nograd=[(n, 1)]))
