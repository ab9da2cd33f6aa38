"""DreamBooth (Ruiz et al., CVPR 2023), the customization baseline of PSO's Table 3.

The subject's few photos, captioned with the instance prompt ("a photo of sks dog"), are
fine-tuned on with the plain diffusion loss; with prior preservation, images the base model
generates for the class prompt ("a photo of dog") are fine-tuned on beside them so the class
keeps its variety (the paper's class-specific prior-preservation loss):

    L = E || eps - eps_th(x_t, t, c_instance) ||^2  +  lambda * E || eps' - eps_th(x'_t, t', c_class) ||^2

with x the subject's latents, x' the class images' latents and t, t' uniform over [0, T), as the
diffusers DreamBooth script trains (``--with_prior_preservation --prior_loss_weight``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.errors import UsageError
from bench.methods.preference_data import DropoutSpec, PairMethod, image_pairs, seeded_samples
from bench.schema import at_least, setting


class DreamBooth(PairMethod):
    shares_pairs = False  # its data: the subject's photos and class-prompt samples
    uses_reference = False

    @dataclass(kw_only=True)
    class Spec(DropoutSpec):
        prior_loss_weight: float = setting(1.0, "lambda of the prior-preservation term (the paper's and the diffusers script's 1.0); 0 turns it off", at_least(0))
        num_class_images: int = setting(16, "class-prompt samples of the base model (the diffusers script's default is 100)", at_least(1))

    def data_spec(self) -> dict:
        return self.as_composed("seed", "prior_loss_weight", "num_class_images")

    def prepare(self, ctx):
        if ctx.images is None:
            raise UsageError("dreambooth fine-tunes on a subject's photos: use a dreambench suite with subject=NAME, or data=FOLDER of captioned images")
        data = image_pairs(ctx, self.spec.seed, references=False)
        if self.prior_weight:
            data["latents_class"] = self.class_images(ctx)
        return data

    @property
    def prior_weight(self) -> float:
        return self.spec.prior_loss_weight

    def class_images(self, ctx) -> torch.Tensor:
        """The base model's samples for the class prompt, seeded by index (the script's class_data_dir)."""
        prompt = ctx.images.prior_prompt
        if not prompt:
            raise UsageError("prior preservation needs a class prompt, which only dreambench suites give: set method.prior_loss_weight=0")
        prompts = [prompt] * self.spec.num_class_images
        return seeded_samples(ctx, prompts, "dreambooth-class", self.spec.seed, f"class images: {prompt}")

    def loss(self, ctx, data, generator: torch.Generator):
        model = ctx.model
        pairs = self.pairs(ctx, data, generator)
        instance = model.diffusion_loss(pairs.x_w, model.encode_prompts(pairs.prompts), generator).mean()
        if not self.prior_weight:
            return instance, {}
        idx = torch.randint(0, data["latents_class"].shape[0], (ctx.batch_size,), generator=generator)
        x_class = data["latents_class"][idx].to(ctx.device, model.dtype)
        prior = model.diffusion_loss(x_class, model.encode_prompts([ctx.images.prior_prompt] * ctx.batch_size), generator).mean()
        return instance + self.prior_weight * prior, {"instance": instance.detach().item(), "prior": prior.detach().item()}

    def plan_prepare(self, p):
        n, images = p.batch_size, p.images or 0
        encode = p.passes(encode=[(n, -(-images // n))] if images else [])
        if not self.prior_weight:
            return encode
        return encode + p.sampling(self.spec.num_class_images, n, decode=False, rewards=False)  # class images, once

    def plan_micro(self, p):
        prior = self.prior_weight
        return p.work(p.passes(grad=[(p.batch_size, 2 if prior else 1)]))  # the photos, and the class images
