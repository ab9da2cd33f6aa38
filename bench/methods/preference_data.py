"""Preference data and the shared forward pass of the offline pair methods.

Three sources of (preferred, dispreferred) pairs, one interface (``sample``):

* self-generated: K samples per training prompt from the base model, the best and the worst
  under a reward become a pair (no download; cached by the trainer like any prepared data);
* given target images (a DreamBench subject, a style set): each image against a sample of the
  base model for its caption, the pre-sampled reference set of offline PSO's style transfer;
* a dataset in the Pick-a-Pic v2 schema (``data=pickapic-v2`` or ``data.source=FILE.parquet``),
  streamed in a fixed order and VAE-encoded on the fly, as the Salesforce and DSPO scripts do.

``predict`` is the one noising-and-denoising pass every method here shares: the model's
and (optionally) the frozen reference's epsilon predictions for the same noisy latents.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.errors import UsageError
from bench.generate import image_seed
from bench.method import Method, TrainContext
from bench.schema import MethodSpec, RewardSpec, at_least, between, setting


# ---- self-generated pairs -------------------------------------------------------------------
@torch.no_grad()
def sample_candidates(ctx: TrainContext, k: int, seed: int, desc: str):
    """Yield (prompt index, latents (K, C, h, w), rewards (K,)) for every training prompt.

    Seeds depend only on (prompt index, sample index, seed), like evaluation images.
    """
    for p, prompt in enumerate(ctx.bar(ctx.prompts, desc)):
        gens = [torch.Generator().manual_seed(image_seed("train-candidates", p, i, seed)) for i in range(k)]
        latents = ctx.model.sample([prompt] * k, gens)
        yield p, latents.float().cpu(), ctx.rewards(latents, [prompt] * k)


def best_worst_pairs(ctx: TrainContext, k: int, seed: int, drop_ties: bool = True) -> dict[str, torch.Tensor]:
    """The best and worst of K samples per prompt as a (preferred, dispreferred) pair.

    A prompt whose K rewards are all equal gives a tie; ties are dropped by default (as the
    Salesforce Diffusion-DPO code drops Pick-a-Pic ties) and counted in ``ties_dropped``.
    """
    if k == 1 and drop_ties:  # one sample per prompt has nothing to compare it with: every "pair" is a tie (said before sampling)
        raise UsageError("method.samples_per_prompt=1 draws one sample per prompt, so every pair is a tie and drop_ties drops it: set method.drop_ties=false to train on every sample")
    win, lose, index, r_win, r_lose, ties = [], [], [], [], [], 0
    for p, latents, rewards in sample_candidates(ctx, k, seed, "preference pairs: best and worst of K"):
        best, worst = int(torch.argmax(rewards)), int(torch.argmin(rewards))
        if rewards[best] == rewards[worst]:
            ties += 1
            if drop_ties:
                continue
        win.append(latents[best])
        lose.append(latents[worst])
        index.append(p)
        r_win.append(rewards[best])
        r_lose.append(rewards[worst])
    if not index:
        raise UsageError("every self-generated pair is a tie; raise samples_per_prompt or use another reward")
    return {
        "latents_w": torch.stack(win),
        "latents_l": torch.stack(lose),
        "prompt_index": torch.tensor(index),
        "reward_w": torch.stack(r_win),
        "reward_l": torch.stack(r_lose),
        "ties_dropped": torch.tensor(ties if drop_ties else 0),
    }


@torch.no_grad()
def seeded_samples(ctx: TrainContext, prompts: list[str], tag: str, seed: int, desc: str) -> torch.Tensor:
    """Base-model latents for ``prompts``, sample i seeded by (tag, i, seed), in training-size batches."""
    out = []
    for start in ctx.bar(range(0, len(prompts), ctx.batch_size), desc):
        idx = range(start, min(len(prompts), start + ctx.batch_size))
        gens = [torch.Generator().manual_seed(image_seed(tag, i, 0, seed)) for i in idx]
        out.append(ctx.model.sample([prompts[i] for i in idx], gens).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def image_pairs(ctx: TrainContext, seed: int, references: bool = True) -> dict[str, torch.Tensor]:
    """The target images' latents as the preferred side and, with ``references``, one base-model
    sample per image for its caption as the dispreferred side (seeded by image index)."""
    images, model, n = ctx.images, ctx.model, len(ctx.images.captions)
    win = [model.encode(images.pixels[s : s + ctx.batch_size].to(ctx.device, model.dtype) / 255).float().cpu() for s in range(0, n, ctx.batch_size)]
    data = {"latents_w": torch.cat(win), "prompt_index": torch.arange(n), "ties_dropped": torch.tensor(0)}
    if references:
        data["latents_l"] = seeded_samples(ctx, images.captions, "train-references", seed, "references: base-model samples of the captions")
    return data


# ---- one micro-batch of pairs, from any source ----------------------------------------------
@dataclass
class Pairs:
    x_w: torch.Tensor  # preferred latents (B, C, h, w)
    x_l: torch.Tensor | None  # dispreferred latents (None: targets only)
    prompts: list[str]
    reward_w: torch.Tensor | None = None  # the rewards a self-generated pair was ranked by (None: a dataset's or given images)
    reward_l: torch.Tensor | None = None


class MemoryPairs:
    """Pairs held as tensors; each micro-batch is drawn at random from the trainer's generator."""

    def __init__(self, data: dict[str, torch.Tensor], prompts: list[str]):
        self.data, self.prompts = data, prompts

    def sample(self, ctx: TrainContext, generator: torch.Generator) -> Pairs:
        idx = torch.randint(0, self.data["latents_w"].shape[0], (ctx.batch_size,), generator=generator)
        to = dict(device=ctx.device, dtype=ctx.model.dtype)
        prompts = [self.prompts[int(i)] for i in self.data["prompt_index"][idx]]
        x_l = self.data["latents_l"][idx].to(**to) if "latents_l" in self.data else None
        rewards = [self.data[k][idx] if k in self.data else None for k in ("reward_w", "reward_l")]
        return Pairs(self.data["latents_w"][idx].to(**to), x_l, prompts, *rewards)

    def manifest(self) -> dict:
        return {"source": "self-generated", "pairs": int(self.data["latents_w"].shape[0]), "ties_dropped": int(self.data["ties_dropped"])}


