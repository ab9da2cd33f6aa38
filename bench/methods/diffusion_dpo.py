"""Diffusion-DPO (Wallace et al., 2024), offline, on (preferred, dispreferred) pairs.

With a shared timestep t and noise eps for both images of a pair,

    d_theta = ||eps - eps_theta(x_t^w, t, c)||^2 - ||eps - eps_theta(x_t^l, t, c)||^2
    d_ref   = the same with the frozen reference model
    L       = -log sigmoid( -(beta / 2) * (d_theta - d_ref) )

(squared errors are means over latent elements, as both public codebases compute them).

Beta convention: this file uses the Salesforce code's (the paper's authors'): the factor 1/2 is
inside the loss and the SD1.5/SDXL value is beta = 5000. The diffusers example script writes
-log sigmoid(beta' * (d_ref - d_theta)) with default beta' = 2500, so beta' = beta / 2:
use ``from_diffusers_beta`` / ``to_diffusers_beta`` (or ``beta_convention: diffusers``).
The reference is the same UNet with its LoRA adapters disabled (a frozen copy for full fine-tuning).

On a flow model the errors are the velocity's (noise - x0, ``training_target``): the velocity form
of flow_grpo's ``scripts/train_sd3_dpo.py``, which draws each pair's timestep logit-normally over the
scheduler's shifted training timesteps (``timesteps: logit_normal``) with beta 100.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from bench.methods.preference_data import PairMethod, PairSpec, predict_pairs
from bench.schema import MISSING, above, one_of, setting


def from_diffusers_beta(beta_diffusers: float) -> float:
    """The diffusers script's beta (no 1/2 factor) in this file's (Salesforce) convention."""
    return 2.0 * beta_diffusers


def to_diffusers_beta(beta: float) -> float:
    return beta / 2.0


def beta_in_salesforce_convention(beta: float, convention: str) -> float:
    if convention == "diffusers":
        return from_diffusers_beta(beta)
    if convention != "salesforce":
        raise ValueError(f"beta_convention must be salesforce or diffusers, not {convention!r}")
    return beta


def implicit_margin(model_w, model_l, ref_w, ref_l) -> torch.Tensor:
    """-(d_theta - d_ref): positive when the model, relative to the reference, denoises the
    preferred image better than the dispreferred one. Shared by DPO, DSPO and PSO."""
    return -((model_w - model_l) - (ref_w - ref_l))


def dpo_loss(model_w, model_l, ref_w, ref_l, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Diffusion-DPO loss and implicit reward margin, from per-sample squared errors."""
    margin = implicit_margin(model_w, model_l, ref_w, ref_l)
    return -F.logsigmoid(0.5 * beta * margin), margin


class DiffusionDPO(PairMethod):
    @dataclass(kw_only=True)
    class Spec(PairSpec):
        beta: float = setting(MISSING, "Salesforce train.py convention: -logsigmoid(-0.5 * beta * (d_theta - d_ref)); 5000 for SD1.5/SDXL", above(0))
        beta_convention: str = setting("salesforce", "or diffusers: beta is then the diffusers script's (2500 there = 5000 here)", one_of("salesforce", "diffusers"))
        timesteps: str = setting("uniform", "uniform over the T training timesteps (Salesforce); logit_normal: sigmoid(N(0, 1)) x T indexing the scheduler's training timesteps (flow_grpo's train_sd3_dpo.py)",
                                 one_of("uniform", "logit_normal"))

    def beta(self) -> float:
        return beta_in_salesforce_convention(self.spec.beta, self.spec.beta_convention)

    def loss(self, ctx, data, generator: torch.Generator):
        win, lose = predict_pairs(ctx, self.pairs(ctx, data, generator), generator, timesteps=self.spec.timesteps)
        (model_w, ref_w), (model_l, ref_l) = win.errors(), lose.errors()
        losses, margin = dpo_loss(model_w, model_l, ref_w, ref_l, self.beta())
        return losses.mean(), {"implicit_acc": float((margin > 0).float().mean())}

    def plan_micro(self, p):
        both = 2 * p.batch_size  # preferred and dispreferred in one pass, then the frozen reference
        return p.work(p.passes(grad=[(both, 1)], nograd=[(both, 1)]))
