"""Diff-Instruct++ (Luo, TMLR 2025) and its pre-training stage Diff-Instruct (Luo et al., 2023):
a one-step generator distilled from a frozen, classifier-free-guided teacher by the integral KL
divergence (IKL), and aligned with a differentiable reward.

Four networks, in the EDM form the paper uses (App. C.1, Algorithm 3):

* the generator ``g_theta(z | c) = D_theta(z; sigma_init)``, z ~ N(0, sigma_init^2 I): the model's
  UNet (the one the trainer tunes, initialised from the teacher) called once at sigma_init;
* the teacher ``d_ref``: the frozen base UNet (``ctx.reference()``), combined with CFG on its
  denoiser, ``d~_ref = d_ref(x, sigma, 0) + alpha_cfg (d_ref(x, sigma, c) - d_ref(x, sigma, 0))``;
* the TA ("teaching assistant", online fake score) ``d_psi``: a trainable copy of the teacher,
  trained here by denoising score matching on generator samples, ``k_ta`` Adam steps per
  generator step (its weights and moments go to the trainer's checkpoints, ``extra_state``);
* the reward ``r(x0, c)``: a differentiable metric of the VAE-decoded sample.

A VP epsilon-prediction UNet becomes an EDM denoiser by iDDPM preconditioning (EDM's
iDDPMPrecond, the paper's C.10): ``D(x; sigma) = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma))``
with x = x0 + sigma * n and t(sigma) the timestep whose sigma_t = sqrt((1 - a_t) / a_t) is nearest.

Per generator step (Algorithm 3, Listing 1):

    TA, k_ta times:  x0 = Sta[g(z, c)], x_t = x0 + sigma n,
                     L(psi) = mean_b sum_pixels lambda(sigma) (d_psi(x_t, sigma, c) - x0)^2
    generator:       x0 = g(z, c), x_t = x0 + sigma n, y = Sta[d_psi(x_t) - d~_ref(x_t)],
                     L(theta) = mean_b [ sum_pixels w(sigma) y * x_t  -  alpha_rew r(decode(x0), c) ]

The reward is added after the spatial sum (the listing adds it before, a broadcasting slip).
``d/dtheta (y^T x_t) = y^T dx_t/dtheta`` reproduces the IKL gradient (Theorem 3.2 / 3.5): s_psi -
s~_ref = (d_psi - d~_ref) / sigma^2, the 1 / sigma^2 folded into w. By Theorem 3.3 the CFG scale
alpha_cfg is an implicit reward with beta = 1 / (alpha_cfg - 1); Diff-Instruct is alpha_rew = 0.

Where the paper contradicts itself, the option and its default (the YAML presets say the same):

* ``gen_weighting``: ``inv_norm`` (C.8: w = 1 / ||d_psi - d~_ref||_2 per sample, "helps to
  stabilize the training"; default) or ``constant`` (C.1 / A.1: w = 1);
* ``ta_weighting``: ``edm`` (C.7 and Table 2: lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2;
  default) or ``constant`` (C.1);
* ``prior``: ``std`` (A.2, C.4, Table 2: z ~ N(0, sigma_init^2 I); default, and what the
  one-step sampler of ``model=tiny-onestep`` draws) or ``variance`` (C.11: N(0, sigma_init I));
* ``sigma_per``: ``sample`` (the text's t ~ pi(t) per sample; default) or ``batch`` (the listing);
* the learning rate (5e-6 in the text, 1e-3 in the listing) is ``train.lr``: the paper presets
  take 5e-6.

sigma_init is snapped to the nearest timestep's sigma (tiny: t = 625, sigma 2.5017), so the trained
generator is exactly the model's one-step sampler; noise levels are clipped to the model's own
range [sigma_0, sigma_{T-1}] unless ``sigma_min`` / ``sigma_max`` say otherwise (PixArt's
schedule gives the paper's [0.01, 156.6155]).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from bench.errors import UsageError
from bench.method import Method, image_generators
from bench.models.diffusion import Conditioning
from bench.schema import BETAS, RewardSpec, above, at_least, one_of, setting
from bench.weights import base_copy, copy_weights

log = logging.getLogger(__name__)

OPTIONS = {
    "gen_weighting": ("inv_norm", "constant"),
    "ta_weighting": ("edm", "constant"),
    "prior": ("std", "variance"),
    "sigma_per": ("sample", "batch"),
}


# ---- the EDM view of a VP epsilon-prediction model ----------------------------------------------
def model_sigmas(model) -> torch.Tensor:
    """sigma_t = sqrt((1 - a_t) / a_t) of every training timestep (float64, increasing)."""
    a = model.alphas_cumprod
    return ((1 - a) / a).sqrt()


def nearest_timestep(model, sigma: torch.Tensor) -> torch.Tensor:
    """The timestep whose sigma is nearest to each sigma (EDM's round_sigma over the model's bins)."""
    table = model_sigmas(model)
    return (sigma.detach().double().cpu().reshape(-1, 1) - table.reshape(1, -1)).abs().argmin(1)


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return v.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def edm_denoise(model, unet, x: torch.Tensor, sigma: torch.Tensor, cond: Conditioning) -> torch.Tensor:
    """D(x; sigma) = x - sigma * eps(x / sqrt(1 + sigma^2), t(sigma)) for x = x0 + sigma * n, per-sample sigma."""
    sigma = sigma.double().reshape(-1)
    t = nearest_timestep(model, sigma).to(x.device)
    eps = model.denoise(x * _col(1 / (sigma**2 + 1).sqrt(), x), t, cond, unet)
    return x - _col(sigma, x) * eps


def cfg_denoise(model, unet, x, sigma, cond: Conditioning, uncond: Conditioning | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance on the denoiser, d_u + scale (d_c - d_u), in one batched call;
    scale 1 is the conditional denoiser alone. (s = (d - x) / sigma^2 is affine in d, so this is CFG
    on the score too.)"""
    if scale == 1.0:
        return edm_denoise(model, unet, x, sigma, cond)
    sigma = sigma.double().reshape(-1)
    d_u, d_c = edm_denoise(model, unet, torch.cat([x, x]), torch.cat([sigma, sigma]), Conditioning.cat([uncond, cond])).chunk(2)
    return d_u + scale * (d_c - d_u)


