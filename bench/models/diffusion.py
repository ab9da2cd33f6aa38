"""A text-to-image latent diffusion model whose sampler is an explicit Markov decision process.

A sampler is the model card's diffusers scheduler, named by ``kind``, on the pipeline's own
scheduler config (plus the overrides the card makes, e.g. ``timestep_spacing: trailing``):

* ``ddim``: ``DDIMScheduler``, the posterior q(x_prev | x_t, x0_hat) with stochasticity eta
  (eta = 1 is the MDP DDPO and D3PO train through);
* ``euler``: ``EulerDiscreteScheduler`` (SDXL base's card), deterministic: in the UNet's
  (variance-preserving) space it is DDIM with eta 0 that ends on sigma = 0, the clean estimate;
* ``euler_ancestral``: ``EulerAncestralDiscreteScheduler`` (SDXL-Turbo's card), sigma_up / sigma_down;
* ``lcm``: ``LCMScheduler`` (LCM's and DMD2's cards): the consistency output
  c_skip(t) x_t + c_out(t) x0_hat, forward-noised to the next timestep;
* ``pndm``: ``PNDMScheduler`` with ``skip_prk_steps`` (SD1.5's card, PLMS): deterministic and
  multistep (it combines the last four epsilons), so it samples but is no MDP.

Which timesteps a step count visits is the scheduler's own ``set_timesteps`` (or the card's listed
``timesteps``, at their own length), so ``gen.steps=N`` gives what the pipeline gives. The step
math is ours, each transition a Gaussian with an explicit mean and standard deviation, so methods
(PSO, DDPO, LaSRO) read log-probabilities off the same code that samples; ``tests/test_generation_parity.py``
checks whole trajectories against the diffusers pipelines. Which sampler a model uses is data in
its config, never a branch in a method.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from bench.errors import UsageError

# kind -> the diffusers scheduler class it reproduces
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_ancestral": "EulerAncestralDiscreteScheduler",
    "lcm": "LCMScheduler",
    "pndm": "PNDMScheduler",
}
SAMPLER_KINDS = tuple(SCHEDULERS)
MULTISTEP_KINDS = ("pndm",)  # samplers whose step depends on earlier epsilons: not an MDP in x


class SamplerError(UsageError, ValueError):
    """A sampler that cannot do what a method asks (no stochastic step, no MDP): one line, naming the fix."""


@dataclass(frozen=True)
class Sampler:
    kind: str  # one of SAMPLER_KINDS
    steps: int
    guidance: float
    eta: float = 0.0
    timesteps: tuple[int, ...] | None = None  # the card's explicit list, used when steps == len(timesteps)
    scheduler_config: tuple[tuple[str, Any], ...] = ()  # overrides of the pipeline's scheduler config, sorted (key, value)

    @property
    def scheduler_class(self) -> str:
        return SCHEDULERS[self.kind]


def sampler_identity(sampler) -> dict:
    """What identifies a sampler in every cache key (images, checkpoints, prepared data, runs): its
    fields less those at their dataclass defaults, so adding an option with a default keeps every key
    made before it. A value that is not a dataclass (a stand-in) is its own identity."""
    if not dataclasses.is_dataclass(sampler):
        return sampler
    full = dataclasses.asdict(sampler)
    for f in dataclasses.fields(sampler):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        if getattr(sampler, f.name) == default:
            del full[f.name]
    return full


@dataclass(frozen=True)
class Schedule:
    """What the sampler's diffusers scheduler makes of a step count on the pipeline's scheduler config."""

    timesteps: tuple[int, ...]  # one per step, noisiest first
    evaluations: tuple[int, ...]  # the UNet's timesteps in order (PNDM evaluates its first step twice)
    stride: int | None  # DDIM / PNDM: a step from t lands on t - stride, as diffusers computes it; None: on the next listed timestep
    final_alpha: float  # alpha_bar the last step lands on (1: the clean estimate)
    initial_scale: float  # std of the initial latent as UNet input (Euler with trailing spacing starts at sigma_max, not sqrt(sigma_max^2 + 1))
    timestep_scaling: float  # LCM's boundary condition: c_skip, c_out of timestep * timestep_scaling


def build_schedule(sampler: Sampler, scheduler_config: dict, alphas_cumprod: torch.Tensor) -> Schedule:
    """Instantiate the sampler's diffusers scheduler on the pipeline's config and read its schedule."""
    import diffusers

    if sampler.kind not in SCHEDULERS:
        raise ValueError(f"unknown sampler kind '{sampler.kind}' (expected {', '.join(SAMPLER_KINDS)})")
    # as a model card does it: Scheduler.from_config(pipe.scheduler.config, **overrides), so keys the pipeline's
    # config file leaves out take the new class's defaults (diffusers' _use_default_values)
    level = diffusers.utils.logging.get_verbosity()
    diffusers.utils.logging.set_verbosity_error()  # the notices of a class change (unused keys, DMD2's off-schedule timesteps) are expected
    try:
        sched = getattr(diffusers, sampler.scheduler_class).from_config(dict(scheduler_config), **dict(sampler.scheduler_config))
        listed = list(sampler.timesteps) if sampler.timesteps and len(sampler.timesteps) == sampler.steps else None
        if listed is None:
            sched.set_timesteps(sampler.steps)
        elif sampler.kind in ("euler", "lcm"):  # the schedulers whose set_timesteps takes a list
            sched.set_timesteps(timesteps=listed)
    finally:
        diffusers.utils.logging.set_verbosity(level)
    cfg = sched.config
    unsupported = [
        f"{key}={cfg.get(key)}" for key, ok in (("prediction_type", "epsilon"), ("clip_sample", False), ("thresholding", False),
                                                ("use_karras_sigmas", False), ("rescale_betas_zero_snr", False))
        if cfg.get(key, ok) != ok
    ]
    if unsupported:
        raise UsageError(f"sampler {sampler.scheduler_class} with {', '.join(unsupported)} is not implemented (epsilon prediction, no clipping, no Karras sigmas)")
    if listed is None or sampler.kind in ("euler", "lcm"):
        evaluations = [float(t) for t in sched.timesteps]
    elif sampler.kind == "pndm":
        raise UsageError("PNDM (PLMS) takes no explicit timesteps: set the sampler's timesteps to null")
    else:  # DDIM's and Euler-ancestral's set_timesteps take no list: the steps are the list as given
        evaluations = [float(t) for t in listed]
    if any(t != int(t) for t in evaluations):
        raise UsageError(f"{sampler.scheduler_class} with timestep_spacing={cfg.get('timestep_spacing')} visits fractional timesteps; use leading or trailing")
    evaluations = [int(t) for t in evaluations]
    timesteps = [t for i, t in enumerate(evaluations) if i == 0 or t != evaluations[i - 1]]
    stride = cfg.num_train_timesteps // sampler.steps if sampler.kind in ("ddim", "pndm") and listed is None else None
    if sampler.kind in ("euler", "euler_ancestral"):
        sigma_last = float(sched.sigmas[-1]) if listed is None or sampler.kind == "euler" else 0.0
        final_alpha = 1.0 / (1.0 + sigma_last**2)
        a_T = float(alphas_cumprod[timesteps[0]])
        initial_scale = math.sqrt(1 - a_T) if cfg.timestep_spacing in ("linspace", "trailing") else 1.0
    else:
        final_alpha, initial_scale = float(sched.final_alpha_cumprod), float(sched.init_noise_sigma)
    return Schedule(tuple(timesteps), tuple(evaluations), stride, final_alpha, initial_scale, float(cfg.get("timestep_scaling", 10.0)))


@dataclass
class Transition:
    """One stochastic step x_t -> x_prev: Gaussian mean and std (std 0 on the last step)."""

    mean: torch.Tensor
    std: torch.Tensor  # shape broadcastable to mean; a scalar tensor per step
    x0_hat: torch.Tensor | None = None  # the clean estimate the step was built from (``sample`` records it)


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
    returns the clean estimate deterministically); trajectory methods (PSO, D3PO, DDPO) train on these."""
    if len(sampler_timesteps) < 2:
        raise SamplerError(
            f"trajectory methods train on the stochastic steps of the sampler, and {len(sampler_timesteps)} step(s) have none: "
            "train through a multi-step sampler (train.sampler: {steps: 4} in the preset) and evaluate at 1 step with gen.steps=1"
        )
    return list(sampler_timesteps[:-1])


