"""The planner's view of a method (``bench plan``): the work a method's ``plan`` hook describes, in
UNet passes, decodes and rewards, built from the sizes of a ``PlanContext`` without loading a model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class Passes:
    """The work of one stage: UNet forward passes with and without gradient, VAE decodes and encodes,
    each a list of (samples per call, calls); reward evaluations; and the samples (images or
    trajectories) the stage produces. Gradient-carrying passes of one micro-batch are all held until
    its backward."""

    grad: list = field(default_factory=list)
    nograd: list = field(default_factory=list)
    decode: list = field(default_factory=list)
    encode: list = field(default_factory=list)
    grad_decode: int = 0  # images decoded with gradient (reward back-propagation)
    rewards: int = 0
    samples: int = 0

    def __add__(self, other: "Passes") -> "Passes":
        return Passes(
            self.grad + other.grad, self.nograd + other.nograd, self.decode + other.decode, self.encode + other.encode,
            self.grad_decode + other.grad_decode, self.rewards + other.rewards, self.samples + other.samples,
        )

    def times(self, k: int) -> "Passes":
        """The same work done ``k`` times (calls multiplied)."""
        mul = lambda xs: [(n, c * k) for n, c in xs if c * k]
        return Passes(mul(self.grad), mul(self.nograd), mul(self.decode), mul(self.encode), self.grad_decode * k, self.rewards * k, self.samples * k)

    @staticmethod
    def total(calls: list) -> int:
        return sum(n * c for n, c in calls)

    @staticmethod
    def largest(calls: list) -> int:
        return max((n for n, c in calls if c), default=0)


@dataclass
class Work:
    """What ``Method.plan`` returns: one micro-batch (and what of it runs before its first
    gradient-carrying pass: sampling, encoding), the data made once before training, one round of
    on-policy sampling and how many optimizer steps a round lasts (at most, where it varies), the
    networks the method holds besides the model (label, parameters, bytes per parameter: weights,
    gradients and optimizer state), networks built from a UNet's encoder that a micro-batch runs
    with gradient (their activations are bounded by the whole UNet's), and notes for the reader."""

    micro: Passes
    before: Passes | None = None  # the part of each micro-batch done before its first gradient-carrying pass (none of its graph alive)
    prepare: Passes | None = None
    round: Passes | None = None
    steps_per_round: float | None = None
    networks: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    trained_encoders: list = field(default_factory=list)  # (label, UNet repo or None for the model's, samples, held with the micro-batch's passes)


@dataclass
class PlanContext:
    """What a method's ``plan`` hook may read: the sizes a ``TrainContext`` would have, without a model."""

    batch_size: int  # units per micro-batch (TrainContext.batch_size)
    grad_accum: int  # micro-batches per optimizer step
    steps: int  # optimizer steps
    sampler_steps: int  # steps of the training sampler
    cfg: int  # 2: a pass of the training sampler carries classifier-free guidance's unconditional half; 1: not
    sample_batch_size: int  # gen.batch_size: trajectories sampled per batch in online rounds
    prompts: int | None = None  # training prompts (None: not known without downloading them)
    images: int | None = None  # target images (a subject's photos, a style set)
    dataset: bool = False  # pairs streamed from a dataset (data=)
    full_finetune: bool = False
    unet_parameters: int = 0
    part_parameters: object = None  # callable(prefixes, backbone=None) -> parameters of those UNet submodules

    @property
    def stochastic_steps(self) -> int:
        """The trained transitions of the sampler (every step but the last)."""
        from bench.errors import UsageError

        if self.sampler_steps < 2:
            raise UsageError(
                f"trajectory methods train on the stochastic steps of the sampler, and {self.sampler_steps} step(s) have none: "
                "train with the model's multi-step sampler (e.g. its 4 steps) and evaluate at 1 step with gen.steps=1"
            )
        return self.sampler_steps - 1

    def passes(self, **kwargs) -> Passes:
        return Passes(**kwargs)

    def work(self, micro: Passes, **kwargs) -> Work:
        return Work(micro, **kwargs)

    def sampling(self, n: int, chunk: int | None = None, steps: int | None = None, cfg: int | None = None, decode: bool = True, rewards: bool = True) -> Passes:
        """``n`` samples through the sampler (``DiffusionModel.sample``), ``chunk`` at a time: one UNet pass
        per step and chunk (twice the samples with CFG), a decode per chunk and a reward per sample."""
        n = int(n)
        if n <= 0:
            return Passes()
        chunk = max(1, min(int(chunk or n), n))
        steps = self.sampler_steps if steps is None else int(steps)
        cfg = self.cfg if cfg is None else int(cfg)
        full, rest = divmod(n, chunk)
        calls = [(chunk, full)] + ([(rest, 1)] if rest else [])
        return Passes(
            nograd=[(c * cfg, k * steps) for c, k in calls if steps],
            decode=list(calls) if decode else [],
            rewards=n if rewards else 0,
            samples=n,
        )

    def split(self, samples: int, passes: int) -> list:
        """``samples`` spread over ``passes`` passes (units at different sampler steps): (per pass, passes)."""
        passes = max(1, min(int(passes), int(samples)))
        return [(math.ceil(samples / passes), passes)] if samples else []
