"""The method (training recipe) contract.

A method declares the data it needs and builds its loss; the shared trainer
owns the loop (optimizer, accumulation, precision, EMA, checkpoints, resume).

* ``Spec``: the recipe's settings as a dataclass (``bench.schema.MethodSpec`` and its shared
  groups); the recipe reads them typed from ``self.spec``, never with a default of its own.
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

import copy
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bench.images import TargetImages
from bench.io import progress
from bench.metrics import Metric
from bench.models.diffusion import DiffusionModel, from_uint8, to_uint8
from bench.schema import MethodSpec, build_spec

if TYPE_CHECKING:  # the planner's view of a method (`bench plan`)
    from bench.plan.work import PlanContext, Work


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
    step: int = 0  # the optimizer step of this micro-batch (``at``): streamed data and online rounds read by position
    micro: int = 0  # the micro-batch within the step
    images: TargetImages | None = None  # given target images (a DreamBench subject, a style set); prompts are their captions
    sample_batch_size: int | None = None  # how many images a method samples in one batch while training (gen.batch_size)

    def at(self, step: int, micro: int = 0) -> TrainContext:
        """This context at one micro-batch: the trainer hands each loss call its own, so the step a
        method reads is an argument, never a field of a shared context set from outside."""
        return replace(self, step=step, micro=micro)

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


class Method:
    """Base class for training recipes; ``cfg`` is the method's config section, as composed (its hash
    names the checkpoint), and ``spec`` its typed settings: the recipe's ``Spec`` (a dataclass of
    ``bench.schema.setting`` fields: type, default, range, help), where its defaults live. Composition
    checks the section against ``Spec``, closed; a recipe that declares none keeps free-form keys."""

    Spec = MethodSpec
    splits_micro_batches = True  # False: the loss steps an optimizer of its own, so a batch cannot be cut into micro-batches
    uses_reference = True  # False: the loss never reads the frozen base model, so full fine-tuning keeps no frozen copy of the UNet

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self._spec, self._spec_of = build_spec(self.Spec, cfg), copy.deepcopy(cfg)  # a missing required key fails here, not in loss()

    @property
    def spec(self):
        """The typed settings of ``cfg``, rebuilt when a caller has changed ``cfg`` since (a key set on it)."""
        if getattr(self, "_spec_of", None) != self.cfg:
            self._spec, self._spec_of = build_spec(self.Spec, self.cfg), copy.deepcopy(self.cfg)
        return self._spec

    def data_spec(self) -> dict:
        return {}

    def as_composed(self, *keys: str) -> dict:
        """``keys`` as the preset wrote them (the typed value where it left one out): a data cache key
        hashes them, and ``5`` and ``5.0`` hash apart, so the key stays what it was before specs."""
        return {k: self.cfg[k] if k in self.cfg else getattr(self.spec, k) for k in keys}

    def prepare(self, ctx: TrainContext) -> dict[str, torch.Tensor]:
        return {}

    def loss(self, ctx: TrainContext, data: dict[str, torch.Tensor], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def check_evaluation(self, model: DiffusionModel) -> None:
        """Raise (one line) if ``model``, loaded with the evaluation sampler, would not sample what this
        recipe trains (a one-step generator evaluated at 4 steps); called before any work of a run."""

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
