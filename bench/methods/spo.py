"""SPO: step-by-step preference optimization (Liang et al., CVPR 2025; code RockeyCoss/SPO at 27a8642).

Training alternates rounds of sampling with step-wise resampling and fitting, as
``train_scripts/train_spo.py`` with ``spo/custom_diffusers/multi_sample_pipeline.py`` (SD1.5) and
``multi_sample_pipeline_sdxl.py`` (SDXL) do:

1. **Sampling a round** (no gradient, the current weights). For each prompt of the round, the
   sampler runs its first ``divert_start_step`` transitions one sample at a time. From then on, at
   each *branch* transition the shared state x_t gives ``num_candidates`` = K candidates
   x_{t-1}^1..K (K draws of the same Gaussian). Each candidate continues alone for
   ``num_inner_step`` more transitions (0 for SD1.5: every transition branches; 3 for SDXL). The
   chains are then scored by the preference model on the x0 the model predicts from them, decoded,
   at their current timestep (``preference_model_fn(decode(x0_hat), t)``). The best and the worst
   chain form a pair for every transition of the segment, kept only when
   softmax(best, worst)[0] - softmax[1] > ``threshold`` (``preference_score_compare``). Then one
   chain, drawn uniformly at random (not the best), continues: its state and its x0 / eps
   prediction start the next branch. This is the step-wise resampler: the next pair again differs
   only in that step's noise.
2. **Fitting**. The round's kept pairs are shuffled and walked in batches. With
   r = clip(p_theta(x_{t-1} | x_t) / p_ref(x_{t-1} | x_t), 1 - eps, 1 + eps) for the win (w) and the
   lose (l) transition of a pair,

       L = -log sigmoid( beta * log r_w - beta * log r_l ),   averaged over the batch

   The log-probabilities are the sampler's Gaussian log-densities with classifier-free guidance at
   the sampling scale, averaged over latent elements (``ddim_step_with_logprob``'s
   ``log_prob.mean(dim=(1, 2, 3))``; ``logprob_reduction: sum`` is the harness's other convention).
   The reference is the model with its LoRA adapters off (the code's frozen copy of the UNet).

The preference model is the reward: with SPO's step-aware preference model (``reward: spm-sd15`` /
``spm-sdxl``, ``bench/metrics/step_aware.py``) a chain is scored on its x0 prediction decoded
unclamped, at its timestep, as the official pipelines do; any other reward (brightness on the micro
suite) scores the same decoded x0 prediction as an image, ignoring the timestep.

Where this harness necessarily differs (each also in ``methods/spo*.yaml``):

* The last transition of every sampler here returns x0_hat deterministically, so it is not trained.
  The official DDIM's last step (t = 1 -> alpha_0) is stochastic and its K clean outputs are scored at
  t = 0; here the last segment ends one transition earlier and its chains are scored on their x0
  prediction at the last timestep (which is exactly the image the sampler returns).
* A round's kept pairs vary in number; the official loop trains ceil(pairs / batch) batches on them.
  Here a round gets ceil(pairs / (batch_size x grad_accum)) optimizer steps (0 for a round with no
  pair, as the code skips it), and the last batch is filled up by wrapping around to the start of
  the round's shuffled order (the code's last batch is smaller; with 4 GPUs it also drops the
  remainder of pairs / 4). ``train.steps`` counts optimizer steps, not epochs: ``train.json``
  reports the rounds, pairs and epochs over the prompts that a run covered.
* Prompts are taken in a fresh random order each epoch, ``prompts_per_round`` at a time (the
  code's shuffled DataLoader of ``sample_batch_size`` per GPU).

Rounds are saved next to the checkpoints with an index of their pair counts, so a resumed run
trains on exactly what the interrupted one sampled; a round is a pure function of the weights at
its start and the seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from bench.errors import TrainingError, UsageError
from bench.generate import image_seed
from bench.method import Method, RoundStore, TrainContext
from bench.methods.d3po import d3po_loss
from bench.methods.online import LogProbSpec, OnlineSpec, unit_log_probs
from bench.models.diffusion import Conditioning
from bench.ranks import current as current_ranks
from bench.schema import MISSING, above, at_least, inside, setting


# ---- the loss -----------------------------------------------------------------------------------
def spo_loss(logratio_win: torch.Tensor, logratio_lose: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    """Per-pair SPO loss from log p_theta - log p_ref of the win and the lose transition: D3PO's
    clipped-ratio loss with the win transition preferred."""
    return d3po_loss(logratio_win, logratio_lose, torch.ones_like(logratio_win), beta, eps)


# ---- the pair selection -------------------------------------------------------------------------
def best_and_worst(scores: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, B) scores of K candidates for B prompts -> (2, B) indices of the best and the worst, and
    which prompts keep their pair: softmax over (best, worst) differs by more than ``threshold``."""
    ranked, order = torch.sort(scores, dim=0, descending=True)
    prob = torch.softmax(ranked[[0, -1]], dim=0)
    return order[[0, -1]], prob[0] - prob[1] > threshold


