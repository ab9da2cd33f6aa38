"""The method (training recipe) contract.

A method declares the data it needs and builds its loss; the shared trainer
owns the loop (optimizer, accumulation, precision, EMA, checkpoints, resume).

* ``data_spec()``: what determines the prepared data; the trainer caches the
  tensors ``prepare()`` returns under the hash of this spec.
* ``prepare(ctx)``: make the training data once (sample from the base model,
  label with a reward ...) as a dict of tensors, or return an object that
  streams it (a pair dataset given as ``data=``; never cached).
* ``loss(ctx, data, generator)``: one micro-batch loss; all randomness comes
  from ``generator``, which the trainer seeds from (seed, step, micro-batch),
  so a resumed run repeats exactly what an uninterrupted run would do.
* ``extra_state()`` / ``load_extra_state()``: a method that trains a second
  network of its own (stepping its optimizer inside ``loss``) hands its state to
  the trainer, which checkpoints it beside the UNet's.
* ``plan(p)``: what the method will do, for ``bench plan`` (no weights, no data): the UNet
  passes with and without gradient of one micro-batch, of the data it prepares and of each round
  it samples, as a ``Work`` built from the ``PlanContext`` it is given. Hooks named ``plan`` or
  ``plan_*`` do not determine a checkpoint (``bench.trainer.recipe_source_hash`` leaves them out).
"""

from __future__ import annotations

from contextlib import contextmanager
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bench.images import TargetImages
from bench.io import progress
from bench.metrics import Metric
from bench.models.diffusion import DiffusionModel, from_uint8, to_uint8


@dataclass
class TrainContext:
    model: DiffusionModel
    prompts: list[str]
    reward: Metric | None
    seed: int
    device: torch.device
    batch_size: int
    progress: bool = True
    frozen_unet: torch.nn.Module | None = None  # full fine-tuning keeps a frozen copy as reference (where the method uses one)
    data_cfg: dict | None = None  # a pair dataset (``data=``) in place of self-generated data
    grad_accum: int = 1
    workdir: Path | None = None  # the run's checkpoint folder: online methods keep their sampled rounds here
    save_every: int = 1  # checkpoint interval: what a resume can need
    step: int = 0  # set by the trainer before each micro-batch: streamed data reads by position
    micro: int = 0
    images: TargetImages | None = None  # given target images (a DreamBench subject, a style set); prompts are their captions
    sample_batch_size: int | None = None  # how many images a method samples in one batch while training (gen.batch_size)

    @contextmanager
    def reference(self):
        """Predictions of the frozen base model: LoRA adapters off, or the frozen copy."""
        unet = self.model.unet
        if self.frozen_unet is None and not getattr(unet, "peft_config", None):
            raise RuntimeError("this method reads the frozen reference model: set its `uses_reference` (a full fine-tuning keeps a frozen copy only then)")
        if self.frozen_unet is not None:
            self.model.unet = self.frozen_unet
            try:
                yield
            finally:
                self.model.unet = unet
        else:
            unet.disable_adapters()
            try:
                yield
            finally:
                unet.enable_adapters()

    def bar(self, iterable, desc: str):
        return progress(iterable, self.progress, desc=desc)

    @torch.no_grad()
    def rewards(self, latents: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The reward of decoded latents, on the same uint8 pixels evaluation scores."""
        if self.reward is None:
            raise ValueError("this method needs a reward: set method.reward=NAME")
        images = from_uint8(to_uint8(self.model.decode(latents))).to(self.device)
        return self.reward.score(images, prompts).double().cpu()


def image_generators(n: int, generator: torch.Generator) -> list[torch.Generator]:
    """One generator per image of a micro-batch, seeded from the trainer's generator, so each
    image's noise is its own and a resumed step draws the same."""
    return [torch.Generator().manual_seed(int(s)) for s in torch.randint(0, 2**62, (n,), generator=generator)]


# ---- the planner's view of a method (``bench plan``) ----------------------------------------------
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


class Method:
    """Base class for training recipes; ``cfg`` is the method's config section."""

    splits_micro_batches = True  # False: the loss steps an optimizer of its own, so a batch cannot be cut into micro-batches
    uses_reference = True  # False: the loss never reads the frozen base model, so full fine-tuning keeps no frozen copy of the UNet

    def __init__(self, cfg: dict):
        self.cfg = cfg

    def data_spec(self) -> dict:
        return {}

    def prepare(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        return {}

    def loss(self, ctx: TrainContext, data: dict[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors of what the method trains besides the UNet (a fake-score model, a surrogate reward,
        their optimizers' moments), saved with every checkpoint so a resume repeats an uninterrupted run."""
        return {}

    def load_extra_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what :meth:`extra_state` returned (called on resume, after ``prepare``)."""

    def data_manifest(self, ctx: TrainContext, data) -> dict:
        """What the training data was (source, counts, ties dropped), for the run's manifest."""
        return {}

    def plan(self, p: PlanContext) -> Work | None:
        """What training will do (``bench plan``): None where the method gives no plan."""
        return None