class StreamedPairs:
    """Pairs read from a dataset in stream order: micro-batch (step, micro) is the next block of
    ``batch_size`` pairs, so a resumed run reads exactly the pairs an uninterrupted one would."""

    def __init__(self, data_cfg: dict):
        from bench.pairs import PairStream

        self.stream = PairStream(data_cfg)
        self.hflip = bool(data_cfg.get("hflip", False))

    @torch.no_grad()
    def sample(self, ctx: TrainContext, generator: torch.Generator) -> Pairs:
        from bench.pairs import preprocess

        start = (ctx.step * ctx.grad_accum + ctx.micro) * ctx.batch_size
        rows = self.stream.take(start, ctx.batch_size)
        flips = torch.rand(len(rows), generator=generator) < 0.5 if self.hflip else torch.zeros(len(rows), dtype=torch.bool)
        res = ctx.model.resolution
        pix_w = torch.stack([preprocess(w, res, bool(f)) for (_, w, _), f in zip(rows, flips)])
        pix_l = torch.stack([preprocess(l, res, bool(f)) for (_, _, l), f in zip(rows, flips)])
        latents = ctx.model.encode(torch.cat([pix_w, pix_l]).add(1).div(2).to(ctx.device, ctx.model.dtype))
        x_w, x_l = latents.chunk(2)
        return Pairs(x_w, x_l, [caption for caption, _, _ in rows])

    def manifest(self) -> dict:
        return self.stream.stats.as_dict()


