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
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from bench.method import Method, TrainContext
from bench.methods.preference_data import best_worst_pairs


def from_diffusers_beta(beta_diffusers: float) -> float:
    """The diffusers script's beta (no 1/2 factor) in this file's (Salesforce) convention."""
    return 2.0 * beta_diffusers


def to_diffusers_beta(beta: float) -> float:
    return beta / 2.0


def dpo_loss(model_w, model_l, ref_w, ref_l, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Diffusion-DPO loss and implicit reward margin, from per-sample squared errors.

    The margin -(d_theta - d_ref) is positive when the model, relative to the reference,
    denoises the preferred image better than the dispreferred one.
    """
    margin = -((model_w - model_l) - (ref_w - ref_l))
    return -F.logsigmoid(0.5 * beta * margin), margin


class DiffusionDPO(Method):
    def beta(self) -> float:
        beta = float(self.cfg["beta"])
        convention = self.cfg.get("beta_convention", "salesforce")
        if convention == "diffusers":
            return from_diffusers_beta(beta)
        if convention != "salesforce":
            raise ValueError(f"beta_convention must be salesforce or diffusers, not {convention!r}")
        return beta

    def data_spec(self) -> dict:
        return {k: self.cfg[k] for k in ("samples_per_prompt", "reward", "seed", "drop_ties")}

    def prepare(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        return best_worst_pairs(ctx, int(self.cfg["samples_per_prompt"]), int(self.cfg["seed"]), bool(self.cfg["drop_ties"]))

    def squared_errors(self, ctx: TrainContext, data, idx, generator: torch.Generator):
        """Per-sample denoising errors of the model and the reference on a batch of pairs,
        with one timestep and one noise draw shared by the two images of each pair."""
        model = ctx.model
        x_w = data["latents_w"][idx].to(ctx.device, model.dtype)
        x_l = data["latents_l"][idx].to(ctx.device, model.dtype)
        n = x_w.shape[0]
        t = torch.randint(0, model.num_train_timesteps, (n,), generator=generator).to(ctx.device)
        noise = torch.randn(x_w.shape, generator=generator, dtype=torch.float64).to(ctx.device, model.dtype)
        cond = model.encode_prompts([ctx.prompts[int(i)] for i in data["prompt_index"][idx]])
        x_t = model.add_noise(torch.cat([x_w, x_l]), torch.cat([noise, noise]), torch.cat([t, t]))
        tt, cc, target = torch.cat([t, t]), torch.cat([cond, cond]), torch.cat([noise, noise])

        def errors():
            pred = model.unet(x_t, tt, encoder_hidden_states=cc).sample
            return ((pred.float() - target.float()) ** 2).flatten(1).mean(1).chunk(2)

        model_w, model_l = errors()
        with torch.no_grad(), ctx.reference():
            ref_w, ref_l = errors()
        return model_w, model_l, ref_w, ref_l

    def loss(self, ctx: TrainContext, data: dict[str, torch.Tensor], generator: torch.Generator):
        idx = torch.randint(0, data["latents_w"].shape[0], (ctx.batch_size,), generator=generator)
        losses, margin = dpo_loss(*self.squared_errors(ctx, data, idx, generator), self.beta())
        return losses.mean(), {"implicit_acc": float((margin > 0).float().mean())}
