"""DSPO: Direct Score Preference Optimization (Zhu, Xiao & Honavar, ICLR 2025).

DSPO matches the model's score to the data score plus the gradient of a Bradley-Terry
preference, instead of maximizing a likelihood ratio. With a shared timestep t and noise eps
for the two images of a pair (squared errors meaned over latent elements, as the official code):

    r_w - r_l = -(lambda / 2) * ( (||e_th^w - eps||^2 - ||e_th^l - eps||^2)
                                 - (||e_ref^w - eps||^2 - ||e_ref^l - eps||^2) )      (Eq. 11, time factor dropped)

* ``form: sd15`` (Eq. 13/14, gamma = 1, A(t) dropped): an epsilon regression on the preferred
  image only, with a target shifted along (e_th^w - e_ref^w):

      L = || (e_th^w - eps) - lambda * (1 - sigmoid(r_w - r_l)) * (e_th^w - e_ref^w) ||^2

  The dispreferred image enters only through the sigmoid weight. As in the official code the
  weight is not detached.
* ``form: sdxl`` (Eq. 47): the reference model replaces the data score, leaving

      L = (1 - sigmoid(r_w - r_l))^2

  The official code adds a batch-level gate that the paper does not mention: when
  mean((e_th^w - e_ref^w)^2) >= 0.1 it trains ((1 - sigmoid) * (e_th^w - e_ref^w))^2 instead.
  ``sdxl_gate: 0.1`` reproduces the code; ``sdxl_gate: null`` is the paper's Eq. 47 alone.

lambda is the code's ``beta_dpo``: 0.001 for SD1.5 and 5000 for SDXL (see methods/dspo-*.yaml
for where the paper and the code disagree).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from bench.methods.diffusion_dpo import implicit_margin
from bench.methods.preference_data import PairMethod, PairSpec, Predictions, at_least_fp32, predict_pairs
from bench.schema import MISSING, above, one_of, setting


def reward_gap(win: Predictions, lose: Predictions, lam: float) -> torch.Tensor:
    """r(c, x_t^w) - r(c, x_t^l) of Eq. 11 with the time factor dropped, per pair."""
    (model_w, ref_w), (model_l, ref_l) = win.errors(), lose.errors()
    return 0.5 * lam * implicit_margin(model_w, model_l, ref_w, ref_l)


def dspo_sd15_loss(win: Predictions, lose: Predictions, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Eq. 13 loss (meaned over latent elements) and the reward gap r_w - r_l."""
    gap = reward_gap(win, lose, lam)
    weight = (1 - torch.sigmoid(gap)).reshape(-1, *([1] * (win.pred.dim() - 1)))
    pred, noise, ref = at_least_fp32(win.pred), at_least_fp32(win.target), at_least_fp32(win.ref)
    residual = (pred - noise) - lam * weight * (pred - ref)
    return (residual**2).flatten(1).mean(1), gap


def dspo_sdxl_loss(win: Predictions, lose: Predictions, lam: float, gate: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Eq. 47 loss, or the official code's gated branch; and the reward gap."""
    gap = reward_gap(win, lose, lam)
    weight = 1 - torch.sigmoid(gap)
    shift = at_least_fp32(win.pred) - at_least_fp32(win.ref)
    if gate is not None and float((shift.detach() ** 2).mean()) >= gate:
        return ((weight.reshape(-1, *([1] * (shift.dim() - 1))) * shift) ** 2).flatten(1).mean(1), gap
    return weight**2, gap


class DSPO(PairMethod):
    @dataclass(kw_only=True)
    class Spec(PairSpec):
        form: str = setting("sd15", "sd15: Eq. 13/14, shifted epsilon regression on the preferred image; sdxl: Eq. 47", one_of("sd15", "sdxl"))
        lam: float = setting(MISSING, "lambda, the code's --beta_dpo: 0.001 for SD1.5, 5000 for SDXL (code only)", above(0))
        sdxl_gate: Optional[float] = setting(0.1, "form sdxl: the official code's undocumented gate (null: the paper's Eq. 47 alone)", above(0))
        share_noise: bool = setting(True, "one timestep and one noise draw for both images of a pair, as the official code")

    def loss(self, ctx, data, generator: torch.Generator):
        lam = self.spec.lam
        win, lose = predict_pairs(ctx, self.pairs(ctx, data, generator), generator, share_noise=self.spec.share_noise)
        form = self.spec.form
        if form == "sd15":
            losses, gap = dspo_sd15_loss(win, lose, lam)
        elif form == "sdxl":
            losses, gap = dspo_sdxl_loss(win, lose, lam, self.spec.sdxl_gate)
        else:
            raise ValueError(f"DSPO form must be sd15 (Eq. 13/14) or sdxl (Eq. 47), not {form!r}")
        return losses.mean(), {"implicit_acc": float((gap > 0).float().mean())}

    def plan_micro(self, p):
        both = 2 * p.batch_size  # preferred and dispreferred in one pass, then the frozen reference
        return p.work(p.passes(grad=[(both, 1)], nograd=[(both, 1)]))