# ---- the shared forward pass ----------------------------------------------------------------
@dataclass
class Predictions:
    """Predictions for a batch of noisy latents and what they should be, ``target``: the noise of an
    epsilon model, noise - x0 for a flow model's velocity (its ``training_target``); ``ref`` is None when not asked for."""

    target: torch.Tensor
    pred: torch.Tensor
    ref: torch.Tensor | None
    t: torch.Tensor

    def errors(self, reduction: str = "mean") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-sample squared errors of the model and the reference: meaned over latent elements
        (as both public DPO codebases) or summed (the papers' ||.||^2), which rescales beta."""
        if reduction not in ("mean", "sum"):
            raise ValueError(f"error reduction must be mean or sum, not {reduction!r}")
        err = lambda p: getattr(((at_least_fp32(p) - at_least_fp32(self.target)) ** 2).flatten(1), reduction)(1)
        return err(self.pred), (err(self.ref) if self.ref is not None else None)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Losses in float32 under half-precision autocast (as the DPO codebases), float64 kept."""
    return x if x.dtype == torch.float64 else x.float()


def drop_prompts(prompts: list[str], p: float, generator: torch.Generator) -> list[str]:
    """Replace each prompt by "" with probability p (the 0.2 of the Salesforce/DSPO scripts)."""
    if p <= 0:
        return list(prompts)
    keep = torch.rand(len(prompts), generator=generator) >= p
    return [c if k else "" for c, k in zip(prompts, keep.tolist())]


def uniform_timesteps(ctx: TrainContext, n: int, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, ctx.model.num_train_timesteps, (n,), generator=generator)


def logit_normal_timesteps(ctx: TrainContext, n: int, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """diffusers' ``compute_density_for_timestep_sampling(weighting_scheme="logit_normal")``: u =
    sigmoid(N(mean, std)), read at index int(u T) of the model's training timesteps (flow_grpo's DPO)."""
    u = torch.sigmoid(torch.normal(mean=mean, std=std, size=(n,), generator=generator))  # float32, as there
    grid = ctx.model.training_timesteps()
    return grid[(u * len(grid)).long().clamp_max(len(grid) - 1)]


def draw_noise(shape, generator: torch.Generator, ctx: TrainContext) -> torch.Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(ctx.device, ctx.model.dtype)


def predict(ctx: TrainContext, x0: torch.Tensor, prompts: list[str], t: torch.Tensor, noise: torch.Tensor, reference: bool = True) -> Predictions:
    """Noise x0 to timesteps t and predict the noise with the model (and the frozen reference)."""
    model = ctx.model
    t = t.to(ctx.device)
    cond = model.encode_prompts(prompts)
    x_t = model.add_noise(x0, noise, t)
    pred = model.denoise(x_t, t, cond)
    ref = None
    if reference:
        with torch.no_grad(), ctx.reference():
            ref = model.denoise(x_t, t, cond)
    return Predictions(model.training_target(x0, noise), pred, ref, t)


def predict_pairs(ctx: TrainContext, pairs: Pairs, generator: torch.Generator, t=None, share_noise=True, reference=True, timesteps: str = "uniform") -> tuple[Predictions, Predictions]:
    """Predictions for the preferred and the dispreferred half of a batch in one forward pass.

    One timestep per pair (uniform over [0, T), or ``timesteps: logit_normal``, unless ``t`` is given)
    for both images, and by default one noise draw for both, as the Salesforce Diffusion-DPO and DSPO
    scripts do.
    """
    n = pairs.x_w.shape[0]
    if t is None:
        t = logit_normal_timesteps(ctx, n, generator) if timesteps == "logit_normal" else uniform_timesteps(ctx, n, generator)
    noise_w = draw_noise(pairs.x_w.shape, generator, ctx)
    noise_l = noise_w if share_noise else draw_noise(pairs.x_l.shape, generator, ctx)
    both = predict(ctx, torch.cat([pairs.x_w, pairs.x_l]), pairs.prompts * 2, torch.cat([t, t]), torch.cat([noise_w, noise_l]), reference)
    half = lambda x: x.chunk(2) if x is not None else (None, None)
    (nw, nl), (pw, pl), (rw, rl), (tw, tl) = half(both.target), half(both.pred), half(both.ref), half(both.t)
    return Predictions(nw, pw, rw, tw), Predictions(nl, pl, rl, tl)


# ---- the base class of the offline pair methods ---------------------------------------------
@dataclass(kw_only=True)
class DropoutSpec(MethodSpec):
    """Training pairs (or target images) with their prompts dropped at a rate."""

    prompt_dropout: float = setting(0.0, "probability of training a pair with the empty prompt (the Salesforce scripts: 0.2)", between(0, 1))


def pair_dataset(ctx: TrainContext) -> dict | None:
    """The run's ``data=`` section where it is a pair dataset (``kind: pairs``, the default), else None
    (no section, or captioned images, which arrive as ``ctx.images``)."""
    data = ctx.data_cfg
    return data if data and data.get("kind", "pairs") == "pairs" else None


@dataclass(kw_only=True)
class PairSpec(DropoutSpec, RewardSpec):
    """The pair-data settings every offline pair recipe shares: best/worst-of-K self-generated pairs."""

    samples_per_prompt: int = setting(8, "pairs: the best and worst of K self-generated samples per training prompt (1: with drop_ties false, every sample)", at_least(1))
    drop_ties: bool = setting(True, "a prompt whose K samples all score the same gives no pair (Salesforce drops tied pairs)")


class PairMethod(Method):
    """An offline method trained on (preferred, dispreferred) pairs: self-generated best/worst-of-K
    pairs by default, target images against base-model samples when the run has target images,
    or a pair dataset when the config has a ``data`` section of the pair kind."""

    image_references = True  # False: a method that only needs the targets of given images
    shares_pairs = True  # False: a recipe whose prepare() makes other data than best_worst_pairs
    Spec = PairSpec

    def data_spec(self) -> dict:
        return self.as_composed("samples_per_prompt", "reward", "seed", "drop_ties")

    def cached_data_spec(self, ctx: TrainContext) -> dict:
        return {} if pair_dataset(ctx) else self.data_spec()  # a pair dataset streams as training goes

    def shared_data(self, ctx: TrainContext) -> str | None:
        """Self-generated pairs depend on this module's code and the data spec alone: every pair recipe reads them."""
        return __name__ if self.shares_pairs and not pair_dataset(ctx) and ctx.images is None else None

    def prepare(self, ctx: TrainContext):
        if pair_dataset(ctx):
            return StreamedPairs(pair_dataset(ctx))
        if ctx.images is not None:
            return image_pairs(ctx, self.spec.seed, self.image_references)
        return best_worst_pairs(ctx, self.spec.samples_per_prompt, self.spec.seed, self.spec.drop_ties)

    def source(self, ctx: TrainContext, data) -> MemoryPairs | StreamedPairs:
        return data if isinstance(data, StreamedPairs) else MemoryPairs(data, ctx.prompts)

    def pairs(self, ctx: TrainContext, data, generator: torch.Generator) -> Pairs:
        """The next micro-batch of pairs, prompts dropped to "" at the configured rate."""
        pairs = self.source(ctx, data).sample(ctx, generator)
        pairs.prompts = drop_prompts(pairs.prompts, self.spec.prompt_dropout, generator)
        return pairs

    def data_manifest(self, ctx: TrainContext, data) -> dict:
        if ctx.images is not None and not isinstance(data, StreamedPairs):
            return {**ctx.images.manifest(), "base_references": "latents_l" in data}
        return self.source(ctx, data).manifest()

    def plan(self, p):
        """``bench plan``: the data made before training and one micro-batch (``plan_micro``)."""
        work = self.plan_micro(p)
        if p.dataset:  # streamed pairs: both images of every pair VAE-encoded in each micro-batch, first
            work.before = p.passes(encode=[(2 * p.batch_size, 1)])
        else:
            work.prepare = self.plan_prepare(p)
        return work

    def plan_prepare(self, p):
        """Self-generated pairs: K samples of each training prompt in one batch, decoded and scored; target
        images: encoded a micro-batch at a time, with one base-model sample per image as its reference."""
        n = p.batch_size
        if p.images is not None:
            encode = p.passes(encode=[(n, -(-p.images // n))])
            return encode + p.sampling(p.images, n, decode=False, rewards=False) if self.image_references else encode
        k = self.spec.samples_per_prompt
        return p.sampling(k, k).times(p.prompts or 0)

    def plan_micro(self, p):
        return p.work(p.passes())
