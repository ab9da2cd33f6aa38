"""Direct reward back-propagation through the few-step sampler: DRaFT-K (Clark et al., ICLR 2024)
and ReFL (Xu et al., NeurIPS 2023), the supervised baselines of LaSRO ("w\\GT.gradient").

Both sample from the model being tuned, decode the latents with the VAE, score them with a
differentiable reward and ascend its gradient:

* ``mode: draft``: the whole few-step trajectory is sampled, and the gradient flows through
  only its last ``k`` sampler steps (DRaFT-K; earlier states are constants);
* ``mode: refl``: sampling stops at a sampler step n drawn uniformly from the last
  ``refl_last_steps`` steps, and the x0 the model predicts there is scored (ReFL stops at a
  random one of the last 10 of 40 steps; a few-step model's intermediate x0 predictions are
  its outputs at fewer steps).

Loss per image: ``-r`` or, with ``margin`` (ImageReward's ReFL uses 2 on its own scale),
``relu(margin - r)``; times ``grad_scale`` (ReFL: 1e-3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from bench.errors import UsageError
from bench.method import Method, image_generators
from bench.schema import MISSING, RewardSpec, above, at_least, one_of, setting


class RewardBackprop(Method):
    uses_reference = False

    @dataclass(kw_only=True)
    class Spec(RewardSpec):
        mode: str = setting(MISSING, "draft: gradients through the last k sampler steps; refl: stop at a random step, score its x0 prediction", one_of("draft", "refl"))
        k: int = setting(1, "draft: sampler steps the gradient flows through (DRaFT-1: the last only)", at_least(1))
        refl_last_steps: Optional[int] = setting(None, "refl: stop among the last N sampler steps (null: any)", at_least(1))
        margin: Optional[float] = setting(None, "loss = relu(margin - reward) (null: loss = -reward)")
        grad_scale: float = setting(1.0, "the loss's factor", above(0))

    def prepare(self, ctx):
        if ctx.reward is None or not ctx.reward.differentiable:
            name = ctx.reward.name if ctx.reward is not None else None
            raise UsageError(f"method '{self.spec.name}' back-propagates through its reward and {name!r} is not differentiable: set method.reward= brightness, contrast or colorfulness")
        if self.spec.mode not in ("draft", "refl"):
            raise UsageError(f"unknown method.mode '{self.spec.mode}': use draft or refl")
        return {}

    def loss(self, ctx, data, generator: torch.Generator):
        model, n = ctx.model, ctx.batch_size
        prompts = [ctx.prompts[int(i)] for i in torch.randint(0, len(ctx.prompts), (n,), generator=generator)]
        gens = image_generators(n, generator)
        steps = len(model.timesteps())
        if self.spec.mode == "draft":
            x0 = model.sample(prompts, gens, grad_last=self.spec.k)
        else:
            last = min(steps, self.spec.refl_last_steps or steps)
            stop = steps - last + int(torch.randint(0, last, (), generator=generator))
            x0 = model.sample(prompts, gens, grad_last=steps - stop, stop_at=stop)
        reward = ctx.reward.score(model.decode(x0).float(), prompts)
        margin = self.spec.margin
        per_image = torch.relu(margin - reward) if margin is not None else -reward
        return self.spec.grad_scale * per_image.mean(), {"reward": float(reward.detach().mean())}

    def plan(self, p):
        """``bench plan``: each micro-batch samples its images through the model being tuned, the last
        ``k`` steps with gradient (DRaFT) or up to a random step whose x0 prediction is scored (ReFL)."""
        n, steps = p.batch_size, p.sampler_steps
        if self.spec.mode == "draft":
            grad = min(self.spec.k, steps)
            nograd, note = steps - grad, f"DRaFT-{grad}: the last {grad} sampler step(s) with gradient"
        else:
            last = min(steps, self.spec.refl_last_steps or steps)
            grad, nograd, note = 1, steps - 1, f"ReFL: stops at a step drawn from the last {last} (counted at the latest, {steps})"
        micro = p.passes(grad=[(n * p.cfg, grad)], nograd=[(n * p.cfg, nograd)] if nograd else [], grad_decode=n, rewards=n, samples=n)
        return p.work(micro, notes=[note, "the VAE decoder and the reward run with gradient: their activations are not in the estimate"])