# ---- step-wise resampling -----------------------------------------------------------------------
def draw(gens: list[torch.Generator], k: int, shape, like: torch.Tensor) -> torch.Tensor:
    """(k, B, *shape) standard normal noise; prompt b draws its k samples from its own generator."""
    noise = [torch.stack([torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(k)]) for g in gens]
    return torch.stack(noise, 1).to(like.device, like.dtype)


@torch.no_grad()
def stepwise_resample(model, prompts: list[str], gens: list[torch.Generator], score, k: int, divert: int, inner: int, threshold: float) -> dict:
    """Sample ``prompts`` with step-wise resampling; ``score(x0_latents, prompts, t)`` scores decoded
    x0 predictions. Returns the kept pairs (states as x_t and x_{t-1} of the win and the lose chain,
    the transition index, the prompt's position) and every candidate score."""
    steps, sampler = model.timesteps(), model.sampler
    last = len(model.stochastic_timesteps()) - 1  # the last stochastic transition (the final one returns x0_hat)
    if not 0 <= divert <= last:
        raise UsageError(f"spo: divert_start_step={divert} leaves no stochastic transition of the {len(steps)}-step sampler to train (at most {last})")
    b, shape = len(prompts), model.latent_shape()
    guidance = sampler.guidance
    cond = model.encode_prompts(prompts)
    uncond = model.unconditional(b) if model.uses_cfg(guidance) else None
    cond_k = Conditioning.cat([cond] * k)
    uncond_k = Conditioning.cat([uncond] * k) if uncond is not None else None

    def predict(x, t, c, u):
        eps = model.predict_eps(x, t, c, u, guidance)
        return model.x0_from_eps(x, eps, t), eps

    x = draw(gens, 1, shape, torch.empty((), device=model.device, dtype=model.dtype))[0] * model.initial_scale(steps[0], sampler)
    for i in range(divert):  # the shared prefix: one sample per prompt
        x0, eps = predict(x, steps[i], cond, uncond)
        step = model.transition(x, x0, eps, steps[i], steps[i + 1])
        x = step.mean + step.std * draw(gens, 1, shape, x)[0]
    x0, eps = predict(x, steps[divert], cond, uncond)
    kept = {"x_t_win": [], "x_prev_win": [], "x_t_lose": [], "x_prev_lose": [], "step": [], "prompt": []}
    all_scores, i, rows = [], divert, torch.arange(b)
    while i <= last:
        end = min(i + inner, last)
        step = model.transition(x, x0, eps, steps[i], steps[i + 1])  # branch: K candidates from the shared x_t
        chains = step.mean + step.std * draw(gens, k, shape, x)
        segment = [(i, x.expand(k, *x.shape), chains)]
        for j in range(i + 1, end + 1):  # inner transitions: each chain alone
            flat = chains.flatten(0, 1)
            x0c, epsc = predict(flat, steps[j], cond_k, uncond_k)
            step = model.transition(flat, x0c, epsc, steps[j], steps[j + 1])
            nxt = step.mean.view_as(chains) + step.std * draw(gens, k, shape, x)
            segment.append((j, chains, nxt))
            chains = nxt
        t = steps[end + 1]
        x0c, epsc = predict(chains.flatten(0, 1), t, cond_k, uncond_k)
        scores = score(x0c, list(prompts) * k, t).view(k, b)
        all_scores.append(scores)
        (win, lose), keep = best_and_worst(scores, threshold)
        for j, cur, nxt in segment:
            kept["x_t_win"].append(cur[win, rows][keep])
            kept["x_prev_win"].append(nxt[win, rows][keep])
            kept["x_t_lose"].append(cur[lose, rows][keep])
            kept["x_prev_lose"].append(nxt[lose, rows][keep])
            kept["step"].append(torch.full((int(keep.sum()),), j))
            kept["prompt"].append(rows[keep])
        i = end + 1
        if i <= last:  # the resampler: a uniformly random chain starts the next branch
            pick = torch.cat([torch.randint(0, k, (1,), generator=g) for g in gens])
            x = chains[pick, rows]
            x0, eps = x0c.view_as(chains)[pick, rows], epsc.view_as(chains)[pick, rows]
    out = {key: torch.cat(v) for key, v in kept.items()}
    out["scores"] = torch.stack(all_scores, 1)  # (K, segments, B)
    return out


