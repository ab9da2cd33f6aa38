"""Rectified-flow text-to-image transformers (Stable Diffusion 3 / 3.5, FLUX.1) with their samplers as MDPs.

A flow model noises by interpolation, x_sigma = (1 - sigma) x0 + sigma eps, and its transformer
predicts the velocity v = eps - x0, so the clean estimate is x0 = x_sigma - sigma v. The state of
the MDP is the unpacked latent (C, h, w) in both layouts; FLUX's 2 x 2 packing into tokens happens
inside each transformer call, as ``FluxPipeline`` does it, and changes no Gaussian (it permutes
elements). Samplers, by ``kind``, on the pipeline's ``FlowMatchEulerDiscreteScheduler``:

* ``flow_euler``: the scheduler's Euler step x_prev = x + (sigma_prev - sigma) v, deterministic
  (what ``StableDiffusion3Pipeline`` and ``FluxPipeline`` sample);
* ``flow_sde``: Flow-GRPO's SDE with the Euler ODE's marginals (Liu et al. 2025, Eq. 8;
  yifan123/flow_grpo ``sde_step_with_logprob``): a Gaussian step with
  sigma_t = a sqrt(sigma / (1 - sigma)) (at sigma = 1 the denominator takes the schedule's second
  sigma, as the official code does), dt = sigma_prev - sigma < 0,

      mean = x (1 + sigma_t^2 dt / (2 sigma)) + v (1 + sigma_t^2 (1 - sigma) / (2 sigma)) dt
      std  = sigma_t sqrt(-dt)

  with the noise level a = the sampler's ``eta`` (the official 0.7). Every step draws noise, the
  last one too (it lands on sigma = 0 with std sigma_t sqrt(sigma_N));
* ``dance_sde``: DanceGRPO's SDE (XueZeyue/DanceGRPO ``flux_step``): the same step with a constant
  diffusion coefficient sigma_t = eta (the official 0.3), so std = eta sqrt(sigma - sigma_prev).

The steps are the scheduler's own ``set_timesteps`` called as each pipeline calls it (FLUX: sigmas
linspace(1, 1/N, N) and the resolution's shift mu; SD3: the scheduler's shift, mu only with dynamic
shifting), so ``gen.steps=N`` visits what the pipeline visits; a step is named by its timestep
(sigma x 1000 after the shift, a float). ``tests/test_flow_parity.py`` checks whole trajectories
against both pipelines. The trajectory methods (online PSO, D3PO, DDPO, Flow-GRPO) read the
transitions through ``predict``, ``x0_from_prediction`` and ``transition``, as on an epsilon model.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from bench.errors import UsageError
from bench.models.diffusion import Conditioning, DiffusionModel, Sampler, SamplerError, Transition

FLOW_KINDS = ("flow_euler", "flow_sde", "dance_sde")
SDE_KINDS = ("flow_sde", "dance_sde")
LAYOUTS = {"FluxTransformer2DModel": "flux", "SD3Transformer2DModel": "sd3"}  # transformer class -> the embedded builds' ``layout``
FLOW_LAYOUTS = tuple(LAYOUTS.values())


@dataclass(frozen=True)
class FlowSchedule:
    timesteps: tuple[float, ...]  # one per step, noisiest first: sigma x num_train_timesteps, as the scheduler lists them
    sigmas: tuple[float, ...]  # one per step and the final 0


def flow_schedule(layout: str, sampler: Sampler, scheduler_config: dict, image_seq_len: int) -> FlowSchedule:
    """Instantiate the pipeline's scheduler with the sampler's overrides and call ``set_timesteps`` as the
    layout's pipeline does; read back its timesteps and sigmas (float32, as diffusers keeps them)."""
    import diffusers
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    if sampler.kind not in FLOW_KINDS:
        raise UsageError(f"a flow model samples with {' or '.join(FLOW_KINDS)}, not '{sampler.kind}': set model.sampler.kind")
    if sampler.timesteps:
        raise UsageError("flow samplers take the scheduler's own sigmas: set the sampler's timesteps to null")
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(dict(scheduler_config), **dict(sampler.scheduler_config))
    cfg = sched.config
    if cfg.get("stochastic_sampling") or cfg.get("invert_sigmas"):
        raise UsageError("FlowMatchEulerDiscreteScheduler with stochastic_sampling or invert_sigmas is not implemented")
    mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15 if layout == "flux" else 1.16))
    n = sampler.steps
    if layout == "flux":  # FluxPipeline: its own sigma list and always mu (the scheduler uses it only with dynamic shifting)
        sigmas = None if cfg.get("use_flow_sigmas") else np.linspace(1.0, 1 / n, n)
        sched.set_timesteps(n, sigmas=sigmas, mu=mu)
    else:  # StableDiffusion3Pipeline: the scheduler's own spacing, mu only where it shifts dynamically
        sched.set_timesteps(n, **({"mu": mu} if cfg.get("use_dynamic_shifting") else {}))
    return FlowSchedule(tuple(float(t) for t in sched.timesteps), tuple(float(s) for s in sched.sigmas))