def snapped_sigma_init(model, sigma_init: float) -> tuple[int, float]:
    """The timestep whose sigma is nearest to ``sigma_init``, and that sigma (2.5 -> t 625, 2.5017 on SD's schedule)."""
    t = int(nearest_timestep(model, torch.tensor([sigma_init])))
    return t, float(model_sigmas(model)[t])


def draw_latents(model, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One standard-normal latent per image from its own generator (as ``DiffusionModel.sample`` draws)."""
    shape = model.latent_shape()
    return torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) for g in generators]).to(model.device, model.dtype)


def one_step(model, unet, z: torch.Tensor, sigma_init: float, cond: Conditioning, prior: str = "std") -> torch.Tensor:
    """g(z | c) = D(s z; sigma_init) with s = sigma_init (prior std) or sqrt(sigma_init) (prior variance)."""
    scale = sigma_init if prior == "std" else math.sqrt(sigma_init)
    return edm_denoise(model, unet, scale * z, torch.full((z.shape[0],), sigma_init, dtype=torch.float64), cond)


def sample_sigmas(n: int, generator: torch.Generator, p_mean: float, p_std: float, lo: float, hi: float, per_batch: bool = False) -> torch.Tensor:
    """EDM's log-normal noise levels (C.5, C.6): sigma = exp(p_mean + p_std s), s ~ N(0, 1), clipped to [lo, hi]."""
    s = torch.randn((1 if per_batch else n,), generator=generator, dtype=torch.float64)
    return (p_mean + p_std * s).exp().clamp(lo, hi).expand(n)


# ---- the two losses -----------------------------------------------------------------------------
def ta_weight(sigma: torch.Tensor, kind: str, sigma_data: float) -> torch.Tensor:
    """lambda(sigma): EDM's (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (C.7), or 1."""
    sigma = sigma.double()
    if kind == "edm":
        return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
    return torch.ones_like(sigma)


def ta_loss(d_pred: torch.Tensor, x0: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """mean over the batch of sum over pixels of lambda (d_psi(x_t) - x0)^2 (Listing 1)."""
    return (_col(weight, d_pred) * (d_pred - x0) ** 2).flatten(1).sum(1).mean()


def generator_weight(y: torch.Tensor, kind: str) -> torch.Tensor:
    """w per sample: 1 / ||y||_2 (C.8) or 1."""
    if kind == "inv_norm":
        return 1.0 / y.detach().flatten(1).norm(dim=1).clamp_min(1e-12)
    return torch.ones(y.shape[0], device=y.device, dtype=y.dtype)


def generator_loss(x_t: torch.Tensor, y: torch.Tensor, w: torch.Tensor, reward: torch.Tensor | None = None, alpha_rew: float = 0.0) -> torch.Tensor:
    """mean over the batch of [ sum over pixels of w y * x_t  -  alpha_rew r ]; y is a constant."""
    per_sample = (_col(w, x_t) * y.detach() * x_t).flatten(1).sum(1)
    if reward is not None and alpha_rew:
        per_sample = per_sample - alpha_rew * reward.to(per_sample.dtype)
    return per_sample.mean()


# ---- the recipe ---------------------------------------------------------------------------------
class DiffInstructPP(Method):
    """The TA takes its ``k_ta`` updates at the first micro-batch of every optimizer step, on as many
    fresh samples as the step averages (``batch_size x grad_accum``, in micro-batch-sized chunks whose
    gradients accumulate): Algorithm 1's alternation of one TA and one generator update, whatever
    ``train.micro_batch_size`` cuts the generator's batch into."""

    @dataclass(kw_only=True)
    class Spec(RewardSpec):
        alpha_cfg: float = setting(4.5, "teacher CFG scale (App. A.2); by Thm 3.3 an implicit reward with beta = 1 / (alpha_cfg - 1)", at_least(0))
        alpha_rew: float = setting(0.0, "weight of the differentiable reward (0: Diff-Instruct)", at_least(0))
        sigma_init: float = setting(2.5, "the generator's fixed noise level (A.2, Table 2), snapped to the nearest timestep", above(0))
        prior: str = setting("std", "std: z ~ N(0, sigma_init^2 I); variance: N(0, sigma_init I) as C.11 writes it", one_of(*OPTIONS["prior"]))
        p_mean: float = setting(-2.0, "sigma = exp(s), s ~ N(p_mean, p_std^2) for the TA and the generator step (C.5, C.6)")
        p_std: float = setting(2.0, "", above(0))
        sigma_min: Optional[float] = setting(None, "null: the model's own sigma_0", above(0))
        sigma_max: Optional[float] = setting(None, "null: the model's own sigma_{T-1}", above(0))
        sigma_per: str = setting("sample", "one sigma per sample (the text), or per batch (Listing 1)", one_of(*OPTIONS["sigma_per"]))
        sigma_data: float = setting(0.5, "EDM's sigma_data (the paper gives none)", above(0))
        ta_weighting: str = setting("edm", "edm: lambda_EDM (C.7); constant: 1 (C.1)", one_of(*OPTIONS["ta_weighting"]))
        gen_weighting: str = setting("inv_norm", "inv_norm: w = 1 / ||d_psi - d~_ref||_2 (C.8); constant: w = 1", one_of(*OPTIONS["gen_weighting"]))
        k_ta: int = setting(1, "TA updates per generator step (Listing 1: 1)", at_least(1))
        ta_lr: float = setting(1.0e-3, "the TA's Adam learning rate", above(0))
        ta_betas: List[float] = setting([0.0, 0.999], "the TA's Adam (beta1, beta2)", BETAS)

    def prepare(self, ctx):
        spec, model = self.spec, ctx.model
        for key, allowed in OPTIONS.items():
            if getattr(spec, key) not in allowed:
                raise UsageError(f"unknown method.{key} '{getattr(spec, key)}': use {' or '.join(allowed)}")
        self.alpha_cfg = spec.alpha_cfg
        self.alpha_rew = spec.alpha_rew
        self.k_ta = spec.k_ta
        if self.k_ta < 1:
            raise UsageError(f"method.k_ta={self.k_ta}: the TA needs at least one update per generator step")
        if self.alpha_rew:
            if ctx.reward is None or not ctx.reward.differentiable:
                name = ctx.reward.name if ctx.reward is not None else None
                raise UsageError(
                    f"method '{spec.name}' back-propagates through its reward (alpha_rew={self.alpha_rew}) and {name!r} is not "
                    "differentiable: set method.reward= brightness, contrast or colorfulness, or method.alpha_rew=0"
                )
        if model.unet.config.get("time_cond_proj_dim"):
            raise UsageError(f"model '{model.name}' has a guidance-embedded UNet; the teacher's CFG needs separate conditional and unconditional passes")
        sigmas = model_sigmas(model)
        self.lo = spec.sigma_min if spec.sigma_min is not None else float(sigmas[0])
        self.hi = spec.sigma_max if spec.sigma_max is not None else float(sigmas[-1])
        self.t_init, self.sigma_init = snapped_sigma_init(model, spec.sigma_init)
        self.prior = spec.prior
        self._check_sampler(model)
        if spec.init:
            self._load_init(ctx, Path(spec.init))
        self.ta = self._copy_teacher(ctx)
        params = [p for p in self.ta.parameters() if p.requires_grad]
        self.ta_opt = torch.optim.Adam(params, lr=spec.ta_lr, betas=tuple(spec.ta_betas))
        return {}

    def _check_sampler(self, model) -> None:
        """Training: a model that samples in one step must sample the generator trained here; a
        multi-step teacher (``bench train ... model=tiny``) only trains (evaluation is checked by
        :meth:`check_evaluation`)."""
        if len(model.timesteps()) > 1:
            return
        problem = self._generator_mismatch(model)
        if problem:
            raise UsageError(problem)

    def check_evaluation(self, model) -> None:
        """Evaluating the trained generator with any sampler but one step of it would score another map."""
        self.t_init, self.sigma_init = snapped_sigma_init(model, self.spec.sigma_init)
        self.prior = self.spec.prior
        problem = self._generator_mismatch(model)
        if problem:
            raise UsageError(problem)

    def _generator_mismatch(self, model) -> str | None:
        steps = model.timesteps()
        starts_at_sigma = abs(model.initial_scale() - math.sqrt(1 - model.alpha(steps[0]))) < 1e-12  # x_T = sigma z in sigma space
        one_step = len(steps) == 1 and model.sampler.kind in ("euler", "euler_ancestral") and starts_at_sigma
        if one_step and steps[0] == self.t_init and self.prior == "std" and model.sampler.guidance <= 1.0:
            return None
        return (
            f"method '{self.spec.name}' trains a one-step generator D(z; {self.sigma_init:.4f}) at t = {self.t_init} with "
            f"z ~ N(0, sigma^2 I){'' if self.prior == 'std' else ' scaled by the prior variance (no sampler draws it)'}, and model "
            f"'{model.name}' samples {len(steps)} {model.sampler.kind} step(s) from t = {steps[0]} (guidance {model.sampler.guidance}): "
            f"evaluate it with its one-step config (model=<teacher>-onestep, e.g. tiny-onestep, sd15-onestep: one euler step, "
            f"trailing spacing, at that timestep, no guidance), or change method.sigma_init"
        )

    def _load_init(self, ctx, path: Path) -> None:
        """Start the generator from a finished Diff-Instruct checkpoint (the paper's two stages); the
        teacher stays the base and the TA restarts from it, as the paper's alignment does."""
        import json

        from safetensors.torch import load_file

        path = path / "final" if (path / "final").is_dir() else path
        meta = path / "train.json"
        if not (path / "weights.safetensors").exists() or not meta.exists():
            raise UsageError(f"method.init={path}: not a finished checkpoint (weights.safetensors and train.json); use the folder `bench train` prints")
        if json.loads(meta.read_text())["lora_rank"] or not ctx.full_finetune:
            raise UsageError("method.init takes a full fine-tuning checkpoint into a full fine-tuning run (train.full_finetune=true, train.lora_rank=0)")
        misfit = lambda n: UsageError(f"method.init={path} does not fit model '{ctx.model.name}' ({n} unknown tensors)")
        copy_weights(ctx.model.unet, load_file(path / "weights.safetensors"), misfit)

    @staticmethod
    def _copy_teacher(ctx) -> torch.nn.Module:
        """A trainable full copy of the frozen teacher (the generator's LoRA layers, if any, left out)."""
        return base_copy(ctx.base_unet).requires_grad_(True).train()

    # ---- pieces a test can call ------------------------------------------------------------------
    def generate(self, ctx, prompts: Sequence[str], generators: Sequence[torch.Generator], cond: Conditioning | None = None) -> torch.Tensor:
        """x0 = g_theta(z | c) with the tuned UNet (differentiable where grad is enabled)."""
        cond = cond if cond is not None else ctx.model.encode_prompts(prompts)
        return one_step(ctx.model, ctx.model.unet, draw_latents(ctx.model, generators), self.sigma_init, cond, self.prior)

    def _noise(self, x0: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        sigma = sample_sigmas(
            x0.shape[0], generator, self.spec.p_mean, self.spec.p_std, self.lo, self.hi, self.spec.sigma_per == "batch"
        )
        n = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.device, x0.dtype)
        return sigma, x0 + _col(sigma, x0) * n

    def _draw(self, ctx, generator, n: int | None = None):
        n = n or ctx.batch_size
        prompts = [ctx.prompts[int(i)] for i in torch.randint(0, len(ctx.prompts), (n,), generator=generator)]
        return prompts, image_generators(n, generator)

    def ta_step(self, ctx, generator: torch.Generator) -> float:
        """One denoising-score-matching update of the TA on fresh generator samples (theta fixed): the
        samples of a whole optimizer step, drawn at once and run a micro-batch at a time."""
        n, chunk = ctx.batch_size * ctx.grad_accum, ctx.batch_size
        prompts, gens = self._draw(ctx, generator, n)
        with torch.no_grad():
            x0 = torch.cat([self.generate(ctx, prompts[i : i + chunk], gens[i : i + chunk]) for i in range(0, n, chunk)])
        sigma, x_t = self._noise(x0, generator)
        weight = ta_weight(sigma, self.spec.ta_weighting, self.spec.sigma_data)
        self.ta_opt.zero_grad(set_to_none=True)
        total = 0.0
        with torch.enable_grad():
            for i in range(0, n, chunk):
                part = slice(i, i + chunk)
                d = edm_denoise(ctx.model, self.ta, x_t[part], sigma[part], ctx.model.encode_prompts(prompts[part]))
                loss = ta_loss(d, x0[part], weight[part]) * (d.shape[0] / n)  # the mean over the step's samples
                loss.backward()
                total += float(loss.detach())
        self.ta_opt.step()
        return total

    def loss(self, ctx, data, generator: torch.Generator):
        if ctx.micro == 0:
            self._ta_loss = sum(self.ta_step(ctx, generator) for _ in range(self.k_ta)) / self.k_ta
        model = ctx.model
        prompts, gens = self._draw(ctx, generator)
        cond = model.encode_prompts(prompts)
        x0 = self.generate(ctx, prompts, gens, cond)
        sigma, x_t = self._noise(x0, generator)
        with torch.no_grad():
            x_in = x_t.detach()
            uncond = model.unconditional(len(prompts)) if self.alpha_cfg != 1.0 else None
            with ctx.reference():
                d_ref = cfg_denoise(model, model.unet, x_in, sigma, cond, uncond, self.alpha_cfg)
            y = edm_denoise(model, self.ta, x_in, sigma, cond) - d_ref
            w = generator_weight(y, self.spec.gen_weighting)
        reward = None
        logs = {"ta_loss": self._ta_loss, "y_norm": float(y.flatten(1).norm(dim=1).mean())}
        if self.alpha_rew:
            reward = ctx.reward.score(model.decode(x0).float(), prompts)
            logs["reward"] = float(reward.detach().mean())
        return generator_loss(x_t, y, w, reward, self.alpha_rew), logs

    # ---- the TA in the trainer's checkpoints ------------------------------------------------------
    def extra_state(self) -> dict[str, torch.Tensor]:
        state = {f"ta.{n}": p.detach() for n, p in self.ta.named_parameters() if p.requires_grad}
        for idx, s in self.ta_opt.state_dict()["state"].items():
            for k, v in s.items():
                state[f"ta_opt.{idx}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
        return state

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        copy_weights(self.ta, {k.removeprefix("ta."): v for k, v in tensors.items() if k.startswith("ta.")})
        opt_state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("ta_opt."):
                idx, _, name = key.removeprefix("ta_opt.").partition(".")
                opt_state.setdefault(int(idx), {})[name] = value
        self.ta_opt.load_state_dict({"state": opt_state, "param_groups": self.ta_opt.state_dict()["param_groups"]})

    def plan(self, p):
        """``bench plan``: per generator step, ``k_ta`` TA updates on fresh one-step samples, then the
        generator's sample with gradient, the teacher with CFG and the TA without."""
        n = p.batch_size
        cfg = 2 if self.spec.alpha_cfg != 1.0 else 1
        ta = p.passes(nograd=[(n, 1)], grad=[(n, 1)]).times(self.spec.k_ta)
        generator = p.passes(grad=[(n, 1)], nograd=[(n * cfg, 1), (n, 1)], grad_decode=n if self.spec.alpha_rew else 0)
        return p.work(
            ta + generator, networks=[("TA (a trainable copy of the UNet, float32, Adam)", p.unet_parameters, 16)],
            notes=["the TA's k_ta updates run at each step's first micro-batch, a micro-batch-sized chunk at a time, before the generator's passes: the plan spreads them over the step's micro-batches and counts a chunk with the generator's passes (an over-estimate of the peak)"],
        )