# ---- rounds of variable length ------------------------------------------------------------------
class StepwiseRounds:
    """Rounds of ``prompts_per_round`` prompts, each kept pair a training unit; a round of V pairs
    takes ceil(V / (batch_size x grad_accum)) x ``epochs_per_round`` optimizer steps. The pair counts
    of every round sampled so far are the store's index (``{"pairs": [...]}``); after a checkpoint,
    the rounds that end before it go."""

    def __init__(self, spec, name: str, ctx: TrainContext | None = None):
        self.spec, self.name = spec, name
        self.prompts_per_round = spec.prompts_per_round
        self.epochs = spec.epochs_per_round
        self.seed = spec.seed
        self.ctx = ctx  # the training whose store and batch geometry the rounds use
        self._cache: tuple[int, dict] | None = None

    def store(self, ctx: TrainContext) -> RoundStore:
        return ctx.rounds

    def counts(self, ctx: TrainContext) -> list[int]:
        return (self.store(ctx).read_index() or {}).get("pairs", [])

    def steps_of(self, pairs: int, ctx: TrainContext) -> int:
        return math.ceil(pairs / (ctx.batch_size * ctx.grad_accum)) * self.epochs

    def prompt_indices(self, n: int, r: int) -> torch.Tensor:
        """Round r's prompts: each epoch a fresh permutation of the n prompts, taken in slices."""
        per_epoch = math.ceil(n / self.prompts_per_round)
        epoch, k = divmod(r, per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(image_seed(f"{self.name}-prompts", epoch, 0, self.seed)))
        return perm[k * self.prompts_per_round : (k + 1) * self.prompts_per_round]

    def locate(self, ctx: TrainContext, sample) -> tuple[int, int, dict]:
        """The round the current step trains on, the step it started at, and its data; sampled with
        the current weights when this step starts it."""
        counts, start, r = self.counts(ctx), 0, 0
        while True:
            if r == len(counts):
                if ctx.step != start:
                    raise TrainingError(f"spo: round {r} should start at step {start}, not {ctx.step}; the rounds index in {self.store(ctx).folder} is inconsistent: delete the checkpoint folder and retrain")
                self.save(ctx, r, sample(r), counts)
                counts = self.counts(ctx)
                empty = next((q for q, c in enumerate(reversed(counts)) if c), len(counts))  # rounds in a row with no pair
                if empty >= math.ceil(len(ctx.prompts) / self.prompts_per_round):
                    raise TrainingError(
                        f"spo: no pair passed method.threshold={self.spec.threshold} in {empty} rounds in a row (a whole epoch of prompts): "
                        "the preference model's scores differ too little for it; lower method.threshold"
                    )
            n = self.steps_of(counts[r], ctx)
            if ctx.step < start + n:
                return r, start, self.load(ctx, r)
            start, r = start + n, r + 1

    def save(self, ctx: TrainContext, r: int, data: dict, counts: list[int]) -> None:
        self.store(ctx).save(r, data)
        self.store(ctx).write_index({"pairs": counts + [int(data["step"].numel())]})

    def checkpointed(self, step: int) -> None:
        """A resume restarts at ``step`` at the earliest: the rounds that end at or before it go."""
        first_needed, end = 0, 0
        for q, v in enumerate(self.counts(self.ctx)):
            end += self.steps_of(v, self.ctx)
            if end > step:
                break
            first_needed = q + 1
        self.store(self.ctx).drop_before(first_needed)

    def load(self, ctx: TrainContext, r: int) -> dict:
        if self._cache is None or self._cache[0] != r:
            data = self.store(ctx).load(r)
            if data is None:
                raise TrainingError(f"spo: round {r} is missing from {self.store(ctx).folder}; delete the checkpoint folder and retrain")
            self._cache = (r, data)
        return self._cache[1]

    def order(self, r: int, epoch: int, count: int) -> torch.Tensor:
        return torch.randperm(count, generator=torch.Generator().manual_seed(image_seed(f"{self.name}-order", r, epoch, self.seed)))


