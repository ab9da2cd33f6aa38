"""A text-to-image latent diffusion model whose sampler is an explicit Markov decision process.

Every sampler here is "predict x0, then move to the next timestep":

* ``ddim``: the DDIM posterior q(x_prev | x_t, x0_hat) with stochasticity eta
  (eta = 1 is DDPM-like and is the MDP DDPO and D3PO train through);
* ``renoise``: few-step distilled models (DMD2, LCM) forward-noise the x0
  estimate to the next timestep, x_prev = sqrt(a_prev) x0_hat + sqrt(1 - a_prev) z;
* ``euler_ancestral``: SDXL-Turbo's Euler-ancestral step in sigma space (sigma_up, sigma_down).

Each transition is a Gaussian with an explicit mean and standard deviation, so
methods (PSO, DDPO, LaSRO) read log-probabilities off the same code that
samples. The last step returns x0_hat deterministically. Which sampler a model
uses is data in its config, never a branch in a method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


SAMPLER_KINDS = ("ddim", "renoise", "euler_ancestral")


@dataclass(frozen=True)
class Sampler:
    kind: str  # one of SAMPLER_KINDS
    steps: int
    guidance: float
    eta: float = 0.0
    timesteps: tuple[int, ...] | None = None

    def schedule(self, num_train_timesteps: int) -> list[int]:
        """Timesteps visited, from noisiest to cleanest."""
        if self.timesteps:
            full = list(self.timesteps)
            if self.steps == len(full):
                return full
            if self.steps > len(full):
                raise ValueError(f"sampler has {len(full)} timesteps, cannot take {self.steps} steps")
            # Fewer steps than listed: keep the first and spread the rest evenly, as DMD2/LCM do.
            idx = [round(i * len(full) / self.steps) for i in range(self.steps)]
            return [full[i] for i in idx]
        stride = num_train_timesteps // self.steps
        return [i * stride for i in reversed(range(self.steps))]  # "leading" spacing, as DDIM


@dataclass
class Transition:
    """One stochastic step x_t -> x_prev: Gaussian mean and std (std 0 on the last step)."""

    mean: torch.Tensor
    std: torch.Tensor  # shape broadcastable to mean; a scalar tensor per step


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Log-density of x under N(mean, std^2 I), summed over all but the batch dimension."""
    var = std**2
    lp = -((x - mean) ** 2) / (2 * var) - torch.log(std) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).sum(1)


@dataclass
class Conditioning:
    """What a UNet call is conditioned on: the text encoder's token states and, for SDXL-layout
    models, the pooled text embedding and the size/crop ids (``added_cond_kwargs``); for a
    guidance-distilled UNet (LCM's ``time_cond_proj_dim``), the embedding of the guidance scale w
    it was distilled to take (``timestep_cond``)."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None
    guidance_embedding: torch.Tensor | None = None

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        join = lambda xs: None if xs[0] is None else torch.cat(xs)
        fields = ("hidden", "pooled", "time_ids", "guidance_embedding")
        return Conditioning(*(join([getattr(c, f) for c in items]) for f in fields))

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.hidden}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        if self.guidance_embedding is not None:
            kwargs["timestep_cond"] = self.guidance_embedding
        return kwargs


def guidance_embedding(guidance: float, n: int, dim: int, dtype) -> torch.Tensor:
    """diffusers' sinusoidal embedding of w = guidance - 1 (LCM's w: its teacher's CFG is
    cond + w (cond - uncond)), the input of an LCM UNet's ``cond_proj``, as the pipelines make it."""
    from diffusers import StableDiffusionXLPipeline

    w = torch.full((n,), float(guidance) - 1.0)
    return StableDiffusionXLPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim, dtype=dtype)


def encode_text(prompts: Sequence[str], tokenizers, encoders, resolution: int, device, dtype) -> Conditioning:
    """Encode prompts as Stable Diffusion (one CLIP encoder, last hidden state) or SDXL does (two
    encoders' penultimate hidden states concatenated, the second's projected pooled output, and
    size ids (resolution, resolution, 0, 0, resolution, resolution))."""
    tokens = [
        tok(list(prompts), padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids.to(device)
        for tok in tokenizers
    ]
    if len(encoders) == 1:
        return Conditioning(encoders[0](tokens[0])[0].to(dtype))
    states, pooled = [], None
    for ids, encoder in zip(tokens, encoders):
        out = encoder(ids, output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out.text_embeds if hasattr(out, "text_embeds") else out[0]
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], device=device).repeat(len(prompts), 1)
    return Conditioning(torch.cat(states, dim=-1).to(dtype), pooled.to(dtype), time_ids.to(dtype))