class FlowModel(DiffusionModel):
    """A rectified-flow pipeline (SD3 or FLUX layout) behind the contract of ``DiffusionModel``.

    The transformer sits in ``unet``, the name the trainer, LoRA and the reference model use for
    the denoising network. The pipeline object is kept for its own prompt encoding and latent
    packing, so the conditioning is the pipeline's by construction.
    """

    # LoRA on both streams' attention projections, as yifan123/flow_grpo's scripts (train_sd3.py's target_modules)
    predicts = "velocity"
    lora_targets = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out")

    def __init__(self, name, pipeline, sampler: Sampler, resolution, identity, max_sequence_length: int):
        self.pipeline = pipeline
        self.layout = LAYOUTS[type(pipeline.transformer).__name__]
        self.text_encoder_3 = getattr(pipeline, "text_encoder_3", None)  # SD3's T5
        self.max_sequence_length = int(max_sequence_length)
        super().__init__(name, pipeline.transformer, pipeline.vae, pipeline.text_encoder, pipeline.tokenizer, pipeline.scheduler.config,
                         sampler, resolution, identity, pipeline.text_encoder_2, pipeline.tokenizer_2)
        self.shift_factor = self.vae.config.shift_factor or 0.0
        if self.layout == "flux":  # FLUX's transformer reads 2 x 2 patches of the latent as one token
            self.latent_channels //= 4

    def read_noise_schedule(self) -> None:
        """A flow model's training noise is the interpolation at sigma = t / T: no alphas."""
        self.num_train_timesteps = int(self.scheduler_config.get("num_train_timesteps", 1000))

    @functools.cached_property
    def _training_timesteps(self) -> torch.Tensor:
        import diffusers

        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(dict(self.scheduler_config)).timesteps.to(torch.float64)

    def training_timesteps(self) -> torch.Tensor:
        """The scheduler's T timesteps (sigma x T) before ``set_timesteps``: its shift applied (SD3.5's 3), as
        ``FlowMatchEulerDiscreteScheduler.from_pretrained`` holds them."""
        return self._training_timesteps

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2, self.text_encoder_3) if m is not None]

    # ---- conditioning ----------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], guidance: float | None = None) -> Conditioning:
        """The pipeline's own ``encode_prompt``: FLUX's T5 states and CLIP pooled output; SD3's CLIP-L and
        CLIP-G penultimate states beside T5's, with both pooled outputs. A guidance-distilled FLUX (dev)
        carries the guidance scale as its embedding input."""
        prompts = list(prompts)
        if self.layout == "flux":
            hidden, pooled, _ = self.pipeline.encode_prompt(prompt=prompts, prompt_2=None, device=self.device, max_sequence_length=self.max_sequence_length)
        else:
            hidden, _, pooled, _ = self.pipeline.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=self.device,
                                                               do_classifier_free_guidance=False, max_sequence_length=self.max_sequence_length)
        cond = Conditioning(hidden.to(self.dtype), pooled.to(self.dtype))
        return self.with_guidance(cond, self.sampler.guidance if guidance is None else guidance)

    def with_guidance(self, cond: Conditioning, guidance: float) -> Conditioning:
        if not self.unet.config.get("guidance_embeds"):
            return cond
        scale = torch.full((cond.hidden.shape[0],), float(guidance), device=cond.hidden.device, dtype=torch.float32)
        return Conditioning(cond.hidden, cond.pooled, None, scale)

    def unconditional(self, n: int) -> Conditioning:
        """SD3's unconditional input: the empty prompt, encoded as its pipeline encodes the default negative prompt."""
        return self.encode_prompts([""] * n)

    def uses_cfg(self, guidance: float) -> bool:
        """SD3 guides with a second pass; FLUX never does here: dev embeds its guidance, schnell ignores it (``FluxPipeline``)."""
        return self.layout == "sd3" and guidance > 1.0

    # ---- the velocity ------------------------------------------------------------------------
    def denoise(self, x_t, t, cond: Conditioning, unet=None) -> torch.Tensor:
        """The transformer's velocity at per-sample (or one shared) timestep t (sigma x 1000)."""
        net = unet or self.unet
        if net.config.get("guidance_embeds") and cond.guidance_embedding is None:
            cond = self.with_guidance(cond, self.sampler.guidance)
        n = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device, dtype=x_t.dtype)
        t = t.expand(n) if t.dim() == 0 else t
        if self.layout == "sd3":
            return net(hidden_states=x_t, timestep=t, encoder_hidden_states=cond.hidden, pooled_projections=cond.pooled, return_dict=False)[0]
        c, h, w = x_t.shape[1:]
        packed = self.pipeline._pack_latents(x_t, n, c, h, w)
        image_ids = self.pipeline._prepare_latent_image_ids(n, h // 2, w // 2, x_t.device, x_t.dtype)
        text_ids = torch.zeros(cond.hidden.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        v = net(hidden_states=packed, timestep=t / 1000, guidance=cond.guidance_embedding, pooled_projections=cond.pooled,
                encoder_hidden_states=cond.hidden, txt_ids=text_ids, img_ids=image_ids, return_dict=False)[0]
        return self.pipeline._unpack_latents(v, h * self.latent_scale, w * self.latent_scale, self.latent_scale)

    def predict(self, x_t, t, cond, uncond=None, guidance: float = 1.0, unet=None) -> torch.Tensor:
        """The guided velocity: v_u + w (v_c - v_u) for SD3 with CFG, else one pass."""
        if uncond is None or not self.uses_cfg(guidance):
            return self.denoise(x_t, t, cond, unet)
        v_u, v_c = self.denoise(torch.cat([x_t, x_t]), t, Conditioning.cat([uncond, cond]), unet).chunk(2)
        return v_u + guidance * (v_c - v_u)

    def x0_from_prediction(self, x_t, v, t) -> torch.Tensor:
        return x_t - self.sigma(t) * v

    def predict_eps(self, *args, **kwargs):
        """What only an epsilon model has (its epsilon, its alphas): one line naming the methods that run here."""
        raise SamplerError(f"model '{self.name}' is a flow model (it predicts velocity, on sigmas, not alphas): this method works in "
                           "epsilon space; use one that reads the sampler's transitions or the velocity target (pso-online, d3po, ddpo, "
                           "flow-grpo, sft, diffusion-dpo, diffusion-kto, mapo, draft)")

    x0_from_eps = alpha = alpha_prev = predict_eps
    alphas_cumprod = property(predict_eps)

    # ---- the MDP ---------------------------------------------------------------------------
    def schedule(self, sampler: Sampler | None = None) -> FlowSchedule:
        sampler = sampler or self.sampler
        if sampler not in self._schedules:
            side = self.resolution // self.latent_scale
            patch = 2 if self.layout == "flux" else self.unet.config.patch_size
            self._schedules[sampler] = flow_schedule(self.layout, sampler, self.scheduler_config, (side // patch) ** 2)
        return self._schedules[sampler]

    def timesteps(self, sampler: Sampler | None = None) -> list[float]:
        return list(self.schedule(sampler).timesteps)

    def sigma(self, t, sampler: Sampler | None = None) -> float:
        """sigma of the step at timestep t as the scheduler lists it (float32, as its step uses it); 0 at the end (-1)."""
        if t < 0:
            return 0.0
        sch = self.schedule(sampler)
        return sch.sigmas[sch.timesteps.index(t)]

    def stochastic_timesteps(self, sampler: Sampler | None = None) -> list[float]:
        """Every step of the SDE (each draws noise, the last too); the ODE has none: one line naming the fix."""
        sampler = sampler or self.sampler
        if sampler.kind not in SDE_KINDS or not sampler.eta:
            raise SamplerError(
                f"trajectory methods train through the sampler's Gaussian transitions, and model '{self.name}' samples with "
                f"the deterministic flow-matching Euler ODE: train through Flow-GRPO's SDE, train.sampler: {{kind: flow_sde, eta: 0.7}} in the preset"
            )
        return self.timesteps(sampler)

    def sde_scale(self, sigma: float, sampler: Sampler) -> float:
        """Flow-GRPO's sigma_t = a sqrt(sigma / (1 - sigma)) (at sigma = 1 the denominator uses the schedule's
        second sigma), or DanceGRPO's constant a."""
        if sampler.kind == "dance_sde":
            return sampler.eta
        sigmas = self.schedule(sampler).sigmas
        return sampler.eta * math.sqrt(sigma / (1 - (sigmas[1] if sigma == 1 else sigma)))

    def transition(self, x_t, x0_hat, v, t, t_prev, sampler: Sampler | None = None) -> Transition:
        """The step t -> t_prev (-1: the end) as a Gaussian, from the velocity ``v`` (``x0_hat`` is implied by it)."""
        sampler = sampler or self.sampler
        sigma, sigma_prev = self.sigma(t, sampler), self.sigma(t_prev, sampler)
        dt = sigma_prev - sigma
        zero = torch.zeros((), device=x_t.device, dtype=x_t.dtype)
        if sampler.kind == "flow_euler":
            return Transition(x_t + dt * v, zero)
        s2 = self.sde_scale(sigma, sampler) ** 2
        mean = x_t * (1 + s2 / (2 * sigma) * dt) + v * (1 + s2 * (1 - sigma) / (2 * sigma)) * dt
        return Transition(mean, zero + math.sqrt(s2 * -dt))

    def initial_scale(self, t=None, sampler: Sampler | None = None) -> float:
        return 1.0  # x at sigma = 1 is the noise itself (FlowMatchEulerDiscreteScheduler's init_noise_sigma)

    # ---- pixels and the training objective --------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], undoing the VAE's scaling and shift as both pipelines do."""
        images = self.vae.decode((latents / self.scaling_factor + self.shift_factor).to(self.vae.dtype)).sample
        return (images / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        return (dist.mean - self.shift_factor) * self.scaling_factor

    def add_noise(self, x0, noise, t) -> torch.Tensor:
        """The interpolation x_sigma = (1 - sigma) x0 + sigma noise at per-sample timesteps t (sigma = t / 1000)."""
        sigma = torch.as_tensor(t, device=x0.device, dtype=x0.dtype) / self.num_train_timesteps
        sigma = sigma.reshape(-1, *([1] * (x0.dim() - 1))) if sigma.dim() else sigma
        return (1 - sigma) * x0 + sigma * noise

    def training_target(self, x0, noise) -> torch.Tensor:
        """The velocity of the interpolation, noise - x0 (the flow-matching target)."""
        return noise - x0

    def diffusion_loss(self, x0, cond, generator: torch.Generator, unet=None, timesteps: Sequence[float] | None = None) -> torch.Tensor:
        """The flow-matching loss per sample, ||v_theta - (noise - x0)||^2, at sigma uniform in (0, 1]
        or, where given, at one of ``timesteps``."""
        n = x0.shape[0]
        if timesteps:
            t = torch.tensor([float(s) for s in timesteps], dtype=torch.float64)[torch.randint(0, len(timesteps), (n,), generator=generator)]
        else:
            t = (1 - torch.rand(n, generator=generator, dtype=torch.float64)) * self.num_train_timesteps
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.device, x0.dtype)
        t = t.to(x0.device, x0.dtype)
        pred = self.denoise(self.add_noise(x0, noise, t), t, cond, unet)
        return F.mse_loss(pred.float(), self.training_target(x0, noise).float(), reduction="none").flatten(1).mean(1)