class SPO(Method):
    name = "spo"

    @dataclass(kw_only=True)
    class Spec(OnlineSpec, LogProbSpec):
        beta: float = setting(MISSING, "official train.beta (the code's coefficient of the KL divergence)", above(0))
        eps: float = setting(0.1, "likelihood ratios clipped to [1 - eps, 1 + eps] (official train.eps)", inside(0, 1))
        num_candidates: int = setting(4, "K candidates from each shared state (official: 4 SD1.5, 2 SDXL)", at_least(2))
        divert_start_step: int = setting(0, "transitions before the first branch (official 4 of 20 DDIM steps)", at_least(0))
        num_inner_step: int = setting(0, "transitions each candidate runs alone before the next scoring (official: 0 SD1.5, 3 SDXL)", at_least(0))
        threshold: float = setting(0.0, "keep a pair when softmax(best, worst) differs by more than this (official 0.3 / 0.4)", at_least(0))
        prompts_per_round: int = setting(8, "prompts sampled per round (official: 40 SD1.5, 8 SDXL)", at_least(1))
        sample_batch_size: Optional[int] = setting(None, "prompts per sampling pass (null: the whole round); images do not depend on it", at_least(1))

    def rounds(self, ctx: TrainContext | None = None) -> StepwiseRounds:
        """The rounds; with ``ctx``, of that training (its store, its steps per round)."""
        return StepwiseRounds(self.spec, self.name, ctx)

    def prepare(self, ctx: TrainContext) -> dict:
        last = len(ctx.model.stochastic_timesteps()) - 1
        if self.spec.divert_start_step > last:
            raise UsageError(f"spo: divert_start_step={self.spec.divert_start_step} but the training sampler has stochastic transitions 0..{last}: lower it or set train.sampler.steps")
        if self.spec.logprob_reduction not in ("mean", "sum"):
            raise UsageError(f"spo: logprob_reduction={self.spec.logprob_reduction}: use mean (the official code) or sum")
        self._rounds = self.rounds(ctx)
        return self._rounds

    # ---- sampling ------------------------------------------------------------------------------
    def score_fn(self, ctx: TrainContext):
        """How chains are scored: the step-aware model on the unclamped decoded x0 at t, or the reward
        of the decoded x0 (as evaluation sees it) for a reward without timesteps."""
        reward = ctx.reward
        if reward is None:
            raise UsageError("spo needs a preference model: set method.reward=NAME (spm-sd15, spm-sdxl, or a suite metric)")
        if hasattr(reward, "score_at"):
            model = ctx.model

            def step_aware(latents, prompts, t):
                images = model.vae.decode(latents.to(model.vae.dtype) / model.scaling_factor).sample
                return reward.score_at(images, prompts, torch.full((len(prompts),), float(t)))

            return step_aware
        return lambda latents, prompts, t: ctx.rewards(latents, prompts)

    def sample_round(self, ctx: TrainContext, r: int) -> dict:
        rounds = self._rounds
        index = rounds.prompt_indices(len(ctx.prompts), r)
        chunk = self.spec.sample_batch_size or len(index)
        score = self.score_fn(ctx)

        def one(b: int) -> dict[str, torch.Tensor]:
            lo = b * chunk
            sub = index[lo : lo + chunk]
            gens = [torch.Generator().manual_seed(image_seed(self.name, r, lo + n, rounds.seed)) for n in range(len(sub))]
            out = stepwise_resample(
                ctx.model, [ctx.prompts[int(i)] for i in sub], gens, score, self.spec.num_candidates,
                self.spec.divert_start_step, self.spec.num_inner_step, self.spec.threshold,
            )
            out["prompt"] = sub[out["prompt"]]
            return out

        parts = current_ranks().map_batches(math.ceil(len(index) / chunk), one)  # launched ranks sample a share of the chunks each
        states = [torch.stack([p["x_t_win"], p["x_prev_win"], p["x_t_lose"], p["x_prev_lose"]], 1) for p in parts]
        return {
            "states": torch.cat(states).float().cpu(),  # (V, 4, C, h, w): x_t and x_{t-1} of the win, then of the lose chain
            "step": torch.cat([p["step"] for p in parts]),
            "prompt_index": torch.cat([p["prompt"] for p in parts]),
            "scores": torch.cat([p["scores"] for p in parts], 2).double().cpu(),  # (K, segments, prompts): every candidate's score
        }

    # ---- training ------------------------------------------------------------------------------
    def next_units(self, ctx: TrainContext, rounds: StepwiseRounds | None = None) -> tuple[int, dict, torch.Tensor]:
        """The round this micro-batch trains on, its pairs, and the indices of its units; from ``rounds``
        (what ``prepare`` returned), else the rounds of the last ``prepare``."""
        rounds = rounds or self._rounds
        r, start, data = rounds.locate(ctx, lambda q: self.sample_round(ctx, q))
        pairs = int(data["step"].numel())
        per_epoch = rounds.steps_of(pairs, ctx) // rounds.epochs * ctx.grad_accum  # micro-batches per epoch
        epoch, b = divmod((ctx.step - start) * ctx.grad_accum + ctx.micro, per_epoch)
        slots = torch.arange(b * ctx.batch_size, (b + 1) * ctx.batch_size) % pairs  # the last batch wraps around
        return r, data, rounds.order(r, epoch, pairs)[slots]

    def loss(self, ctx: TrainContext, data, generator: torch.Generator):
        r, batch, units = self.next_units(ctx, data)
        to = dict(device=ctx.device, dtype=ctx.model.dtype)
        states = batch["states"][units]
        step = batch["step"][units]
        prompts = [ctx.prompts[int(i)] for i in batch["prompt_index"][units]] * 2
        x_t = torch.cat([states[:, 0], states[:, 2]]).to(**to)
        x_prev = torch.cat([states[:, 1], states[:, 3]]).to(**to)
        logratio = unit_log_probs(ctx, x_t, x_prev, step.repeat(2), prompts, reference=True, reduction=self.spec.logprob_reduction)
        win, lose = logratio.chunk(2)
        beta, eps = self.spec.beta, self.spec.eps
        losses = spo_loss(win, lose, beta, eps)
        ratio = lambda lr: torch.clamp(torch.exp(lr.detach()), 1 - eps, 1 + eps).mean().item()
        return losses.mean(), {"round": r, "ratio_win": ratio(win), "ratio_lose": ratio(lose)}

    def data_manifest(self, ctx: TrainContext, rounds: StepwiseRounds) -> dict:
        counts, s, covered = rounds.counts(ctx), 0, 0
        for v in counts:  # the rounds that started at or before the last step trained
            if s > ctx.step:
                break
            s, covered = s + rounds.steps_of(v, ctx), covered + 1
        per_epoch = math.ceil(len(ctx.prompts) / rounds.prompts_per_round)
        return {
            "source": "online, step-wise resampling",
            "rounds": covered,
            "epochs": round(covered / per_epoch, 4),
            "prompts_per_round": rounds.prompts_per_round,
            "candidates": self.spec.num_candidates,
            "pairs": int(sum(counts[:covered])),
            "pairs_per_round": [int(v) for v in counts[:covered]][:1000],
        }

    def plan(self, p):
        """``bench plan``: a round of step-wise resampling (``sample_batch_size`` prompts at a time, K
        candidates each from the branch on), at most every trained transition of every prompt kept as a
        pair, and one micro-batch of pairs (win and lose transition, model and reference)."""
        spec, n, k = self.spec, p.batch_size, self.spec.num_candidates
        prompts = spec.prompts_per_round
        chunk = spec.sample_batch_size or prompts
        last, divert, inner = p.stochastic_steps - 1, spec.divert_start_step, spec.num_inner_step

        def one(b):  # the round's work for b prompts
            work = p.passes(nograd=[(b * p.cfg, divert + 1)], samples=b)  # the shared prefix and the first branch's prediction
            i = divert
            while i <= last:
                end = min(i + inner, last)
                work = work + p.passes(nograd=[(k * b * p.cfg, end - i + 1)], decode=[(k * b, 1)], rewards=k * b)  # inner steps, then scoring
                i = end + 1
            return work

        full, rest = divmod(prompts, chunk)
        round_ = one(chunk).times(full) + (one(rest) if rest else p.passes())
        pairs = prompts * (last - divert + 1)
        passes = p.split(2 * n * p.cfg, min(n, last - divert + 1))
        return p.work(
            p.passes(grad=passes, nograd=passes), round=round_, steps_per_round=-(-pairs // (n * p.grad_accum)) * spec.epochs_per_round,
            notes=[f"a round keeps at most {pairs} pairs (those past method.threshold): at most {-(-pairs // (n * p.grad_accum))} optimizer steps per epoch of it"],
        )