def trained_timesteps(sampler_timesteps: Sequence[int]) -> list[int]:
    """t_N .. t_2: the timesteps whose transitions are stochastic (every one but the last, which
    returns x0 deterministically); trajectory methods (PSO, D3PO, DDPO) train on these."""
    if len(sampler_timesteps) < 2:
        raise ValueError(
            f"trajectory methods train on the stochastic steps of the sampler, and {len(sampler_timesteps)} step(s) have none: "
            "train with the model's multi-step sampler (e.g. its 4 steps) and evaluate at 1 step with gen.steps=1"
        )
    return list(sampler_timesteps[:-1])


class DiffusionModel:
    """Pipeline components plus the sampler seen as an MDP.

    ``unet`` may carry LoRA adapters; ``reference()`` gives the frozen base
    model's predictions by disabling them, so no second copy sits in memory.
    """

    def __init__(
        self, name, unet, vae, text_encoder, tokenizer, scheduler_config, sampler: Sampler, resolution, identity,
        text_encoder_2=None, tokenizer_2=None, zero_uncond: bool = False,
    ):
        self.name = name
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.text_encoder_2 = text_encoder_2  # SDXL layout: a second (projecting) text encoder
        self.tokenizer_2 = tokenizer_2
        self.zero_uncond = zero_uncond  # SDXL's force_zeros_for_empty_prompt: CFG's unconditional input is zeros
        self.sampler = sampler
        self.resolution = int(resolution)
        self.identity = identity  # what determines the weights: hub id + revision, or the build-spec hash
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(scheduler_config)
        self.num_train_timesteps = sched.config.num_train_timesteps
        self.alphas_cumprod = sched.alphas_cumprod.to(torch.float64)
        self.latent_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = vae.config.scaling_factor
        self.latent_channels = unet.config.in_channels
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        for module in self.modules():
            module.requires_grad_(False).eval()

    # ---- placement -------------------------------------------------------------------------
    def to(self, device=None, dtype=None) -> "DiffusionModel":
        self.device = torch.device(device) if device is not None else self.device
        self.dtype = dtype or self.dtype
        for module in self.modules():
            module.to(device=self.device, dtype=self.dtype)
        return self

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

    # ---- conditioning ----------------------------------------------------------------------
    def latent_shape(self) -> tuple[int, int, int]:
        side = self.resolution // self.latent_scale
        return (self.latent_channels, side, side)

    def encode_prompts(self, prompts: Sequence[str], guidance: float | None = None) -> Conditioning:
        """The prompts' conditioning; a guidance-distilled UNet also gets the embedding of the
        guidance scale (the sampler's unless given), so that every forward pass (sampling,
        training, the reference, reward back-propagation) sees the conditioning of inference."""
        tokenizers = [t for t in (self.tokenizer, self.tokenizer_2) if t is not None]
        encoders = [e for e in (self.text_encoder, self.text_encoder_2) if e is not None]
        cond = encode_text(prompts, tokenizers, encoders, self.resolution, self.device, self.dtype)
        return self.with_guidance(cond, self.sampler.guidance if guidance is None else guidance)

    def with_guidance(self, cond: Conditioning, guidance: float) -> Conditioning:
        """``cond`` carrying the embedding of ``guidance`` when the UNet is guidance-distilled."""
        dim = self.unet.config.get("time_cond_proj_dim")
        if not dim:
            return cond
        emb = guidance_embedding(guidance, cond.hidden.shape[0], dim, self.dtype).to(cond.hidden.device)
        return Conditioning(cond.hidden, cond.pooled, cond.time_ids, emb)

    def unconditional(self, n: int) -> Conditioning:
        """CFG's unconditional input: the empty prompt, or zeros where the pipeline says so (SDXL)."""
        empty = self.encode_prompts([""] * n)
        if not self.zero_uncond:
            return empty
        return Conditioning(torch.zeros_like(empty.hidden), torch.zeros_like(empty.pooled), empty.time_ids, empty.guidance_embedding)

    def denoise(self, x_t, t, cond: Conditioning, unet=None) -> torch.Tensor:
        """The UNet's epsilon prediction at per-sample (or one shared) timestep t. A guidance-distilled
        UNet given a conditioning without its guidance embedding gets the sampler's: diffusers would
        otherwise skip ``cond_proj`` silently and predict for a conditioning inference never uses."""
        net = unet or self.unet
        if net.config.get("time_cond_proj_dim") and cond.guidance_embedding is None:
            cond = self.with_guidance(cond, self.sampler.guidance)
        t = torch.as_tensor(t, device=x_t.device)
        t = t.expand(x_t.shape[0]) if t.dim() == 0 else t
        return net(x_t, t, **cond.unet_kwargs()).sample

    # ---- the MDP ---------------------------------------------------------------------------
    def timesteps(self, sampler: Sampler | None = None) -> list[int]:
        return (sampler or self.sampler).schedule(self.num_train_timesteps)

    def stochastic_timesteps(self) -> list[int]:
        return trained_timesteps(self.timesteps())

    def alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else 1.0

    def uses_cfg(self, guidance: float) -> bool:
        """Whether a guidance scale means a second, unconditional pass (not for guidance-embedded UNets)."""
        return guidance > 1.0 and not self.unet.config.get("time_cond_proj_dim")

    def predict_eps(self, x_t, t: int, cond, uncond=None, guidance: float = 1.0, unet=None) -> torch.Tensor:
        """Epsilon with classifier-free guidance, or, for a guidance-distilled UNet (LCM's
        ``time_cond_proj_dim``), with the scale fed in as an embedding of w = guidance - 1 in one
        pass, as diffusers' pipelines do."""
        if (unet or self.unet).config.get("time_cond_proj_dim"):
            return self.denoise(x_t, t, self.with_guidance(cond, guidance), unet)
        if uncond is None or guidance <= 1.0:
            return self.denoise(x_t, t, cond, unet)
        eps_u, eps_c = self.denoise(torch.cat([x_t, x_t]), t, Conditioning.cat([uncond, cond]), unet).chunk(2)
        return eps_u + guidance * (eps_c - eps_u)

    def x0_from_eps(self, x_t, eps, t: int) -> torch.Tensor:
        a = self.alpha(t)
        return (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)

    def add_noise(self, x0, noise, t: torch.Tensor | int) -> torch.Tensor:
        """Forward process q(x_t | x0) at per-sample timesteps t."""
        a = self.alphas_cumprod.to(x0.device)[torch.as_tensor(t, device=x0.device)].to(x0.dtype)
        a = a.reshape(-1, *([1] * (x0.dim() - 1))) if a.dim() else a
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def transition(self, x_t, x0_hat, eps_hat, t: int, t_prev: int, sampler: Sampler | None = None) -> Transition:
        """Gaussian p(x_prev | x_t) of the configured sampler; t_prev < 0 means the final step."""
        sampler = sampler or self.sampler
        zero = torch.zeros((), device=x_t.device, dtype=x_t.dtype)
        if t_prev < 0:
            return Transition(x0_hat, zero)
        a_prev = self.alpha(t_prev)
        if sampler.kind == "renoise":
            return Transition(math.sqrt(a_prev) * x0_hat, zero + math.sqrt(1 - a_prev))
        if sampler.kind == "ddim":
            a_t = self.alpha(t)
            var = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
            std = sampler.eta * math.sqrt(var)
            mean = math.sqrt(a_prev) * x0_hat + math.sqrt(max(1 - a_prev - std**2, 0.0)) * eps_hat
            return Transition(mean, zero + std)
        if sampler.kind == "euler_ancestral":
            # k-diffusion / diffusers EulerAncestralDiscreteScheduler in sigma space, x_sigma = x0 + sigma eps
            # = x_t / sqrt(a_t); the state here is the UNet's (variance-preserving) input, x_t = x_sigma * sqrt(a_t).
            # The PSO paper prints sigma_up and sigma_down garbled (a negative variance); these are the scheduler's.
            s_t, s_prev = math.sqrt((1 - self.alpha(t)) / self.alpha(t)), math.sqrt((1 - a_prev) / a_prev)
            sigma_up = math.sqrt(s_prev**2 * (s_t**2 - s_prev**2) / s_t**2)
            sigma_down = math.sqrt(s_prev**2 - sigma_up**2)
            mean_sigma = x0_hat + eps_hat * sigma_down  # x_sigma + d (sigma_down - sigma), d = (x_sigma - x0_hat) / sigma
            return Transition(math.sqrt(a_prev) * mean_sigma, zero + math.sqrt(a_prev) * sigma_up)
        raise ValueError(f"unknown sampler kind '{sampler.kind}' (expected {', '.join(SAMPLER_KINDS)})")

    def initial_scale(self, t: int, sampler: Sampler) -> float:
        """Scale of the initial noise. diffusers' Euler-ancestral scheduler with trailing spacing starts
        from sigma_max * noise in sigma space (not sqrt(sigma_max^2 + 1) * noise), which as UNet input
        is sqrt(1 - a_T) * noise; every other sampler starts from unit noise."""
        return math.sqrt(1 - self.alpha(t)) if sampler.kind == "euler_ancestral" else 1.0

    def sample(
        self,
        prompts: Sequence[str],
        generators: Sequence[torch.Generator],
        sampler: Sampler | None = None,
        trajectory: bool = False,
        unet=None,
        grad_last: int = 0,
        stop_at: int | None = None,
    ):
        """Run the sampler; every image draws all its noise from its own generator.

        Noise is drawn per image in a fixed order (initial latent, then one draw
        per stochastic step), so an image does not depend on its batch mates.
        Returns the final latents, and with ``trajectory=True`` also the list
        of states [x_T, ..., x_0] and the Transition of each step.

        Reward back-propagation: with ``grad_last=K`` only the last K steps are differentiated
        (DRaFT-K); with ``stop_at=n`` the x0 prediction of step n is returned at once (ReFL).
        """
        sampler = sampler or self.sampler
        shape = self.latent_shape()
        draw = lambda: torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) for g in generators]).to(
            self.device, self.dtype
        )
        cond = self.encode_prompts(prompts, sampler.guidance)
        uncond = self.unconditional(len(prompts)) if self.uses_cfg(sampler.guidance) else None
        steps = self.timesteps(sampler)
        x = draw() * self.initial_scale(steps[0], sampler)
        states, transitions = [x], []
        grad = torch.is_grad_enabled()
        for i, t in enumerate(steps):
            t_prev = steps[i + 1] if i + 1 < len(steps) else -1
            with torch.set_grad_enabled(grad and (not grad_last or i >= len(steps) - grad_last)):
                eps = self.predict_eps(x, t, cond, uncond, sampler.guidance, unet=unet)
                x0 = self.x0_from_eps(x, eps, t)
                if i == stop_at:
                    return x0
                step = self.transition(x, x0, eps, t, t_prev, sampler)
                x = step.mean + step.std * draw() if t_prev >= 0 and float(step.std) > 0 else step.mean
            states.append(x)
            transitions.append(step)
        return (x, states, transitions) if trajectory else x

    # ---- pixels ----------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> float images (N, 3, H, W) in [0, 1]; differentiable."""
        images = self.vae.decode(latents.to(self.vae.dtype) / self.scaling_factor).sample
        return (images / 2 + 0.5).clamp(0, 1)

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images in [0, 1] -> latents (the posterior mean, scaled as the UNet expects)."""
        dist = self.vae.encode((images * 2 - 1).to(self.vae.dtype)).latent_dist
        return dist.mean * self.scaling_factor

    def diffusion_loss(self, x0, cond, generator: torch.Generator, unet=None, timesteps: Sequence[int] | None = None) -> torch.Tensor:
        """The plain epsilon-prediction loss per sample, at a timestep drawn uniformly from
        [0, T) or, where given, from ``timesteps`` (e.g. the few-step sampler's own)."""
        n = x0.shape[0]
        if timesteps:
            t = torch.tensor(list(timesteps))[torch.randint(0, len(timesteps), (n,), generator=generator)]
        else:
            t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator)
        noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(x0.device, x0.dtype)
        x_t = self.add_noise(x0, noise, t.to(x0.device))
        pred = self.denoise(x_t, t.to(x0.device), cond, unet)
        return F.mse_loss(pred.float(), noise.float(), reduction="none").flatten(1).mean(1)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] (N, 3, H, W) -> uint8 (N, H, W, 3), rounding to nearest."""
    return (images.detach().double().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def from_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> float32 (N, 3, H, W) in [0, 1], exactly k / 255."""
    return images.permute(0, 3, 1, 2).to(torch.float32) / 255.0
