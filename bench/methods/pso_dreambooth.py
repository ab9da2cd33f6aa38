"""PSO for concept customization as the authors' released script trains it
(``personalization/train_pso_sdxl_turbo_dreambooth.py`` with ``--loss_type pso_db``), beside
``methods/pso.py``, the paper's Eq. 5.

The released code keeps PSO's pairing of the subject's photos (targets) with samples of the model
(references), but trains neither the paper's likelihood ratios nor a reference model:

* the references are ``num_negatives`` samples of the *class* prompt ("a photo of dog"), drawn once
  from the base model before training, then paired at random with the photos, both conditioned on
  the *instance* prompt ("a photo of [V] dog") and noised with one shared noise at one timestep;
* each image's error is the EDM-style x0 error weighted by sigma^-2 and meaned over latent elements,
  which is the epsilon error meaned over elements, e = mean ||eps_theta(x_t) - eps||^2;
* with d = e_w - neg_defactor * e_l (the script's ``--neg_defactor``, 0.1 by default),

      L = relu(1 - beta * (-d)) + prior_loss_weight * e_l         (``loss_type: pso_db``)
      L = -log sigmoid(beta * (d_ref - d)) + prior_loss_weight * e_l (``loss_type: pso``, with the
                                                                     adapter-off model's d_ref)

  averaged over the batch: a hinge pushes the photo's error below a tenth of the reference's,
  while the prior term keeps fitting the references (at beta 5 and weight 0.5, inside the hinge
  the two gradients on e_l cancel exactly).

The timesteps are the script's: an index i in {249, 499, 749, 999} into diffusers' Euler
``timesteps`` (999 down to 0), i.e. t in {750, 500, 250, 0}, one per pair. Every difference from
the paper is listed in ``methods/pso-dreambooth-official.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List

import torch
import torch.nn.functional as F

from bench.errors import UsageError
from bench.methods.preference_data import DropoutSpec, PairMethod, draw_noise, image_pairs, predict, seeded_samples
from bench.schema import MISSING, above, at_least, one_of, setting


def pso_dreambooth_loss(err_w, err_l, beta: float, neg_defactor: float, prior_weight: float, loss_type: str = "pso_db", ref_w=None, ref_l=None) -> torch.Tensor:
    """Per-pair loss of the released script from the per-image errors (meaned over elements) of the
    photo (w) and the reference (l); the adapter-off errors ``ref_*`` only for ``loss_type: pso``."""
    diff = err_w - neg_defactor * err_l
    if loss_type == "pso_db":
        loss = torch.relu(1 - beta * (-diff))
    elif loss_type == "pso":
        loss = -F.logsigmoid(beta * ((ref_w - neg_defactor * ref_l) - diff))
    else:
        raise UsageError(f"unknown method.loss_type '{loss_type}': use pso_db (the released scripts) or pso")
    return loss + prior_weight * err_l


class PSODreamBoothOfficial(PairMethod):
    image_references = False  # the references are class-prompt samples, made in prepare()
    shares_pairs = False

    @dataclass(kw_only=True)
    class Spec(DropoutSpec):
        loss_type: str = setting("pso_db", "pso_db: the script's loss without a reference model; pso: with the adapter-off reference", one_of("pso_db", "pso"))
        beta: float = setting(MISSING, "the script's beta (5)", above(0))
        neg_defactor: float = setting(0.1, "the script's weight of the negatives' term", at_least(0))
        prior_loss_weight: float = setting(0.5, "the script's prior-preservation weight", at_least(0))
        num_negatives: int = setting(20, "class-prompt samples of the base model, drawn without replacement", at_least(1))
        timesteps: List[int] = setting([750, 500, 250, 0], "the timesteps the script trains at (SDXL-Turbo's 4-step schedule)")

    @property
    def uses_reference(self) -> bool:
        return self.spec.loss_type == "pso"  # pso_db reads no reference model

    def data_spec(self) -> dict:
        return self.as_composed("seed", "num_negatives")

    def prepare(self, ctx):
        if ctx.images is None or not ctx.images.prior_prompt:
            raise UsageError("pso-dreambooth-official fine-tunes on a DreamBench subject's photos: use a dreambench suite with subject=NAME")
        data = image_pairs(ctx, self.spec.seed, references=False)
        prompts = [ctx.images.prior_prompt] * self.spec.num_negatives
        data["latents_neg"] = seeded_samples(ctx, prompts, "pso-dreambooth-negatives", self.spec.seed, f"negatives: {prompts[0]}")
        return data

    def loss(self, ctx, data, generator: torch.Generator):
        model, spec = ctx.model, self.spec
        pairs = self.pairs(ctx, data, generator)
        n = pairs.x_w.shape[0]
        negatives = data["latents_neg"]
        if n > negatives.shape[0]:
            raise UsageError(f"train.batch_size={n} exceeds method.num_negatives={negatives.shape[0]}: the script draws negatives without replacement")
        x_l = negatives[torch.randperm(negatives.shape[0], generator=generator)[:n]].to(ctx.device, model.dtype)
        timesteps = torch.tensor(spec.timesteps)
        t = timesteps[torch.randint(0, len(timesteps), (n,), generator=generator)]
        noise = draw_noise(pairs.x_w.shape, generator, ctx)
        reference = spec.loss_type == "pso"
        out = predict(ctx, torch.cat([pairs.x_w, x_l]), pairs.prompts * 2, torch.cat([t, t]), torch.cat([noise, noise]), reference)
        err, ref = out.errors("mean")
        err_w, err_l = err.chunk(2)
        ref_w, ref_l = ref.chunk(2) if reference else (None, None)
        losses = pso_dreambooth_loss(err_w, err_l, spec.beta, spec.neg_defactor, spec.prior_loss_weight, spec.loss_type, ref_w, ref_l)
        return losses.mean(), {"err_w": float(err_w.mean()), "err_l": float(err_l.mean())}

    def plan_prepare(self, p):
        n, images = p.batch_size, p.images or 0
        negatives = p.sampling(self.spec.num_negatives, n, decode=False, rewards=False)  # class-prompt samples, once
        return p.passes(encode=[(n, -(-images // n))] if images else []) + negatives

    def plan_micro(self, p):
        both = 2 * p.batch_size  # photo and negative in one pass (and the adapter-off model with loss_type pso)
        return p.work(p.passes(grad=[(both, 1)], nograd=[(both, 1)] if self.spec.loss_type == "pso" else []))
