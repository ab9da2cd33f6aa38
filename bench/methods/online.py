"""Rounds of on-policy sampling for online methods (online PSO, D3PO, DDPO/RLCM).

A round samples ``samples_per_prompt`` trajectories for each of ``prompts_per_round`` training
prompts from the *current* model with its own stochastic sampler, recording every state, the
sampler's log-probability of each transition, and the reward of the final image. The trainer's
steps then walk over the round in a seeded order. Rounds are saved next to the checkpoints (back
to the last checkpoint's round), so a resumed run trains on exactly what the interrupted one
sampled; a round is a pure function of the weights at its start and the seed. The rounds are the
method's data source (``prepare`` returns them, the loss reads them); the trainer owns their folder
(``ctx.rounds``) and, after each checkpoint, lets go of the rounds no resume can read.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
import torch

from bench.generate import image_seed
from bench.method import Method, RoundStore, TrainContext
from bench.models.diffusion import Transition, gaussian_log_prob
from bench.ranks import current as current_ranks
from bench.schema import MethodSpec, RewardSpec, at_least, one_of, setting


def reduce_log_prob(log_prob: torch.Tensor, x: torch.Tensor, reduction: str) -> torch.Tensor:
    """A transition's log-density summed over latent elements (the papers' Gaussian likelihood), or
    meaned over them as the public codes of DDPO, D3PO and online PSO do (``log_prob.mean(dim=1..)``):
    the mean divides every log-ratio, and so beta, by the number of latent elements (65,536 at 1024 px)."""
    if reduction == "sum":
        return log_prob
    if reduction == "mean":
        return log_prob / x[0].numel()
    raise ValueError(f"logprob_reduction must be sum or mean, not {reduction!r}")


def transition_at(ctx: TrainContext, x_t: torch.Tensor, i: int, prompts: list[str], cond=None, detach_uncond: bool = False) -> Transition:
    """The Gaussian of the sampler's i-th transition from x_t under the model as it is now. With
    ``detach_uncond`` CFG's unconditional branch carries no gradient (Flow-GRPO's code detaches it)."""
    model = ctx.model
    steps = model.timesteps()
    t, t_prev = steps[i], steps[i + 1] if i + 1 < len(steps) else -1  # a DDIM eta > 0 sampler may draw noise on its last step too
    cond = cond if cond is not None else model.encode_prompts(prompts)
    guidance = model.sampler.guidance
    uncond = model.unconditional(len(prompts)) if model.uses_cfg(guidance) else None
    if uncond is not None and detach_uncond:
        with torch.no_grad():
            pred_u = model.predict(x_t, t, uncond)
        prediction = pred_u + guidance * (model.predict(x_t, t, cond) - pred_u)
    else:
        prediction = model.predict(x_t, t, cond, uncond, guidance)  # epsilon, or a flow model's velocity
    return model.transition(x_t, model.x0_from_prediction(x_t, prediction, t), prediction, t, t_prev)


def transition_log_probs(ctx: TrainContext, x_t: torch.Tensor, x_prev: torch.Tensor, i: int, prompts: list[str], cond=None, reduction: str = "sum") -> torch.Tensor:
    """log p(x_prev | x_t) of the sampler's i-th transition under the model as it is now (per sample)."""
    step = transition_at(ctx, x_t, i, prompts, cond)
    return reduce_log_prob(gaussian_log_prob(x_prev.double(), step.mean.double(), step.std.double()), x_prev, reduction)


def step_groups(step: torch.Tensor, prompts: list[str], device):
    """(i, rows, their prompts) for training units that each sit at their own sampler step ``step``:
    one batched pass per distinct step."""
    for i in step.unique().tolist():
        rows = (step == i).to(device)
        yield i, rows, [p for p, keep in zip(prompts, rows.tolist()) if keep]


def unit_log_probs(ctx: TrainContext, x_t, x_prev, step: torch.Tensor, prompts: list[str], reference: bool = False, reduction: str = "sum") -> torch.Tensor:
    """log p_theta(x_prev | x_t) of training units that each sit at their own sampler step
    ``step``; minus log p_ref with ``reference``."""
    out = torch.zeros(len(step), dtype=torch.float64, device=ctx.device)
    for i, rows, sub in step_groups(step, prompts, ctx.device):
        lp = transition_log_probs(ctx, x_t[rows], x_prev[rows], i, sub, reduction=reduction)
        if reference:
            with torch.no_grad(), ctx.reference():
                ref = transition_log_probs(ctx, x_t[rows], x_prev[rows], i, sub, reduction=reduction)
            lp = lp - ref
        out = out.index_put((rows.nonzero().squeeze(1),), lp)
    return out


def preference(reward_0: torch.Tensor, reward_1: torch.Tensor, ties: str) -> torch.Tensor:
    """+1 where the first sample is preferred, -1 where the second is. A tie goes to the second
    (``ties: second``; PSO's Alg. 2 and its Turbo script's ``sample_compare``: ``a <= b`` makes b the
    target) or is skipped with 0 (``ties: skip``; D3PO's and the PSO DMD2 script's ``compare``)."""
    if ties not in ("second", "skip"):
        raise ValueError(f"ties must be second or skip, not {ties!r}")
    sign = (reward_0 > reward_1).double() - (reward_0 < reward_1).double()
    return torch.where(sign == 0, torch.full_like(sign, -1.0 if ties == "second" else 0.0), sign)