class DiffusionModel:
    """Pipeline components plus the sampler seen as an MDP.

    ``unet`` may carry LoRA adapters; ``reference()`` gives the frozen base
    model's predictions by disabling them, so no second copy sits in memory.
    """

    lora_targets = ("to_q", "to_k", "to_v", "to_out.0")  # the attention projections LoRA adapts (diffusers' training scripts, the DPO and PSO codes)
    predicts = "epsilon"  # what the network predicts: "epsilon", or a flow model's "velocity"

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
        self.scheduler_config = dict(scheduler_config)  # the pipeline's; a sampler's scheduler is made from it
        self.read_noise_schedule()
        self._schedules: dict[Sampler, Schedule] = {}
        self.latent_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.scaling_factor = vae.config.scaling_factor
        self.latent_channels = unet.config.in_channels
        self.device = torch.device("cpu")
        self.dtype = torch.float32
        for module in self.modules():
            module.requires_grad_(False).eval()

    def read_noise_schedule(self) -> None:
        """T and alphas_cumprod of the pipeline's training noise schedule (DDPM's, on its config)."""
        from diffusers import DDPMScheduler

        sched = DDPMScheduler.from_config(self.scheduler_config)
        self.num_train_timesteps = sched.config.num_train_timesteps
        self.alphas_cumprod = sched.alphas_cumprod.to(torch.float64)

    def training_timesteps(self) -> torch.Tensor:
        """The training schedule's timesteps, noisiest first, as the scheduler lists them before
        ``set_timesteps`` (DDPM's T - 1, ..., 0), which a sampled index reads (diffusers' SD3 scripts)."""
        return torch.arange(self.num_train_timesteps - 1, -1, -1, dtype=torch.float64)

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
    def schedule(self, sampler: Sampler | None = None) -> Schedule:
        sampler = sampler or self.sampler
        if sampler not in self._schedules:
            self._schedules[sampler] = build_schedule(sampler, self.scheduler_config, self.alphas_cumprod)
        return self._schedules[sampler]

    def timesteps(self, sampler: Sampler | None = None) -> list[int]:
        """The timesteps the sampler's steps start from, noisiest first."""
        return list(self.schedule(sampler).timesteps)

    def stochastic_timesteps(self, sampler: Sampler | None = None) -> list[int]:
        """The timesteps whose transitions draw noise, the steps trajectory methods train on: every
        step but the last (which returns the clean estimate), and the last too where it draws noise
        (DDIM with eta > 0 on a schedule that ends at alphas_cumprod[0], set_alpha_to_one: false).
        A deterministic or multistep sampler has none: one line naming the fix."""
        sampler = sampler or self.sampler
        deterministic = sampler.kind in ("euler", "pndm") or (sampler.kind == "ddim" and not sampler.eta)
        if deterministic:
            raise SamplerError(
                f"trajectory methods train through the sampler's Gaussian transitions, and model '{self.name}' samples with "
                f"{sampler.scheduler_class}{' (eta 0)' if sampler.kind == 'ddim' else ''}, which draws no noise per step"
                f"{' and keeps an epsilon history (no MDP)' if sampler.kind in MULTISTEP_KINDS else ''}: "
                "train through a stochastic sampler, e.g. train.sampler: {kind: ddim, eta: 1.0} in the preset (DDPO's)"
            )
        steps = self.timesteps(sampler)
        last = self.transition_std(steps[-1], -1, sampler)
        return steps if last > 0 else trained_timesteps(steps)

    def alpha(self, t: int) -> float:
        return float(self.alphas_cumprod[t]) if t >= 0 else 1.0

    def alpha_prev(self, t: int, t_prev: int, sampler: Sampler | None = None) -> float:
        """alpha_bar of the point a step from t lands on: the next timestep t_prev (-1: the end), or, for
        DDIM and PNDM on their own schedules, t - T // steps as diffusers computes it; past the end, the
        scheduler's final alpha (1, or alphas_cumprod[0] where set_alpha_to_one is false)."""
        sch = self.schedule(sampler)
        prev = t - sch.stride if sch.stride is not None else t_prev
        return self.alpha(prev) if prev >= 0 else sch.final_alpha

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

    def predict(self, x_t, t, cond, uncond=None, guidance: float = 1.0, unet=None) -> torch.Tensor:
        """The network's guided output in the model's own parametrization, what ``transition`` takes:
        epsilon here, a flow model's velocity (``bench.models.flow``)."""
        return self.predict_eps(x_t, t, cond, uncond, guidance, unet)

    def x0_from_prediction(self, x_t, prediction, t) -> torch.Tensor:
        return self.x0_from_eps(x_t, prediction, t)

    def x0_from_eps(self, x_t, eps, t: int) -> torch.Tensor:
        a = self.alpha(t)
        return (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)

    def denoised(self, x_t, x0_hat, t: int, sampler: Sampler | None = None) -> torch.Tensor:
        """The sampler's clean estimate at t: x0_hat, or for LCM the consistency function
        c_skip(t) x_t + c_out(t) x0_hat (LCMScheduler's boundary condition, sigma_data 0.5)."""
        sampler = sampler or self.sampler
        if sampler.kind != "lcm":
            return x0_hat
        scaled = t * self.schedule(sampler).timestep_scaling
        c_skip, c_out = 0.25 / (scaled**2 + 0.25), scaled / math.sqrt(scaled**2 + 0.25)
        return c_out * x0_hat + c_skip * x_t

    def add_noise(self, x0, noise, t: torch.Tensor | int) -> torch.Tensor:
        """Forward process q(x_t | x0) at per-sample timesteps t."""
        a = self.alphas_cumprod.to(x0.device)[torch.as_tensor(t, device=x0.device)].to(x0.dtype)
        a = a.reshape(-1, *([1] * (x0.dim() - 1))) if a.dim() else a
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def training_target(self, x0, noise) -> torch.Tensor:
        """What the network learns to output for x_t = add_noise(x0, noise, t): the noise itself."""
        return noise

    def transition_std(self, t: int, t_prev: int, sampler: Sampler | None = None) -> float:
        """The standard deviation of the step t -> t_prev (0: deterministic)."""
        sampler = sampler or self.sampler
        a_prev = self.alpha_prev(t, t_prev, sampler)
        if sampler.kind == "ddim":
            a_t = self.alpha(t)
            return sampler.eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
        if sampler.kind == "lcm":
            return math.sqrt(1 - a_prev) if t_prev >= 0 else 0.0
        if sampler.kind == "euler_ancestral":
            s_t, s_prev = math.sqrt((1 - self.alpha(t)) / self.alpha(t)), math.sqrt((1 - a_prev) / a_prev)
            return math.sqrt(a_prev) * math.sqrt(s_prev**2 * (s_t**2 - s_prev**2) / s_t**2)
        return 0.0

    def transition(self, x_t, x0_hat, eps_hat, t: int, t_prev: int, sampler: Sampler | None = None) -> Transition:
        """Gaussian p(x_prev | x_t) of the configured sampler from the step's x0 and epsilon estimates;
        t_prev is the next timestep, -1 on the last step."""
        sampler = sampler or self.sampler
        if sampler.kind in MULTISTEP_KINDS:
            raise SamplerError(f"{sampler.scheduler_class} is a multistep sampler (it keeps an epsilon history): its steps are no Gaussian transitions of x alone")
        zero = torch.zeros((), device=x_t.device, dtype=x_t.dtype)
        a_prev = self.alpha_prev(t, t_prev, sampler)
        std = self.transition_std(t, t_prev, sampler)
        if sampler.kind == "lcm":  # the consistency output, forward-noised to t_prev; on the last step the output itself
            out = self.denoised(x_t, x0_hat, t, sampler)
            return Transition(math.sqrt(a_prev) * out if t_prev >= 0 else out, zero + std)
        if sampler.kind in ("ddim", "euler"):
            # Euler in sigma space, x_sigma = x0 + sigma eps, is x_vp = sqrt(a) x_sigma in the UNet's space:
            # x_sigma + eps (sigma_prev - sigma) there is DDIM's deterministic step, ending at sigma 0 (a_prev = 1).
            mean = math.sqrt(a_prev) * x0_hat + math.sqrt(max(1 - a_prev - std**2, 0.0)) * eps_hat
            return Transition(mean, zero + std)
        if sampler.kind == "euler_ancestral":
            # k-diffusion / diffusers EulerAncestralDiscreteScheduler in sigma space, the state here being the
            # UNet's input x_t = x_sigma * sqrt(a_t). The PSO paper prints sigma_up and sigma_down garbled (a
            # negative variance); these are the scheduler's: x_sigma + d (sigma_down - sigma) + sigma_up z.
            s_t, s_prev = math.sqrt((1 - self.alpha(t)) / self.alpha(t)), math.sqrt((1 - a_prev) / a_prev)
            sigma_down = math.sqrt(max(s_prev**2 - s_prev**2 * (s_t**2 - s_prev**2) / s_t**2, 0.0))
            return Transition(math.sqrt(a_prev) * (x0_hat + eps_hat * sigma_down), zero + std)
        raise ValueError(f"unknown sampler kind '{sampler.kind}' (expected {', '.join(SAMPLER_KINDS)})")

    def initial_scale(self, t: int | None = None, sampler: Sampler | None = None) -> float:
        """Scale of the initial noise as UNet input: diffusers' Euler schedulers with trailing (or linspace)
        spacing start from sigma_max * noise in sigma space, sqrt(1 - a_T) * noise here; leading spacing
        and every other scheduler start from unit noise."""
        return self.schedule(sampler).initial_scale

    def sample(
        self,
        prompts: Sequence[str],
        generators: Sequence[torch.Generator],
        sampler: Sampler | None = None,
        trajectory: bool = False,
        unet=None,
        grad_last: int = 0,
        stop_at: int | None = None,
        initial: torch.Tensor | None = None,
    ):
        """Run the sampler; every image draws all its noise from its own generator.

        Noise is drawn per image in a fixed order (initial latent, then one draw
        per stochastic step), so an image does not depend on its batch mates.
        Returns the final latents, and with ``trajectory=True`` also the list
        of states [x_T, ..., x_0] and the Transition of each step.

        Reward back-propagation: with ``grad_last=K`` only the last K steps are differentiated
        (DRaFT-K); with ``stop_at=n`` the clean estimate of step n is returned at once (ReFL).
        ``initial`` is the starting noise, given (DanceGRPO shares one within a prompt's group); the
        generators then draw only the steps' noise.
        """
        sampler = sampler or self.sampler
        shape = self.latent_shape()
        draw = lambda: torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) for g in generators]).to(
            self.device, self.dtype
        )
        cond = self.encode_prompts(prompts, sampler.guidance)
        uncond = self.unconditional(len(prompts)) if self.uses_cfg(sampler.guidance) else None
        steps = self.timesteps(sampler)
        x = (draw() if initial is None else initial.to(self.device, self.dtype)) * self.initial_scale(steps[0], sampler)
        grad = torch.is_grad_enabled()
        differentiate = lambda i: torch.set_grad_enabled(grad and (not grad_last or i >= len(steps) - grad_last))  # noqa: E731
        if sampler.kind in MULTISTEP_KINDS:
            if trajectory:
                raise SamplerError(f"{sampler.scheduler_class} keeps an epsilon history: its trajectory is no MDP (sample with trajectory=False)")
            return self._sample_plms(x, cond, uncond, sampler, unet, differentiate, stop_at)
        states, transitions = [x], []
        for i, t in enumerate(steps):
            t_prev = steps[i + 1] if i + 1 < len(steps) else -1
            with differentiate(i):
                eps = self.predict(x, t, cond, uncond, sampler.guidance, unet=unet)
                x0 = self.x0_from_prediction(x, eps, t)
                if i == stop_at:
                    return self.denoised(x, x0, t, sampler)
                step = self.transition(x, x0, eps, t, t_prev, sampler)
                step.x0_hat = x0
                x = step.mean + step.std * draw() if float(step.std) > 0 else step.mean
            states.append(x)
            transitions.append(step)
        return (x, states, transitions) if trajectory else x

    def _sample_plms(self, x, cond, uncond, sampler: Sampler, unet, differentiate, stop_at):
        """PNDMScheduler with skip_prk_steps (pseudo linear multistep): the first step is evaluated twice
        (an improved-Euler start from the mean of both slopes), each later one combines the last epsilons
        with the Adams-Bashforth weights (3, -1) / 2, (23, -16, 5) / 12, (55, -59, 37, -9) / 24; every
        step moves as deterministic DDIM does. The eps history is PNDM's own: the warm-up's second
        evaluation is not kept."""
        sch = self.schedule(sampler)
        history, x_start = [], None
        weights = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}
        for n, t in enumerate(sch.evaluations):
            i = max(n - 1, 0)  # the step this evaluation belongs to
            with differentiate(i):
                eps = self.predict_eps(x, t, cond, uncond, sampler.guidance, unet=unet)
                if i == stop_at and n != 1:
                    return self.x0_from_eps(x, eps, t)
                if n == 1:  # the warm-up: step 0 again, from its start, with the mean of its two slopes
                    t_from, t_to, e, x_from = t + sch.stride, t, (eps + history[-1]) / 2, x_start
                else:
                    history = history[-3:] + [eps]
                    t_from, t_to, x_from = t, t - sch.stride, x
                    e = sum(w * h for w, h in zip(weights[len(history)], reversed(history)))
                    x_start = x if n == 0 else x_start
                a_to = self.alpha(t_to) if t_to >= 0 else sch.final_alpha
                x = math.sqrt(a_to) * self.x0_from_eps(x_from, e, t_from) + math.sqrt(1 - a_to) * e
        return x

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
