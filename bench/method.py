"""The method (training recipe) contract.

A method declares the data it needs and builds its loss; the shared trainer
owns the loop (optimizer, accumulation, precision, EMA, checkpoints, resume).

* ``Spec``: the recipe's settings as a dataclass (``bench.schema.MethodSpec`` and its shared
  groups); the recipe reads them typed from ``self.spec``, never with a default of its own.
* ``data_spec()``: what determines the prepared data; the trainer caches the
  tensors ``prepare()`` returns under the hash of this spec (``cached_data_spec(ctx)``: none where
  this run's source is streamed).
* ``prepare(ctx)``: the method's data source. Data made once (sampled from the base model, labelled
  with a reward, target images encoded ...) comes back as a dict of tensors, which the trainer caches
  under ``cached_data_spec(ctx)``; data read as training goes comes back as an object the loss reads
  (a pair dataset given as ``data=``, the rounds an online method samples into ``ctx.rounds``). Such
  an object may define ``checkpointed(step)``: the trainer calls it after each resumable checkpoint,
  so it can let go of what no resume can read again (online rounds before that step).
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
import json
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from bench.errors import writing
from bench.images import TargetImages
from bench.io import progress
from bench.metrics import Metric
from bench.models.diffusion import DiffusionModel, from_uint8, to_uint8
from bench.schema import MethodSpec, build_spec

if TYPE_CHECKING:  # the planner's view of a method (`bench plan`)
    from bench.plan.work import PlanContext, Work


class RoundStore:
    """Where an online method keeps the rounds it samples while it trains: the trainer gives a folder
    beside its checkpoints, so a resumed run reads back exactly what the killed one sampled; without
    one (a method called outside the trainer) rounds stay in memory. Round ``r`` is
    ``round-{r:06d}.safetensors``; ``index.json`` is the method's own record of its rounds, if any."""

    def __init__(self, folder: Path | None = None, writes: bool = True):
        self.folder = Path(folder) if folder is not None else None
        self.writes = writes  # False: a rank other than 0, which keeps what it samples in memory and reads rank 0's folder
        self._memory: dict[int, dict] = {}
        self._index: object = None

    def path(self, r: int) -> Path | None:
        return self.folder / f"round-{r:06d}.safetensors" if self.folder is not None else None

    def load(self, r: int) -> dict[str, torch.Tensor] | None:
        """Round r as saved, or None where it was never sampled (or was dropped)."""
        if r in self._memory or self.folder is None:
            return self._memory.get(r)
        return load_file(self.path(r)) if self.path(r).exists() else None

    def save(self, r: int, data: dict[str, torch.Tensor]) -> None:
        data = {k: v.contiguous() for k, v in data.items()}
        if self.folder is None or not self.writes:
            self._memory[r] = data
            return
        with writing(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.path(r).with_suffix(".tmp")
            save_file(data, tmp)
            tmp.replace(self.path(r))

    def drop_before(self, r: int) -> None:
        """Delete every round before ``r``: a resume never reads them again (at SDXL size a round of
        256 trajectories is about 670 MB)."""
        self._memory = {q: d for q, d in self._memory.items() if q >= r}
        if self.folder is None or not self.writes:
            return
        for old in self.folder.glob("round-*.safetensors"):
            if int(old.stem.split("-")[1]) < r:
                old.unlink()

    def read_index(self):
        """The method's record of its rounds (None before the first): JSON, written with ``write_index``."""
        if self.folder is None or (not self.writes and self._index is not None):
            return copy.deepcopy(self._index)
        path = self.folder / "index.json"
        return json.loads(path.read_text()) if path.exists() else None

    def write_index(self, index) -> None:
        if self.folder is None or not self.writes:
            self._index = copy.deepcopy(index)
            return
        with writing(self.folder):
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp = self.folder / "index.json.tmp"
            tmp.write_text(json.dumps(index))
            tmp.replace(self.folder / "index.json")


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
    data_cfg: dict | None = None  # the run's ``data=`` section as given (a pair dataset, a captioned image set): the method decides what it reads
    grad_accum: int = 1
    rounds: RoundStore = field(default_factory=RoundStore)  # where online rounds live: the trainer's, beside its checkpoints
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

    @property
    def base_unet(self) -> torch.nn.Module:
        """The UNet with the base model's weights, to copy from (a teacher, a surrogate's backbone): the
        frozen copy under full fine-tuning, else the model's own, whose LoRA layers ``base_copy`` leaves out."""
        return self.frozen_unet if self.frozen_unet is not None else self.model.unet

    @property
    def full_finetune(self) -> bool:
        """Whether every weight trains (no LoRA adapters on the UNet)."""
        return not getattr(self.model.unet, "peft_config", None)

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

    def cached_data_spec(self, ctx: TrainContext) -> dict:
        """The spec the trainer caches this run's prepared data under: ``data_spec()``, or nothing
        where ``prepare`` returns a source read as training goes (a pair dataset, online rounds)."""
        return self.data_spec()

    def shared_data(self, ctx: TrainContext) -> str | None:
        """The module whose code alone makes this run's prepared data, where other recipes make the same
        data from the same spec (best/worst-of-K samples of one model: SFT, Diffusion-DPO, DSPO ... then
        train on one set of samples, drawn once). The trainer caches it under that module's source, not
        the recipe's. None: the data is this recipe's own."""
        return None

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