@dataclass(kw_only=True)
class OnlineSpec(RewardSpec):
    """The settings of the online rounds every online recipe shares."""

    prompts_per_round: int = setting(16, "training prompts sampled per round", at_least(1))
    epochs_per_round: int = setting(1, "passes over a round's training units", at_least(1))


@dataclass(kw_only=True)
class SampledSpec(OnlineSpec):
    """Online rounds of a recipe that samples a chosen number of trajectories per prompt (not a pair)."""

    samples_per_prompt: int = setting(2, "trajectories sampled per prompt in a round", at_least(1))


@dataclass(kw_only=True)
class LogProbSpec(MethodSpec):
    """How a recipe reduces a transition's log-density over latent elements."""

    logprob_reduction: str = setting("mean", "mean: over latent elements, as the public DDPO, D3PO and SPO codes; sum: the papers' densities", one_of("mean", "sum"))


class OnlineRounds:
    """The round buffer of an online method: ``prompts_per_round`` prompts, ``samples_per_prompt``
    trajectories each, ``epochs_per_round`` passes, seeded by ``seed`` (from the recipe's spec);
    with ``steps_per_round`` (a training's), round r trains steps [r x steps_per_round, (r + 1) x steps_per_round)."""

    def __init__(self, spec: OnlineSpec, samples_per_prompt: int, name: str, steps_per_round: int | None = None, store: RoundStore | None = None,
                 policy=None):
        self.name = name
        self.policy = policy  # None: rounds sample with the current weights; else a context (ctx -> context manager) of the weights they sample with
        self.prompts_per_round = spec.prompts_per_round
        self.samples_per_prompt = samples_per_prompt
        self.epochs = spec.epochs_per_round
        self.seed = spec.seed
        self.steps_per_round, self.store = steps_per_round, store

    def batches_per_epoch(self, batch_size: int, units_per_prompt: int = 1) -> int:
        return math.ceil(self.prompts_per_round * units_per_prompt / batch_size)

    def get(self, ctx: TrainContext, r: int) -> dict[str, torch.Tensor]:
        """Round r's samples: drawn with the current weights the first time, read back after (from
        this buffer's store, else the context's)."""
        store = self.store or ctx.rounds
        data = store.load(r)
        if data is None:
            data = self.sample(ctx, r)
            store.save(r, data)
        return data

    def checkpointed(self, step: int) -> None:
        """A resume restarts at ``step`` at the earliest: the rounds before the one it falls in go."""
        self.store.drop_before(step // self.steps_per_round)

    @torch.no_grad()
    def sample(self, ctx: TrainContext, r: int) -> dict[str, torch.Tensor]:
        """Round r: every trajectory with its own generator, sampled and scored ``gen.batch_size`` at
        a time (a round of 256 SDXL trajectories does not fit one batch; chunks change no image); under
        a launcher each rank samples every N-th chunk and every rank gets the whole round."""
        n, s = self.prompts_per_round, self.samples_per_prompt
        g = torch.Generator().manual_seed(image_seed(f"{self.name}-prompts", r, 0, self.seed))
        index = torch.randint(0, len(ctx.prompts), (n,), generator=g)
        prompts = [ctx.prompts[int(i)] for i in index for _ in range(s)]
        gens = [torch.Generator().manual_seed(image_seed(self.name, r, i, self.seed)) for i in range(n * s)]
        chunk = ctx.sample_batch_size or len(prompts)

        def one(b: int) -> dict[str, torch.Tensor]:
            rows = slice(b * chunk, (b + 1) * chunk)
            return self.sample_chunk(ctx, prompts[rows], gens[rows], self.initial_latents(ctx, r, range(n * s)[rows]))

        with self.policy(ctx) if self.policy else nullcontext():
            parts = current_ranks().map_batches(math.ceil(len(prompts) / chunk), one)  # launched ranks sample a share each
        shape = lambda key: torch.cat([p[key] for p in parts]).reshape(n, s, *parts[0][key].shape[1:]).contiguous()  # noqa: E731
        return {**{key: shape(key) for key in parts[0]}, "prompt_index": index}

    def initial_latents(self, ctx: TrainContext, r: int, samples: range) -> torch.Tensor | None:
        """The starting noise of round r's ``samples``: None, each draws its own from its generator."""
        return None

    def sample_chunk(self, ctx: TrainContext, prompts: list[str], gens: list[torch.Generator], initial: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """One chunk's trajectories: every state, the log-probability of each stochastic transition and the reward."""
        k = len(ctx.model.stochastic_timesteps())
        x0, traj, steps = ctx.model.sample(prompts, gens, trajectory=True, initial=initial)
        return {
            "rewards": ctx.rewards(self.rewarded_latents(x0, steps), prompts),
            # log p of each stochastic transition (summed over elements), read off the Gaussians the sampler just drew from
            "log_probs": torch.stack([gaussian_log_prob(traj[i + 1].double(), steps[i].mean.double(), steps[i].std.double()) for i in range(k)], dim=1).cpu(),
            "states": torch.stack(traj, dim=1).float().cpu(),  # (chunk, N + 1, C, h, w)
        }

    def rewarded_latents(self, x0: torch.Tensor, transitions: list) -> torch.Tensor:
        """The latents the reward scores: the sampler's final ones."""
        return x0

    def order(self, r: int, epoch: int, count: int, group: int = 1) -> torch.Tensor:
        """The seeded order in which an epoch of round r visits its ``count`` units. Units come in
        groups of ``group`` consecutive ids (a trajectory or pair at each of its steps), kept
        together as the public DDPO/D3PO/PSO loops batch whole trajectories over all their steps."""
        g = torch.Generator().manual_seed(image_seed(f"{self.name}-order", r, epoch, self.seed))
        groups = torch.randperm(count // group, generator=g)
        return (groups[:, None] * group + torch.arange(group)).flatten()


class OnlineMethod(Method):
    """Base of the online methods: rounds of sampling, then training units walked in a seeded order.

    A subclass names its round buffer (``name``), how many trajectories it samples per prompt and
    how many training units one prompt gives (a pair, a pair at each step, a trajectory at each step).
    """

    name = "online"
    Spec = OnlineSpec
    rounds_class = OnlineRounds  # what a round keeps of its samples (every state and log-probability, or only the final latents)
    sampling_policy = None  # None: rounds sample with the current weights; a method's own (ctx -> context manager) picks other weights

    def samples_per_prompt(self) -> int:
        return 2  # a pair; a recipe with ``samples_per_prompt`` in its spec reads it

    def units_per_prompt(self, ctx: TrainContext) -> int:
        return 1

    def unit_group(self, ctx: TrainContext) -> int:
        """How many consecutive units belong to one trajectory (or pair): 1, or its trained steps."""
        return 1

    def rounds(self, ctx: TrainContext | None = None) -> OnlineRounds:
        """The round buffer; with ``ctx``, bound to that training's store and steps per round."""
        if ctx is None:
            return self.rounds_class(self.spec, self.samples_per_prompt(), self.name, policy=self.sampling_policy)
        return self.rounds_class(self.spec, self.samples_per_prompt(), self.name, self.steps_per_round(ctx), ctx.rounds, self.sampling_policy)

    def steps_per_round(self, ctx: TrainContext) -> int:
        """Optimizer steps per round: its micro-batches over all epochs, ``grad_accum`` per step."""
        micro_batches = self.rounds().batches_per_epoch(ctx.batch_size, self.units_per_prompt(ctx)) * self.spec.epochs_per_round
        return math.ceil(micro_batches / ctx.grad_accum)

    def prepare(self, ctx: TrainContext) -> OnlineRounds:
        ctx.model.stochastic_timesteps()  # fail now, not after the first round, on a 1-step sampler
        return self.rounds(ctx)

    def next_units(self, ctx: TrainContext, rounds: OnlineRounds | None = None) -> tuple[int, dict[str, torch.Tensor], torch.Tensor]:
        """The round this micro-batch trains on, its samples, and the indices of its units; from
        ``rounds`` (what ``prepare`` returned), else a buffer on the context's store."""
        rounds = rounds or self.rounds(ctx)
        spr = self.steps_per_round(ctx)
        r, within = divmod(ctx.step, spr)
        batch = rounds.get(ctx, r)
        per_epoch = rounds.batches_per_epoch(ctx.batch_size, self.units_per_prompt(ctx))
        epoch, b = divmod((within * ctx.grad_accum + ctx.micro) % (per_epoch * rounds.epochs), per_epoch)
        order = rounds.order(r, epoch, rounds.prompts_per_round * self.units_per_prompt(ctx), self.unit_group(ctx))
        return r, batch, order[b * ctx.batch_size : (b + 1) * ctx.batch_size]

    def data_manifest(self, ctx: TrainContext, data) -> dict:
        return {
            "source": "online",
            "rounds": ctx.step // self.steps_per_round(ctx) + 1,  # ctx.step is the last step trained
            "prompts_per_round": self.spec.prompts_per_round,
            "samples_per_prompt": self.samples_per_prompt(),
        }

    def plan(self, p):
        """``bench plan``: one round (``gen.batch_size`` trajectories at a time through the training sampler,
        each decoded and scored), how many optimizer steps it lasts, and one micro-batch (``plan_micro``)."""
        rounds = self.rounds()
        per_epoch = -(-(rounds.prompts_per_round * self.plan_units(p)) // p.batch_size)
        work = self.plan_micro(p)
        work.round = p.sampling(rounds.prompts_per_round * self.samples_per_prompt(), p.sample_batch_size)
        work.steps_per_round = -(-(per_epoch * rounds.epochs) // p.grad_accum)
        return work

    def plan_units(self, p):
        return 1  # training units per prompt, as units_per_prompt

    def plan_micro(self, p):
        return p.work(p.passes())
