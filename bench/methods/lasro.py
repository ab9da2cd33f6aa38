"""LaSRO (Jia, Nan, Zhao, Liu, CVPR 2025): latent-space surrogate reward optimization of
few-step (<= 2-step) diffusion models with any reward, differentiable or not.

A black-box reward r(c, image) is turned into a differentiable one: a surrogate r_phi(c, x) on
latents, the base UNet's encoder (conv_in, time embedding, down and mid blocks) plus a head of
(4x4 conv stride 2, GroupNorm 32, SiLU) stacks and a linear layer. The paper's equations were lost
from its text; the forms below are rebuilt from its prose (see the LaSRO spec) and every value it
leaves out is an option of ``methods/lasro.yaml``.

* Off-policy samples (Sec. 5.1): for a prompt c, K initial noises x_T^k give the 1-step outputs
  x1_k = f_theta(x_T^k, T, c) and, renoised at t_mid, the 2-step outputs x2_k (Eq. 6).
* Surrogate loss (Eq. 10, Bradley-Terry): within each group the best and the worst of the K under r
  are the pair (x_w, x_l), and ``L_R = l(x1_w, x1_l) + l(x2_w, x2_l)``, with
  ``l = -log sigmoid(r_phi(c, x_w) - r_phi(c, x_l))`` (pairs whose K rewards all tie are dropped).
* Generator loss (Eq. 11-13): ``lambda_1 * mean(-f(r_phi(c, x1))) + lambda_2 * mean(-f(r_phi(c, x2)))
  + reg_weight * L_reg``, where ``f(s) = min((s - mu) / (r_max - mu), C)`` with mu a moving average
  and r_max a moving percentile of the surrogate's scores (App. B).
* Stage 1 (Alg. 1) pre-trains r_phi on samples of the frozen base model; it runs in ``prepare()``,
  so the pre-trained surrogate is prepared data, cached under the hash of everything it depends on
  and shared by fine-tuning runs that differ only in stage-2 settings.
* Stage 2 (Alg. 2) alternates ``gen_steps`` generator steps (the trainer's UNet steps) with
  ``adapt_steps`` surrogate steps on fresh K-sample batches from the current model, taken inside
  ``loss()`` before the generator's forward pass. The generator scores one sample drawn at random
  out of the K for x1 and one for x2 ("line 6 of Alg. 2", reading (i) of the spec).

The surrogate, its optimizer's moments and the normalizer's statistics travel through
``extra_state()`` so a resumed run repeats an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from bench.errors import UsageError
from bench.generate import derived_seed
from bench.method import Method, TrainContext, image_generators
from bench.models.diffusion import Conditioning, DiffusionModel, Sampler
from bench.schema import RewardSpec, Rule, above, at_least, inside, one_of, setting
from bench.weights import base_copy


# ---- the surrogate reward r_phi(c, x) -------------------------------------------------------------
def head_groups(channels: int, groups: int) -> int:
    if channels % groups:
        raise UsageError(f"the surrogate head has {channels} channels, which {groups} GroupNorm groups do not divide: set method.rm_head_groups to a divisor of {channels}")
    return groups


class LatentSurrogate(torch.nn.Module):
    """r_phi(c, x): the encoder half of a UNet (its weights copied, LoRA removed) evaluated at a fixed
    timestep on a clean latent, then ``head_layers`` x (conv 4x4 stride 2, GroupNorm, SiLU), a mean
    over space (the paper names no pooling) and a linear layer to one scalar."""

    def __init__(self, unet: torch.nn.Module, timestep: int, head_layers: int, groups: int, seed: int):
        super().__init__()
        cfg = unet.config
        if cfg.get("addition_embed_type") not in (None, "text_time") or getattr(unet, "encoder_hid_proj", None) is not None or getattr(unet, "class_embedding", None) is not None:
            raise UsageError(f"the LaSRO surrogate supports SD- and SDXL-layout UNets; this one has addition_embed_type={cfg.get('addition_embed_type')!r}")
        take = lambda m: None if m is None else base_copy(m)
        self.conv_in, self.time_proj, self.time_embedding = take(unet.conv_in), take(unet.time_proj), take(unet.time_embedding)
        self.add_time_proj, self.add_embedding = take(getattr(unet, "add_time_proj", None)), take(getattr(unet, "add_embedding", None))
        self.time_embed_act = take(getattr(unet, "time_embed_act", None))
        self.down_blocks, self.mid_block = take(unet.down_blocks), take(unet.mid_block)
        self.timestep = int(timestep)
        channels = int(cfg.block_out_channels[-1])
        with torch.random.fork_rng(devices=[]):  # a seeded head that leaves the global generator alone
            torch.manual_seed(seed)
            layers = []
            for _ in range(head_layers):
                layers += [torch.nn.Conv2d(channels, channels, 4, stride=2, padding=1), torch.nn.GroupNorm(head_groups(channels, groups), channels), torch.nn.SiLU()]
            self.head = torch.nn.Sequential(*layers)
            self.out = torch.nn.Linear(channels, 1)
        dtype = next(unet.parameters()).dtype
        device = next(unet.parameters()).device
        self.head.to(device, dtype)
        self.out.to(device, dtype)
        self.requires_grad_(True).eval()  # "we update all parameters involved in the surrogate model"

    def embedding(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        t = torch.full((x.shape[0],), self.timestep, device=x.device, dtype=torch.long)
        emb = self.time_embedding(self.time_proj(t).to(x.dtype))
        if self.add_embedding is not None:  # SDXL: pooled text and size ids
            time_embeds = self.add_time_proj(cond.time_ids.flatten()).reshape(x.shape[0], -1)
            emb = emb + self.add_embedding(torch.cat([cond.pooled, time_embeds], dim=-1).to(emb.dtype))
        return self.time_embed_act(emb) if self.time_embed_act is not None else emb

    def forward(self, x: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        emb, h = self.embedding(x, cond), self.conv_in(x)
        for block in self.down_blocks:
            if getattr(block, "has_cross_attention", False):
                h, _ = block(hidden_states=h, temb=emb, encoder_hidden_states=cond.hidden)
            else:
                h, _ = block(hidden_states=h, temb=emb)
        if self.mid_block is not None:
            h = self.mid_block(h, emb, encoder_hidden_states=cond.hidden) if getattr(self.mid_block, "has_cross_attention", False) else self.mid_block(h, emb)
        return self.out(self.head(h).mean(dim=(2, 3))).squeeze(1)


def load_backbone(location: str) -> torch.nn.Module:
    """The UNet of a diffusers pipeline (``unet/`` inside it) or a UNet folder, hub id or local path."""
    from pathlib import Path

    from diffusers import UNet2DConditionModel

    from bench.io import hub_offline

    sub = None if (Path(location) / "config.json").exists() else "unet"
    try:
        return UNet2DConditionModel.from_pretrained(location, subfolder=sub, local_files_only=hub_offline())
    except (OSError, ValueError) as err:
        raise UsageError(f"method.rm_backbone={location} has no loadable UNet ({type(err).__name__}): give a local pipeline or UNet folder, or `bench prefetch` it while online") from None


def chunks(n: int, size: int | None) -> list[slice]:
    """Rows 0..n in slices of ``size`` (``gen.batch_size``; None: one slice): no-gradient work at real scale
    (the held-out set, the regularizer's samples, K samples of a batch of prompts) runs a batch at a time."""
    size = max(1, int(size or n or 1))
    return [slice(lo, lo + size) for lo in range(0, n, size)]


def cond_rows(cond: Conditioning, rows: slice) -> Conditioning:
    return Conditioning(*(None if t is None else t[rows] for t in (cond.hidden, cond.pooled, cond.time_ids, cond.guidance_embedding)))


def repeat_cond(cond: Conditioning, k: int) -> Conditioning:
    """Each prompt's conditioning repeated for its k samples (prompt-major order)."""
    rep = lambda t: None if t is None else t.repeat_interleave(k, dim=0)
    return Conditioning(rep(cond.hidden), rep(cond.pooled), rep(cond.time_ids))


# ---- the losses ------------------------------------------------------------------------------------
def bradley_terry(s_w: torch.Tensor, s_l: torch.Tensor) -> torch.Tensor:
    """Per-pair Eq. 10: BCE of sigmoid(r_phi(x_w) - r_phi(x_l)) against 1 = -log sigmoid(s_w - s_l)."""
    return -F.logsigmoid(s_w - s_l)


def winner_loser(rewards: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index of the best and the worst of each row's K rewards, and whether they differ (a row of
    ties carries no preference and is dropped)."""
    w, lo = rewards.argmax(1), rewards.argmin(1)
    return w, lo, rewards.max(1).values > rewards.min(1).values


def pair_loss(s_w: torch.Tensor, s_l: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Mean Bradley-Terry loss over the valid pairs (0 when there are none)."""
    valid = valid.to(s_w.device)
    return (bradley_terry(s_w, s_l) * valid).sum() / valid.sum().clamp_min(1)


class RewardNormalizer:
    """f of Eq. 12-13 (App. B): ``f(s) = min((s - mu) / (r_max - mu), clip)``, mu the moving average and
    r_max the moving ``percentile`` of the surrogate's scores (momentum ``momentum``; the first batch
    sets both). The scores of the batch being normalized update the statistics first. Only the
    maximum is clipped, so scores already above the clip get no gradient (as PPO's clip)."""

    def __init__(self, momentum: float, percentile: float, clip: float, eps: float = 1e-6):
        if not 0.5 < percentile < 1:
            raise UsageError(f"method.norm_percentile={percentile} must lie in (0.5, 1): r_max is an upper percentile, above the mean")
        if not 0 <= momentum < 1:
            raise UsageError(f"method.norm_momentum={momentum} must lie in [0, 1)")
        self.momentum, self.percentile, self.clip, self.eps = momentum, percentile, clip, eps
        self.mu = torch.zeros((), dtype=torch.float64)
        self.r_max = torch.zeros((), dtype=torch.float64)
        self.count = torch.zeros((), dtype=torch.float64)

    def update(self, scores: torch.Tensor) -> None:
        s = scores.detach().double().cpu()
        mean, pct = s.mean(), torch.quantile(s, self.percentile)
        m = self.momentum if self.count > 0 else 0.0
        self.mu = m * self.mu + (1 - m) * mean
        self.r_max = m * self.r_max + (1 - m) * pct
        self.count = self.count + 1

    def __call__(self, s: torch.Tensor) -> torch.Tensor:
        mu, scale = self.mu.to(s), (self.r_max - self.mu).clamp_min(self.eps).to(s)
        return ((s - mu) / scale).clamp(max=self.clip)

    def state(self) -> dict[str, torch.Tensor]:
        return {"norm.mu": self.mu, "norm.r_max": self.r_max, "norm.count": self.count}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mu, self.r_max, self.count = (tensors[k].double() for k in ("norm.mu", "norm.r_max", "norm.count"))


def generator_loss(s1: torch.Tensor, s2: torch.Tensor, f, lambda_1: float, lambda_2: float) -> torch.Tensor:
    """Eq. 11's reward part: lambda_1 * mean(-f(r_phi(c, x1))) + lambda_2 * mean(-f(r_phi(c, x2)))."""
    return lambda_1 * (-f(s1)).mean() + lambda_2 * (-f(s2)).mean()


# ---- the 1-step and 2-step outputs of the few-step sampler -----------------------------------------
def two_step_sampler(model: DiffusionModel, t_mid: int | None) -> Sampler:
    """The model's sampler at 2 steps: its own 2-step schedule (LCM: 999, 499), or (T, t_mid)."""
    if t_mid is None:
        listed = model.sampler.timesteps if model.sampler.timesteps and len(model.sampler.timesteps) == 2 else None
        return dataclasses.replace(model.sampler, steps=2, timesteps=listed)
    first = model.timesteps()[0]
    if not 0 <= int(t_mid) < first:
        raise UsageError(f"method.t_mid={t_mid} must lie in [0, {first}): the second step starts below the first ({first})")
    return dataclasses.replace(model.sampler, steps=2, timesteps=(first, int(t_mid)))


def draw_noise(model: DiffusionModel, gens: list[torch.Generator], sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image's initial latent and the noise injected at t_mid, drawn from its own generator in
    the order ``DiffusionModel.sample`` draws them."""
    shape = model.latent_shape()
    x_T, z = [], []
    for g in gens:
        x_T.append(torch.randn(shape, generator=g, dtype=torch.float64))
        z.append(torch.randn(shape, generator=g, dtype=torch.float64))
    scale = model.initial_scale(model.timesteps(sampler)[0], sampler)
    to = lambda xs: torch.stack(xs).to(model.device, model.dtype)
    return to(x_T) * scale, to(z)


def first_step(model: DiffusionModel, x_T: torch.Tensor, cond: Conditioning, sampler: Sampler) -> tuple[torch.Tensor, torch.Tensor]:
    """x1 = f_theta(x_T, T, c) (the sampler's 1-step output: LCM's boundary condition included) and
    the model's epsilon there."""
    T = model.timesteps(sampler)[0]
    uncond = model.unconditional(x_T.shape[0]) if model.uses_cfg(sampler.guidance) else None
    eps = model.predict_eps(x_T, T, cond, uncond, sampler.guidance)
    return model.denoised(x_T, model.x0_from_eps(x_T, eps, T), T, sampler), eps


def second_step(model: DiffusionModel, x_T, x1, eps, z, cond: Conditioning, sampler: Sampler) -> torch.Tensor:
    """x2 = f_theta(x_{t_mid}, t_mid, c), x_{t_mid} the sampler's transition from x_T (LCM: sqrt(a) x1 +
    sqrt(1 - a) z; Eq. 6); x1 enters through the epsilon it was made from."""
    T, t_mid = model.timesteps(sampler)
    step = model.transition(x_T, model.x0_from_eps(x_T, eps, T), eps, T, t_mid, sampler)
    x_mid = step.mean + step.std * z
    uncond = model.unconditional(x_T.shape[0]) if model.uses_cfg(sampler.guidance) else None
    x0 = model.x0_from_eps(x_mid, model.predict_eps(x_mid, t_mid, cond, uncond, sampler.guidance), t_mid)
    return model.denoised(x_mid, x0, t_mid, sampler)


def source_hash() -> str:
    """This module's source: the cached pre-trained surrogate is redone when the recipe changes."""
    import sys

    return hashlib.sha256(inspect.getsource(sys.modules[__name__]).encode()).hexdigest()[:16]


# ---- the recipe ------------------------------------------------------------------------------------
class LaSRO(Method):
    splits_micro_batches = False  # the loss steps an optimizer of its own

    @dataclass(kw_only=True)
    class Spec(RewardSpec):
        k: int = setting(8, "K off-policy samples per prompt (initial noise varied); not stated in the paper", at_least(2))
        t_mid: Optional[int] = setting(None, "null: the model's own 2-step schedule (LCM and tiny-fewstep: 999 then 499)", at_least(0))
        rm_backbone: Optional[str] = setting(None, "null: the base UNet; or a pipeline/UNet folder or hub id whose UNet initializes the encoder (the paper: segmind/Segmind-Vega)")
        rm_timestep: int = setting(0, "timestep the encoder sees for a clean latent", at_least(0))
        rm_head_layers: int = setting(2, "stacks of (4x4 conv stride 2, GroupNorm, SiLU) before the linear layer", at_least(0))
        rm_head_groups: int = setting(32, "GroupNorm groups of the head", at_least(1))
        rm_lr: float = setting(1.0e-4, "the surrogate's AdamW learning rate, both stages", above(0))
        rm_weight_decay: float = setting(0.0, "the surrogate's AdamW weight decay", at_least(0))
        rm_max_grad_norm: Optional[float] = setting(1.0, "the surrogate's gradient clip (0 or null: none)", at_least(0))
        rm_batch_size: int = setting(8, "prompts per surrogate step (each with K samples)", at_least(1))
        pretrain_steps: int = setting(50, "surrogate pre-training steps (the paper: 30k for ImageReward)", at_least(0))
        heldout_prompts: int = setting(8, "the last N training prompts only measure the surrogate's ranking accuracy", at_least(0))
        eval_every: Optional[int] = setting(25, "held-out accuracy every N pre-training steps (and at the end; 0 or null: at the end)", at_least(0))
        gen_steps: int = setting(1, "N_gen generator steps between surrogate adaptations", at_least(1))
        adapt_steps: int = setting(1, "N_rm surrogate adaptation steps (0: the No Online Adapt ablation)", at_least(0))
        lambda_1: float = setting(1.0, "weight of the 1-step term", at_least(0))
        lambda_2: float = setting(1.0, "weight of the 2-step term", at_least(0))
        detach_first_step: bool = setting(True, "the 2-step term's gradient stops at x1")
        normalize: bool = setting(True, "f of App. B; false: the raw surrogate score -r_phi")
        norm_momentum: float = setting(0.99, "moving average / moving percentile momentum", Rule("in [0, 1)", lambda v: 0 <= v < 1))
        norm_percentile: float = setting(0.9, "r_max is this moving percentile of r_phi (above the mean)", inside(0.5, 1))
        norm_clip: float = setting(1.0, "upper clip of the normalized score (1 = the percentile)", above(0))
        reg: str = setting("reference", "none | reference: the base model's own x0 predictions as the distillation target", one_of("none", "reference"))
        reg_weight: float = setting(1.0, "lambda of the regularizer", at_least(0))
        reg_samples_per_prompt: int = setting(1, "base-model samples per training prompt standing in for the distillation set", at_least(1))

    @property
    def uses_reference(self) -> bool:
        return self.spec.reg == "reference"  # the frozen base model's x0 predictions are the regularizer's targets

    def __init__(self, cfg: dict):
        super().__init__(cfg)
        c = self.spec
        self._loaded = False  # whether the surrogate holds the prepared (pre-trained) weights
        self.k = self.spec.k
        self.normalizer = RewardNormalizer(self.spec.norm_momentum, self.spec.norm_percentile, self.spec.norm_clip)
        self.surrogate: LatentSurrogate | None = None
        self.opt: torch.optim.Optimizer | None = None
        self._pending: dict[str, torch.Tensor] | None = None
        if self.k < 2:
            raise UsageError(f"method.k={self.k}: the best and the worst of K off-policy samples need K >= 2")
        if self.spec.reg not in ("none", "reference"):
            raise UsageError(f"unknown method.reg '{self.spec.reg}': use none or reference")
        for key in ("gen_steps", "adapt_steps", "pretrain_steps", "rm_batch_size"):
            if getattr(c, key) < (0 if key in ("adapt_steps", "pretrain_steps") else 1):
                raise UsageError(f"method.{key}={getattr(c, key)} is out of range")

    # ---- data: the base model's regularization samples and the pre-trained surrogate (Alg. 1) --------
    def data_spec(self) -> dict:
        keys = ("reward", "k", "t_mid", "rm_backbone", "rm_timestep", "rm_head_layers", "rm_head_groups", "rm_lr", "rm_weight_decay", "rm_max_grad_norm",
                "rm_batch_size", "pretrain_steps", "heldout_prompts", "eval_every", "reg", "reg_samples_per_prompt", "seed")
        return {k: self.cfg.get(k) for k in keys} | {"recipe": source_hash()}

    def pools(self, ctx: TrainContext) -> tuple[list[str], list[str]]:
        """(training prompts, held-out prompts): the last ``heldout_prompts`` only measure the surrogate."""
        h = self.spec.heldout_prompts
        if not 0 <= h < len(ctx.prompts):
            raise UsageError(f"method.heldout_prompts={h} leaves no training prompt out of {len(ctx.prompts)}: use fewer")
        return (ctx.prompts[: len(ctx.prompts) - h], ctx.prompts[len(ctx.prompts) - h :])

    def prepare(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        if ctx.data_cfg:
            raise UsageError("LaSRO samples its own data and takes no data=: drop data=")
        if ctx.reward is None:
            raise UsageError("LaSRO needs a reward: set method.reward=NAME (`bench ls metrics`)")
        train, heldout = self.pools(ctx)
        self.build(ctx)
        seed = self.spec.seed
        out: dict[str, torch.Tensor] = {}
        if self.spec.reg == "reference":
            out.update(self.reg_samples(ctx, train))
        held = self.heldout_set(ctx, heldout) if heldout else None
        curve = [[0.0, *self.accuracy(ctx, held)]] if held else []
        every = self.spec.eval_every or 0
        for step in ctx.bar(range(self.spec.pretrain_steps), "pre-train surrogate"):
            g = torch.Generator().manual_seed(derived_seed("lasro-pretrain", step, seed))
            batch = self.off_policy(ctx, train, self.spec.rm_batch_size, g)
            self.surrogate_step(ctx, batch)
            if held and (step + 1 == self.spec.pretrain_steps or (every and (step + 1) % every == 0)):
                curve.append([float(step + 1), *self.accuracy(ctx, held)])
        out |= {f"surrogate.{k}": v.detach().clone() for k, v in self.surrogate.state_dict().items()}
        if curve:
            out["pretrain_accuracy"] = torch.tensor(curve, dtype=torch.float64)
            out["heldout_pairs"] = torch.tensor(held["pairs"], dtype=torch.float64)
        self.opt = None  # stage 2 starts its own optimizer (only the weights are prepared data)
        self._loaded = True
        return out

    def build(self, ctx: TrainContext) -> None:
        """The surrogate, initialized from the base UNet (the frozen copy under full fine-tuning) or,
        with ``rm_backbone``, from another latent model's UNet (the paper: Segmind-Vega)."""
        unet = ctx.base_unet
        if self.spec.rm_backbone:
            unet = load_backbone(self.spec.rm_backbone).to(ctx.device, ctx.model.dtype)
        self.surrogate = LatentSurrogate(unet, self.spec.rm_timestep, self.spec.rm_head_layers, self.spec.rm_head_groups, self.spec.seed)
        checkpointing = next((m for m in ctx.model.unet.modules() if getattr(m, "gradient_checkpointing", False)), None)
        for block in self.surrogate.modules():  # train.gradient_checkpointing holds for the surrogate's blocks too (memory only)
            if hasattr(block, "gradient_checkpointing"):
                block.gradient_checkpointing = checkpointing is not None
                block._gradient_checkpointing_func = getattr(checkpointing, "_gradient_checkpointing_func", None)
        side = ctx.model.latent_shape()[1] // 2 ** sum(1 for b in unet.down_blocks if getattr(b, "downsamplers", None))
        for i in range(self.spec.rm_head_layers):
            side = (side + 2 - 4) // 2 + 1
            if side < 1:
                raise UsageError(f"method.rm_head_layers={self.spec.rm_head_layers} halves the mid-block features to nothing: use at most {i}")
        self.opt = None
        self._loaded = False

    def optimizer(self) -> torch.optim.Optimizer:
        if self.opt is None:
            self.opt = torch.optim.AdamW(self.surrogate.parameters(), lr=self.spec.rm_lr, weight_decay=self.spec.rm_weight_decay)
        return self.opt

    def ensure(self, ctx: TrainContext, data: dict[str, torch.Tensor]) -> None:
        """Build the surrogate from the prepared (pre-trained) weights, then apply a resumed state."""
        if self.surrogate is None:
            self.pools(ctx)
            self.build(ctx)
        if not self._loaded:
            self.surrogate.load_state_dict({k.removeprefix("surrogate."): v for k, v in data.items() if k.startswith("surrogate.")})
            self._loaded = True
        if self._pending is not None:
            self.apply_state(self._pending)
            self._pending = None

    # ---- sampling --------------------------------------------------------------------------------
    @torch.no_grad()
    def off_policy(self, ctx: TrainContext, pool: list[str], n: int, generator: torch.Generator) -> dict:
        """n random prompts, K samples each with their own initial noise (off-policy exploration), the
        1-step and 2-step latents and their black-box rewards, shaped (n, K, ...)."""
        prompts = [pool[int(i)] for i in torch.randint(0, len(pool), (n,), generator=generator)]
        x_T, z = draw_noise(ctx.model, image_generators(n * self.k, generator), two_step_sampler(ctx.model, self.spec.t_mid))
        return self.samples(ctx, prompts, x_T, z)

    @torch.no_grad()
    def samples(self, ctx: TrainContext, prompts: list[str], x_T: torch.Tensor, z: torch.Tensor) -> dict:
        """The K samples of each prompt from given noise (prompt-major rows of ``x_T`` and ``z``), made,
        decoded and scored ``gen.batch_size`` at a time (every sample has its own noise: chunks change none)."""
        model, k, n = ctx.model, self.k, len(prompts)
        sampler = two_step_sampler(model, self.spec.t_mid)
        cond = repeat_cond(model.encode_prompts(prompts), k)
        every = [p for p in prompts for _ in range(k)]
        parts = []
        for rows in chunks(len(every), ctx.sample_batch_size):
            c = cond_rows(cond, rows)
            x1, eps = first_step(model, x_T[rows], c, sampler)
            x2 = second_step(model, x_T[rows], x1, eps, z[rows], c, sampler)
            parts.append((x1, x2, ctx.rewards(x1, every[rows]), ctx.rewards(x2, every[rows])))
        shape = lambda i: torch.cat([part[i] for part in parts]).reshape(n, k, *parts[0][i].shape[1:])
        return {"prompts": prompts, "x1": shape(0), "x2": shape(1), "r1": shape(2), "r2": shape(3)}

    # ---- the surrogate's steps --------------------------------------------------------------------
    def surrogate_loss(self, batch: dict, cond: Conditioning) -> tuple[torch.Tensor, dict]:
        """L_R = l(x1_w, x1_l) + l(x2_w, x2_l) on the best and worst of each prompt's K samples."""
        n = len(batch["prompts"])
        rows = torch.arange(n)
        latents, valid = [], []
        for x, r in ((batch["x1"], batch["r1"]), (batch["x2"], batch["r2"])):
            w, lo, ok = winner_loser(r)
            latents += [x[rows, w], x[rows, lo]]
            valid.append(ok)
        scores = self.surrogate(torch.cat(latents), Conditioning.cat([cond] * 4)).float().split(n)
        l1, l2 = pair_loss(scores[0], scores[1], valid[0]), pair_loss(scores[2], scores[3], valid[1])
        return l1 + l2, {"rm_loss_1": l1.item(), "rm_loss_2": l2.item()}

    def surrogate_step(self, ctx: TrainContext, batch: dict) -> dict:
        self.surrogate.requires_grad_(True)
        opt = self.optimizer()
        with torch.enable_grad():
            loss, logs = self.surrogate_loss(batch, ctx.model.encode_prompts(batch["prompts"]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
        if self.spec.rm_max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.surrogate.parameters(), self.spec.rm_max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        self.surrogate.requires_grad_(False)
        return logs

    # ---- held-out ranking accuracy ------------------------------------------------------------------
    def heldout_set(self, ctx: TrainContext, prompts: list[str]) -> dict:
        seed = self.spec.seed
        gens = [torch.Generator().manual_seed(derived_seed("lasro-heldout", p, i, seed)) for p in range(len(prompts)) for i in range(self.k)]
        held = self.samples(ctx, prompts, *draw_noise(ctx.model, gens, two_step_sampler(ctx.model, self.spec.t_mid)))
        held["pairs"] = sum(int(ranked_pairs(held[r]).sum()) for r in ("r1", "r2"))
        return held

    @torch.no_grad()
    def accuracy(self, ctx: TrainContext, held: dict) -> list[float]:
        """Fraction of held-out pairs (every two of a prompt's K samples whose rewards differ) the
        surrogate orders as the reward does: 1-step group, 2-step group, both."""
        cond = repeat_cond(ctx.model.encode_prompts(held["prompts"]), self.k)
        got = []
        for x, r in (("x1", "r1"), ("x2", "r2")):
            latents = held[x].flatten(0, 1)
            rows = chunks(len(latents), ctx.sample_batch_size)
            s = torch.cat([self.surrogate(latents[c], cond_rows(cond, c)) for c in rows]).double().cpu().reshape(held[r].shape)
            got.append(pair_agreement(s, held[r]))
        correct, total = sum(c for c, _ in got), sum(t for _, t in got)
        return [c / max(t, 1) for c, t in got] + [correct / max(total, 1)]

    def adapts(self, ctx: TrainContext) -> bool:
        """Alg. 2's alternation: after every ``gen_steps`` generator steps, ``adapt_steps`` surrogate steps."""
        return ctx.micro == 0 and ctx.step > 0 and ctx.step % self.spec.gen_steps == 0 and self.spec.adapt_steps > 0

    # ---- stage 2: one generator step, after adapting the surrogate every gen_steps steps -------------
    def loss(self, ctx: TrainContext, data, generator: torch.Generator):
        self.ensure(ctx, data)
        model, n, k = ctx.model, ctx.batch_size, self.k
        train, _ = self.pools(ctx)
        prompts = [train[int(i)] for i in torch.randint(0, len(train), (n,), generator=generator)]
        gens = image_generators(n * k, generator)
        i1, i2 = torch.randint(0, k, (n,), generator=generator), torch.randint(0, k, (n,), generator=generator)
        sampler = two_step_sampler(model, self.spec.t_mid)
        x_T, z = draw_noise(model, gens, sampler)
        logs: dict = {}
        if self.adapts(ctx):
            for a in range(self.spec.adapt_steps):  # the first adaptation step uses this step's K samples, the others fresh ones
                batch = self.samples(ctx, prompts, x_T, z) if a == 0 else self.off_policy(ctx, train, self.spec.rm_batch_size, generator)
                logs |= self.surrogate_step(ctx, batch)
        rows = torch.arange(n) * k
        cond = model.encode_prompts(prompts)
        x1, _ = first_step(model, x_T[rows + i1], cond, sampler)
        x1_b, eps_b = first_step(model, x_T[rows + i2], cond, sampler)  # the 2-step sample's own first step
        if self.spec.detach_first_step:
            x1_b, eps_b = x1_b.detach(), eps_b.detach()
        x2 = second_step(model, x_T[rows + i2], x1_b, eps_b, z[rows + i2], cond, sampler)
        self.surrogate.requires_grad_(False)
        s1, s2 = self.surrogate(x1, cond).float(), self.surrogate(x2, cond).float()
        if self.spec.normalize:
            self.normalizer.update(torch.cat([s1, s2]))
            f = self.normalizer
        else:
            f = lambda s: s
        loss = generator_loss(s1, s2, f, self.spec.lambda_1, self.spec.lambda_2)
        logs |= {"r_phi_1": s1.mean().item(), "r_phi_2": s2.mean().item()}
        if self.spec.reg == "reference" and self.spec.reg_weight:
            reg = reference_regularizer(ctx, data, generator)
            loss = loss + self.spec.reg_weight * reg
            logs["reg"] = reg.item()
        return loss, logs

    # ---- the regularizer's data: samples of the base model ----------------------------------------
    @torch.no_grad()
    def reg_samples(self, ctx: TrainContext, prompts: list[str]) -> dict[str, torch.Tensor]:
        per = self.spec.reg_samples_per_prompt
        seed = self.spec.seed
        index = torch.arange(len(prompts)).repeat_interleave(per)
        gens = [torch.Generator().manual_seed(derived_seed("lasro-reg", int(p), i % per, seed)) for i, p in enumerate(index)]
        every = [prompts[int(p)] for p in index]
        latents = torch.cat([ctx.model.sample(every[rows], gens[rows]).float().cpu() for rows in chunks(len(every), ctx.sample_batch_size)])
        return {"reg_latents": latents, "reg_prompt_index": index}

    # ---- checkpoint state ------------------------------------------------------------------------
    def extra_state(self) -> dict[str, torch.Tensor]:
        if self.surrogate is None:
            return {}
        out = {f"surrogate.{k}": v for k, v in self.surrogate.state_dict().items()}
        if self.opt is not None:
            for idx, state in self.opt.state_dict()["state"].items():
                out |= {f"rm_opt.{idx}.{k}": v for k, v in state.items() if torch.is_tensor(v)}
        return out | self.normalizer.state()

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.surrogate is None:
            self._pending = dict(tensors)  # the surrogate is built at the first loss() (prepared data was cached)
        else:
            self.apply_state(tensors)

    def apply_state(self, tensors: dict[str, torch.Tensor]) -> None:
        self.surrogate.load_state_dict({k.removeprefix("surrogate."): v for k, v in tensors.items() if k.startswith("surrogate.")})
        self._loaded = True
        self.normalizer.load(tensors)
        opt_state: dict[int, dict] = {}
        for key, v in tensors.items():
            if key.startswith("rm_opt."):
                idx, name = key.removeprefix("rm_opt.").split(".", 1)
                opt_state.setdefault(int(idx), {})[name] = v
        self.opt = None
        if opt_state:
            opt = self.optimizer()
            opt.load_state_dict({"state": opt_state, "param_groups": opt.state_dict()["param_groups"]})

    def data_manifest(self, ctx: TrainContext, data) -> dict:
        out = {"source": "online", "pretrain_steps": self.spec.pretrain_steps, "k": self.k}
        if "pretrain_accuracy" in data:
            curve = data["pretrain_accuracy"].tolist()
            out |= {"heldout_pairs": int(data["heldout_pairs"]), "heldout_accuracy_before": curve[0][3], "heldout_accuracy_after": curve[-1][3],
                    "heldout_accuracy_curve": [{"step": int(s), "1-step": a1, "2-step": a2, "both": a} for s, a1, a2, a in curve]}
        return out

    def plan(self, p):
        """``bench plan``: the prepared data (the regularizer's base-model samples, the held-out set, the
        surrogate's pre-training on K off-policy samples per prompt) and one generator step (the 1-step
        and 2-step outputs with gradient, the regularizer, and the surrogate's adaptation samples); every
        no-gradient batch runs ``gen.batch_size`` samples at a time."""
        cfg, n, k, c = self.spec, p.batch_size, self.k, p.cfg
        held = self.spec.heldout_prompts
        train = max((p.prompts or 0) - held, 0)

        def two_step(m):  # x1 and x2 of m samples, each decoded and scored
            work = p.sampling(m, p.sample_batch_size, steps=2, decode=False, rewards=False)
            return work + p.passes(decode=[(b, 2 * calls) for b, calls in p.sampling(m, p.sample_batch_size).decode], rewards=2 * m)

        prepare = two_step(self.spec.rm_batch_size * k).times(self.spec.pretrain_steps) + (two_step(held * k) if held else p.passes())
        if cfg.reg == "reference":
            prepare = prepare + p.sampling(train * self.spec.reg_samples_per_prompt, p.sample_batch_size, decode=False, rewards=False)
        adapt = p.passes()
        if self.spec.adapt_steps:
            adapt = two_step(n * k) + two_step(self.spec.rm_batch_size * k).times(self.spec.adapt_steps - 1)
        generator = p.passes(grad=[(n * c, 3)])  # x1, the 2-step sample's first step (detached after), x2
        if cfg.reg == "reference" and self.spec.reg_weight:
            generator = generator + p.passes(grad=[(n * c, 1)], nograd=[(n * c, 1)])
        parts = ["conv_in", "time_proj", "time_embedding", "add_time_proj", "add_embedding", "down_blocks", "mid_block"]
        surrogate = p.part_parameters(parts, cfg.rm_backbone) if p.part_parameters else 0
        backbone = cfg.rm_backbone
        return p.work(
            generator, before=adapt, prepare=prepare,
            networks=[("surrogate reward (UNet encoder, float32, AdamW)", surrogate, 16)],
            trained_encoders=[
                ("the surrogate's training step", backbone, 4 * self.spec.rm_batch_size, False),  # its own backward, before the generator's passes
                ("the surrogate on the generator's x1 and x2", backbone, 2 * n, True),
            ],
        )

def ranked_pairs(rewards: torch.Tensor) -> torch.Tensor:
    """(n, K, K) mask of the pairs a < b whose rewards differ."""
    k = rewards.shape[1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool), diagonal=1)
    return upper & (rewards[:, :, None] != rewards[:, None, :])


def pair_agreement(scores: torch.Tensor, rewards: torch.Tensor) -> tuple[float, int]:
    """(pairs the scores order as the rewards do, with score ties counted one half; pairs compared)."""
    mask = ranked_pairs(rewards)
    sign_r = torch.sign(rewards[:, :, None] - rewards[:, None, :])
    sign_s = torch.sign(scores[:, :, None] - scores[:, None, :])
    agree = (sign_r == sign_s).double() + 0.5 * (sign_s == 0).double()
    return float(agree[mask].sum()), int(mask.sum())


def reference_regularizer(ctx: TrainContext, data: dict, generator: torch.Generator) -> torch.Tensor:
    """The distillation regularizer with the frozen base model as the consistency target: a base-model
    sample x0 (stand-in for the distillation set), noised to a sampler timestep t, and
    ``mean || f_theta(x_t, t, c) - stopgrad f_base(x_t, t, c) ||^2`` of the x0 predictions. The paper's
    L_LCM needs the teacher (SSD-1B) and its 700k pairs, which this harness does not have."""
    model, n = ctx.model, ctx.batch_size
    idx = torch.randint(0, data["reg_latents"].shape[0], (n,), generator=generator)
    steps = model.timesteps()
    t = steps[int(torch.randint(0, len(steps), (), generator=generator))]
    x0 = data["reg_latents"][idx].to(ctx.device, model.dtype)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float64).to(ctx.device, model.dtype)
    prompts = [ctx.prompts[int(i)] for i in data["reg_prompt_index"][idx]]  # indices into the training pool, a prefix of ctx.prompts
    cond = model.encode_prompts(prompts)
    x_t = model.add_noise(x0, noise, t)
    guidance = model.sampler.guidance
    uncond = model.unconditional(n) if model.uses_cfg(guidance) else None
    f_theta = model.x0_from_eps(x_t, model.predict_eps(x_t, t, cond, uncond, guidance), t)
    with torch.no_grad(), ctx.reference():
        f_base = model.x0_from_eps(x_t, model.predict_eps(x_t, t, cond, uncond, guidance), t)
    return F.mse_loss(f_theta.float(), f_base.float())
