"""MaPO: Margin-aware Preference Optimization (Hong et al., 2024), reference-free.

MaPO needs no reference model: it lowers the denoising error of the preferred image while
widening a log-odds margin between preferred and dispreferred. With shared t and noise and
per-sample squared errors l_w, l_l (meaned over latent elements, as the official code):

    log_odds = s * l_w / (exp(s * l_w) - 1) - s * l_l / (exp(s * l_l) - 1)
    L        = l_w - beta * log sigmoid(T * log_odds)

s is the code's ``snr_value`` (0.5), beta its ``beta_mapo`` (0.1), and T the number of training
timesteps (1000), which "maximizes the margin throughout the denoising process".
x / (exp(x) - 1) falls as x grows, so the margin rises when l_w falls or l_l rises.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.methods.preference_data import PairMethod, PairSpec, predict_pairs
from bench.schema import MISSING, above, setting


def mapo_loss(err_w, err_l, beta: float, snr_value: float, num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair MaPO loss and log-odds margin, from per-sample squared errors."""
    odds = lambda e: snr_value * e / torch.expm1(snr_value * e)
    log_odds = odds(err_w) - odds(err_l)
    return err_w - beta * F.logsigmoid(log_odds * num_train_timesteps), log_odds


class MaPO(PairMethod):
    @dataclass(kw_only=True)
    class Spec(PairSpec):
        beta: float = setting(MISSING, "official --beta_mapo (0.1)", above(0))
        snr_value: float = setting(0.5, "official --snr_value (the s in s*l / (exp(s*l) - 1))", above(0))

    uses_reference = False  # reference-free: a full fine-tuning keeps no frozen copy of the UNet

    def loss(self, ctx, data, generator: torch.Generator):
        win, lose = predict_pairs(ctx, self.pairs(ctx, data, generator), generator, reference=False)
        (err_w, _), (err_l, _) = win.errors(), lose.errors()
        losses, log_odds = mapo_loss(err_w, err_l, self.spec.beta, self.spec.snr_value, ctx.model.num_train_timesteps)
        return losses.mean(), {"implicit_acc": float((log_odds > 0).float().mean())}

    def plan_micro(self, p):
        return p.work(p.passes(grad=[(2 * p.batch_size, 1)]))  # reference-free: no frozen model's pass
