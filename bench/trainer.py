"""One training loop for every method.

LoRA (peft) on the UNet or full fine-tuning, AdamW, gradient accumulation,
mixed precision through accelerate where the device supports it, optional EMA,
safetensors checkpoints with resume after a kill, and a progress bar. The
finished checkpoint is cached under the hash of everything that determines it,
so running the same recipe twice trains once.

Determinism: the micro-batch generator is seeded from (seed, step, micro-batch)
rather than drawn from one running stream, and the checkpoint holds the weights,
the optimizer state and the EMA exactly, so resuming at step k continues the
very computation an uninterrupted run would have done.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from bench.config import stable_hash
from bench.errors import TrainingError, writing
from bench.generate import CheckpointId, derived_seed
from bench.images import TargetImages
from bench.suite import prompts_sha256
from bench.trainlog import TrainLog, tracker_kwargs
from bench.io import adopt_file, progress, write_json
from bench.method import Method, RoundStore, TrainContext
from bench.ranks import current as current_ranks
from bench.ranks import join_process_group
from bench.models.diffusion import DiffusionModel, sampler_identity
from bench.weights import copy_weights

log = logging.getLogger(__name__)
LORA_TARGETS = DiffusionModel.lora_targets  # the UNets'; a flow model names its own (FlowModel.lora_targets)
# Keys of a method's config that document it and determine no checkpoint (``train`` and ``gen`` enter
# through the training config): where a preset differs from the authors' code is read by `bench plan`.
METHOD_NOTES = ("description", "train", "gen", "code_differences")


@dataclass
class Checkpoint:
    """A finished training run: where its weights are and what identifies them."""

    path: Path
    train_id: str

    @property
    def data(self) -> dict | None:
        """What the method trained on (source, pair count, ties dropped), from train.json."""
        meta = self.path / "train.json"
        return json.loads(meta.read_text()).get("data") if meta.exists() else None


def without_plan_hooks(source: str) -> str:
    """``source`` without its planner hooks (functions named ``plan`` or ``plan_*``, with the blank
    lines before each): they say what a recipe will cost (``bench plan``), not what it computes, so
    adding or editing one keeps every checkpoint key. A source without hooks is returned unchanged."""
    import ast

    try:
        tree = ast.parse(source)
    except SyntaxError:
        return source
    lines = source.splitlines(keepends=True)
    drop: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and (node.name == "plan" or node.name.startswith("plan_")):
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)]) - 1
            while start > 0 and not lines[start - 1].strip():
                start -= 1
            drop.update(range(start, node.end_lineno))
    return "".join(line for i, line in enumerate(lines) if i not in drop) if drop else source


RECIPE_PACKAGE = "bench.methods"


def module_source(name: str) -> str | None:
    """The source text of module ``name`` as its file holds it, or None where no source file is kept
    (a class defined in an interactive session). A module of ``bench.methods`` is found by its path
    in that folder, so nothing is imported to read it."""
    import sys

    import bench.methods

    if name in sys.modules:
        origin = getattr(sys.modules[name], "__file__", None)
    elif name.startswith(RECIPE_PACKAGE + "."):
        stem = Path(bench.methods.__file__).parent.joinpath(*name.split(".")[2:])
        origin = next((p for p in (stem.with_suffix(".py"), stem / "__init__.py") if p.is_file()), None)
    else:
        origin = None
    if not origin or not str(origin).endswith(".py") or not Path(origin).is_file():
        return None
    return Path(origin).read_bytes().decode()


def recipe_imports(name: str, source: str, local: Path | None = None) -> set[str]:
    """The modules of ``bench.methods`` that the source of module ``name`` imports (read from its
    import statements with ``ast``, nothing executed; relative imports resolved), and with ``local`` (a
    user's recipe file's folder) the imported modules whose file lies in that folder."""
    import ast

    package = name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                root = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{root}.{base}" if base else root
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from bench.methods import online`
    return {m for m in found if (m.startswith(RECIPE_PACKAGE + ".") or _beside(m, local)) and module_source(m) is not None}


def _beside(name: str, folder: Path | None) -> bool:
    """Whether module ``name`` is loaded from a file in ``folder``."""
    import sys

    origin = getattr(sys.modules.get(name), "__file__", None) if folder is not None else None
    return bool(origin) and Path(origin).resolve().parent == folder


def _user_folder(name: str) -> Path | None:
    """The folder of a recipe module outside ``bench.methods`` (a user's file): its sibling modules
    enter its hash as ``bench.methods`` modules enter a shipped recipe's."""
    import sys

    origin = getattr(sys.modules.get(name), "__file__", None)
    return Path(origin).resolve().parent if origin and not name.startswith(RECIPE_PACKAGE + ".") else None


def recipe_source_hash(method: Method) -> str | None:
    """sha256 of the source of the method's module and of the ``bench.methods`` modules it imports,
    transitively (``pso_online`` imports ``online``; ``sft`` imports ``preference_data``), so editing
    one recipe retrains that recipe and those built on its code, and no other. A user's recipe (a file or
    module outside ``bench.methods``) hashes the same way, with the modules beside it that it imports. The planner hooks
    (``Method.plan``) are left out. The core (``bench.trainer``, ``bench.method``, ``bench.models``)
    does not enter: its changes are held to the same numbers by the byte-identical and loss-value
    tests, and entering it would retrain every checkpoint at any edit."""
    return module_tree_hash(type(method).__module__)


def module_tree_hash(own: str) -> str | None:
    """sha256 of module ``own``'s source and of the recipe modules it imports, transitively (``recipe_source_hash``)."""
    source = module_source(own)
    if source is None:
        return None
    seen, todo, local = {own: source}, [own], _user_folder(own)
    while todo:
        name = todo.pop()
        for dep in recipe_imports(name, seen[name], local) - set(seen):
            seen[dep] = module_source(dep)
            todo.append(dep)
    h = hashlib.sha256(without_plan_hooks(source).encode())
    for name in sorted(set(seen) - {own}):
        h.update(f"\n# {name}\n{without_plan_hooks(seen[name])}".encode())
    return h.hexdigest()[:16]


def legacy_recipe_source_hash(method: Method) -> str | None:
    """The recipe hash before content keys (the method's module and every ``bench.methods`` file):
    kept only to find a checkpoint or prepared data an existing cache holds under it."""
    import inspect

    import bench.methods

    try:
        own = inspect.getsource(inspect.getmodule(type(method)))
    except (OSError, TypeError):  # defined where no source is kept (an interactive session)
        return None
    h = hashlib.sha256(without_plan_hooks(own).encode())
    for path in sorted(Path(bench.methods.__file__).parent.glob("*.py")):
        h.update(without_plan_hooks(path.read_bytes().decode()).encode())
    return h.hexdigest()[:16]


def train_identity(tc: dict) -> dict:
    """The training settings that determine the checkpoint: ``save_every`` (when it saves) only where
    ``keep_checkpoints`` keeps a snapshot at every save, and the flag only when it is set, so every
    checkpoint trained without it keeps its key."""
    ident = {k: v for k, v in tc.items() if k not in ("save_every", "keep_checkpoints", "log_with")}  # log_with: where curves go, not what trains
    return ident | ({"keep_checkpoints": True, "save_every": int(tc["save_every"])} if tc.get("keep_checkpoints") else {})


def data_identity(data: dict) -> dict | None:
    """The dataset settings that determine the checkpoint. A local source (``data=FILE.parquet``, a folder)
    keeps the ``revision`` of the hub dataset YAML it replaced out of it: that commit is not what was read,
    and a local run keeps the key it had before hub datasets were pinned."""
    from bench.pairs import is_local_source

    ident = {k: v for k, v in data.items() if k not in ("description", "_dir")}
    if ident.get("revision") and ident.get("source") and is_local_source(str(ident["source"])):
        ident["revision"] = None
    return ident or None


def kept_checkpoints(final: Checkpoint) -> list[tuple[int, Checkpoint]]:
    """(step, checkpoint) for every snapshot ``train.keep_checkpoints`` kept beside a finished
    checkpoint, oldest first, then the final one; each has its own id, so its images are its own."""
    meta = json.loads((final.path / "train.json").read_text())
    out = []
    for folder in sorted((final.path.parent / "kept").glob("step-*"), key=lambda p: int(p.name.split("-")[1])):
        if (folder / "weights.safetensors").exists():
            step = int(folder.name.split("-")[1])
            legacy = getattr(final.train_id, "legacy", None)
            out.append((step, Checkpoint(folder, CheckpointId(f"{final.train_id}-step{step}", legacy and f"{legacy}-step{step}"))))
    return out + [(int(meta["steps"]), final)]


def micro_batches(tc: dict, splits: bool, name: str) -> tuple[int, int]:
    """(micro-batch size, micro-batches per optimizer step): ``train.batch_size`` is cut into
    ``train.micro_batch_size`` pieces whose gradients accumulate, times ``train.grad_accum``, so a
    paper's batch fits in memory without changing what one optimizer step averages over. ``splits``:
    whether the method allows it (``Method.splits_micro_batches``)."""
    batch, micro, accum = int(tc["batch_size"]), tc.get("micro_batch_size"), int(tc["grad_accum"])
    if not micro or int(micro) >= batch:
        return batch, accum
    micro = int(micro)
    if batch % micro:
        raise TrainingError(f"train.batch_size={batch} is not a multiple of train.micro_batch_size={micro}: pick a divisor of {batch}")
    if not splits:
        raise TrainingError(
            f"method '{name}' steps a network of its own inside each loss call, so its batch cannot be cut "
            f"into micro-batches: set train.micro_batch_size=null and lower train.batch_size instead"
        )
    return micro, accum * (batch // micro)


def mixed_precision(mp, device_type: str, bf16_supported: bool | None = None) -> str:
    """accelerate's ``mixed_precision`` for ``train.mixed_precision``: auto is bf16 on CUDA where the GPU
    supports it (else fp16) and no elsewhere."""
    if mp in (False, None):  # `train.mixed_precision=no` on the command line reads as YAML's false
        return "no"
    if mp != "auto":
        return str(mp)
    if device_type == "cuda":
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        return "bf16" if bf16_supported else "fp16"
    return "no"


def micro_seed(seed: int, step: int, micro: int) -> int:
    return derived_seed("train", seed, step, micro)


def add_lora(unet: torch.nn.Module, rank: int, alpha: float, seed: int, targets: list[str] = LORA_TARGETS) -> None:
    from peft import LoraConfig

    torch.manual_seed(seed)  # the A matrices are random; B starts at zero, so the model starts unchanged
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets)))


def trainable_state(unet: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    params = dict(unet.named_parameters())
    return {n: params[n].detach().clone().contiguous() for n in names}


def apply_checkpoint(model: DiffusionModel, ckpt: Checkpoint) -> None:
    """Load a finished checkpoint into the model (adds the LoRA adapter first where there is one)."""
    meta = json.loads((ckpt.path / "train.json").read_text())
    if meta["lora_rank"]:
        add_lora(model.unet, meta["lora_rank"], meta["lora_alpha"], 0, meta.get("lora_targets") or model.lora_targets)
    misfit = lambda n: TrainingError(f"checkpoint {ckpt.path} does not fit model '{model.name}' ({n} unknown tensors); delete it and retrain")
    copy_weights(model.unet, load_file(ckpt.path / "weights.safetensors"), misfit)
    model.unet.requires_grad_(False)


def update_ema(ema: dict[str, torch.Tensor], unet: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * weights, for the trained weights."""
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if n in ema:
                ema[n].mul_(decay).add_(p.detach(), alpha=1 - decay)


def adopt_checkpoint_folder(old: Path, new: Path, train_id: str) -> list[str]:
    """Move what the folder ``old`` holds (``final``, ``kept``, the ``step-*`` states of a training in
    progress) into ``new``, the same checkpoint's folder under its content id, and write that id into
    each ``train.json``, so the folder reads as one trained under it. Returns the names moved."""
    moved = []
    for entry in sorted(old.iterdir()):
        if entry.name != ".lock" and not (new / entry.name).exists():
            with writing(new):
                entry.rename(new / entry.name)
            moved.append(entry.name)
    for meta in [new / "final" / "train.json", *(new / "kept").glob("step-*/train.json")]:
        if meta.exists():
            body = json.loads(meta.read_text())
            if body.get("train_id") != train_id:
                write_json(meta, {**body, "train_id": str(train_id)})
    for leftover in (old / ".lock", old):  # an empty legacy folder goes; one still in use stays
        try:
            leftover.unlink() if leftover.is_file() else leftover.rmdir()
        except OSError:
            pass
    return moved


def sum_over_ranks(ranks: int, params: list[torch.Tensor], loss: float, diverged: float | None, device) -> tuple[float, float | None]:
    """The gradients, the step's loss and whether any rank's loss diverged, summed over the ``ranks``
    that each computed a share of a step's micro-batches (one all-reduce of one flat buffer, as DDP does
    it); nothing to do in one process."""
    if ranks == 1:
        return loss, diverged
    import torch.distributed as dist

    flags = torch.tensor([loss, float(diverged is not None), diverged if diverged is not None else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(flags)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    for p, part in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = part.view_as(p).clone()
    return float(flags[0]), (float(flags[2]) if flags[1] > 0 else None)


# ---- optimizer and learning-rate schedule --------------------------------------------------
def make_optimizer(params, tc: dict) -> torch.optim.Optimizer:
    name, lr, wd = tc["optimizer"], peak_lr(tc), float(tc["weight_decay"])
    betas = tuple(float(b) for b in tc.get("adam_betas") or (0.9, 0.999))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=wd)
    if name == "adafactor":  # the settings the Salesforce and DSPO SDXL scripts force
        from transformers.optimization import Adafactor

        return Adafactor(params, lr=lr, weight_decay=wd, clip_threshold=1.0, scale_parameter=False, relative_step=False)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise TrainingError("train.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes (CUDA only), or use adamw") from None
        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=wd)
    raise TrainingError(f"unknown train.optimizer '{name}': use adamw, adafactor or adamw8bit")


def peak_lr(tc: dict) -> float:
    """train.lr, times the effective batch with train.scale_lr (1e-8 x 2048 = 2.048e-5 in DSPO)."""
    scale = int(tc["batch_size"]) * int(tc["grad_accum"]) if tc["scale_lr"] else 1
    return float(tc["lr"]) * scale


def lr_factor(schedule: str, step: int, warmup: int, total: int) -> float:
    """Multiplier of the peak learning rate at an optimizer step (diffusers' schedule definitions)."""
    if step < warmup:
        return step / max(1, warmup)
    if schedule in ("constant", "constant_with_warmup"):
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise TrainingError(f"unknown train.lr_schedule '{schedule}': use constant, constant_with_warmup, linear or cosine")


# ---- optimizer state <-> safetensors -----------------------------------------------------------
def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer state as safetensors tensors, plus what goes to JSON: the param groups and
    plain-number state (Adafactor keeps its step count as an int)."""
    state = opt.state_dict()
    flat = {f"{idx}.{k}": v for idx, s in state["state"].items() for k, v in s.items()}
    tensors = {k: v.contiguous() for k, v in flat.items() if torch.is_tensor(v)}
    scalars = {k: v for k, v in flat.items() if not torch.is_tensor(v)}
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in {**tensors, **meta.get("scalars", {})}.items():
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


class Trainer:
    def __init__(self, cfg: dict, model: DiffusionModel, method: Method, prompts: list[str], reward, device, cache_dir: Path, progress=True, images: TargetImages | None = None):
        self.cfg, self.train_cfg = cfg, cfg["train"]
        self.model, self.method, self.prompts, self.reward, self.images = model, method, prompts, reward, images
        self.device, self.cache_dir, self.progress = device, Path(cache_dir), progress
        self.data_source = None  # what ``prepare`` returned, once training starts
        self.ranks = current_ranks()  # the launched processes that train together (rank 0 of 1 alone)
        self.train_id = CheckpointId(
            stable_hash(self._identity(sampler_identity(model.sampler), recipe_source_hash(method)))[:16],
            legacy=stable_hash(self._identity(str(model.sampler), legacy_recipe_source_hash(method)))[:16],  # before content keys
        )
        self.root = self.cache_dir / "checkpoints" / f"{cfg['method']['name']}-{self.train_id}"

    def _identity(self, sampler, recipe_source: str | None) -> dict:
        """Everything that determines the checkpoint; the sampler and recipe hash as given, so the id
        of earlier versions (``str(sampler)``, ``legacy_recipe_source_hash``) is the same formula."""
        data = self.cfg.get("data") or {}
        return {
            "model": self.model.identity,
            "sampler": sampler,
            "method": {k: v for k, v in self.cfg["method"].items() if not k.startswith("_") and k not in METHOD_NOTES},
            "train": train_identity(self.train_cfg),
            "prompts": prompts_sha256(self.prompts),
            "reward": self._reward_version(),  # scorers=tiny is another version
            "recipe_source": recipe_source,
            "data": data_identity(data),
        } | ({"images": self.images.sha256} if self.images is not None else {})  # target images: a subject, a style set

    # ---- public ------------------------------------------------------------------------------
    def run(self) -> Checkpoint:
        """Train, or reuse the finished checkpoint. Processes sharing a cache train one checkpoint once:
        the others wait on its lock file, then reuse it. The ranks of one launch train it together:
        rank 0 holds the lock for them."""
        final = self.root / "final"
        if self.ranks.main:
            self._adopt_legacy()
        if not (final / "weights.safetensors").exists():
            from filelock import FileLock

            lock = None
            if self.ranks.main:
                with writing(self.root.parent):
                    self.root.mkdir(parents=True, exist_ok=True)
                    lock = FileLock(self.root / ".lock")  # released by the kernel when its process dies
                    lock.acquire()
            self.ranks.barrier()  # every rank sees what rank 0 saw once it held the lock
            try:
                if not (final / "weights.safetensors").exists():  # not trained by another process while this one waited
                    return self._train()
            finally:
                if lock is not None:
                    lock.release()
        log.info("reusing trained checkpoint %s", final)
        return Checkpoint(final, self.train_id)

    def _train(self) -> Checkpoint:
        """trainable UNet -> context -> data -> resume -> optimizer steps -> final checkpoint."""
        tc = self.train_cfg
        self._join_ranks()
        unet, frozen, lora = self._trainable_unet()
        params = [p for p in unet.parameters() if p.requires_grad]
        steps = int(tc["steps"])
        ctx = self._context(frozen)
        opt = make_optimizer(params, tc)
        lr_factor(tc["lr_schedule"], 0, 0, steps)  # a mistyped schedule fails before data is made
        data = self._data(ctx)
        self.data_source = data  # ``_save`` tells it of each checkpoint (online rounds let go of what no resume reads)
        ema = {n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad} if tc["ema_decay"] else None
        start, history = self._resume(unet, opt, ema)
        accel, train_log = self._accelerator(start)
        bar = progress(range(start, steps), self.progress, initial=start, total=steps, desc=f"train {self.cfg['method']['name']}")
        for step in bar:
            loss, logs = self._optimizer_step(step, ctx, data, opt, params, accel, ema, history)
            if ema is not None:
                update_ema(ema, unet, float(tc["ema_decay"]))
            history.append(loss)
            train_log.write(step + 1, loss, opt.param_groups[0]["lr"], logs)
            bar.set_postfix(loss=f"{loss:.4f}", **{k: f"{v:.3g}" for k, v in logs.items()}, refresh=False)  # shown at the next redraw: a batch log keeps its pace
            if (step + 1) % int(tc["save_every"]) == 0 and step + 1 < steps:
                if tc.get("keep_checkpoints"):  # before the resumable state: a kill between the two redoes this step's snapshot
                    self._keep(unet, ema, step + 1, history, lora)
                self._save(unet, opt, ema, step + 1, history)
        bar.close()
        train_log.close()
        unet.eval().requires_grad_(False)
        if tc["gradient_checkpointing"]:
            unet.disable_gradient_checkpointing()
        return self._finish(unet, ema, history, lora, self.method.data_manifest(ctx.at(steps - 1, ctx.grad_accum - 1), data))  # as of the last micro-batch

    def _accelerator(self, start: int):
        """accelerate's Accelerator (mixed precision; ``train.log_with``'s trackers where installed) and
        the train.jsonl log, cut back to ``start``, the step training resumes from."""
        from accelerate import Accelerator

        trackers = tracker_kwargs(self.train_cfg.get("log_with"), self.root)
        accel = Accelerator(mixed_precision=self._precision(), cpu=self.device.type == "cpu", **trackers)
        if trackers:
            accel.init_trackers(f"{self.cfg['method']['name']}-{self.train_id}", config={k: v for k, v in self.train_cfg.items() if isinstance(v, (int, float, str, bool))})
        return accel, TrainLog(self.root, start, accel if trackers else None, writes=self.ranks.main)

    def _join_ranks(self) -> None:
        """Under a launcher: refuse a method whose state cannot be kept equal on every rank, and join
        the process group the gradients are summed in (gloo on CPU, nccl on CUDA)."""
        if self.ranks.size == 1:
            return
        method = type(self.method)
        if not method.splits_micro_batches or method.extra_state is not Method.extra_state:
            raise TrainingError(
                f"method '{self.cfg['method']['name']}' trains a network of its own inside its loss, which the ranks would "
                "each step apart: train it in one process (without torchrun / accelerate launch), then evaluate under the launcher"
            )
        join_process_group(self.device.type)

    def _trainable_unet(self) -> tuple[torch.nn.Module, torch.nn.Module | None, bool]:
        """The UNet in training mode with what trains marked (LoRA adapters, or every weight), the
        frozen reference of full fine-tuning where the method reads one, and whether it is LoRA."""
        tc, unet = self.train_cfg, self.model.unet
        lora = bool(tc["lora_rank"]) and not tc["full_finetune"]
        frozen = None
        if lora:
            add_lora(unet, int(tc["lora_rank"]), float(tc["lora_alpha"]), int(tc["seed"]), self.model.lora_targets)
        else:
            # the reference of full fine-tuning: a frozen copy, kept only where the method reads one (memory: a UNet in float32)
            frozen = copy.deepcopy(unet).requires_grad_(False) if self.method.uses_reference else None
            unet.requires_grad_(True)
        unet.train()
        if tc["gradient_checkpointing"]:
            unet.enable_gradient_checkpointing()
        self.trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
        return unet, frozen, lora

    def _context(self, frozen: torch.nn.Module | None) -> TrainContext:
        tc = self.train_cfg
        micro_batch, accum = self._micro_batches()
        return TrainContext(
            self.model, self.prompts, self.reward, int(tc["seed"]), self.device, micro_batch, self.progress, frozen,
            data_cfg=self.cfg.get("data") or None, grad_accum=accum, rounds=RoundStore(self.root / "rounds", writes=self.ranks.main), images=self.images,
            sample_batch_size=int(self.cfg["gen"]["batch_size"]),
        )

    def _optimizer_step(self, step: int, ctx: TrainContext, data, opt, params, accel, ema, history: list[float]) -> tuple[float, dict]:
        """One optimizer step: the scheduled learning rate, ``grad_accum`` micro-batches whose gradients
        add up (each seeded from (seed, step, micro-batch); under a launcher each rank computes every
        N-th of them and the gradients are summed across ranks, as DDP sums them), clipping, the update.
        A non-finite loss stops training on every rank with the progress up to the last finite weights kept."""
        tc = self.train_cfg
        total, logs, diverged = 0.0, {}, None
        for group in opt.param_groups:
            group["lr"] = peak_lr(tc) * lr_factor(tc["lr_schedule"], step, int(tc["warmup_steps"]), int(tc["steps"]))
        for micro in range(self.ranks.rank, ctx.grad_accum, self.ranks.size):
            gen = torch.Generator().manual_seed(micro_seed(int(tc["seed"]), step, micro))
            with accel.autocast():
                loss, logs = self.method.loss(ctx.at(step, micro), data, gen)
            if not torch.isfinite(loss):
                diverged = loss.item()
                break
            accel.backward(loss / ctx.grad_accum)
            total += loss.item() / ctx.grad_accum
        total, diverged = sum_over_ranks(self.ranks.size, params, total, diverged, self.device)
        if diverged is not None:
            if all(torch.isfinite(p).all() for p in params):  # keep the progress, never diverged weights
                self._save(self.model.unet, opt, ema, step, history, keep_previous=True, only_if_new=True)
            raise TrainingError(
                f"loss became {diverged} at step {step} of method '{self.cfg['method']['name']}' "
                f"(train.lr={tc['lr']}); progress up to the last checkpoint is kept in {self.root}: "
                "lower train.lr or check the method's inputs"
            )
        if tc["max_grad_norm"]:
            torch.nn.utils.clip_grad_norm_(params, float(tc["max_grad_norm"]))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total, logs

    # ---- pieces ------------------------------------------------------------------------------
    def _adopt_legacy(self) -> None:
        """A checkpoint folder an existing cache holds under the id of earlier versions (its finished
        weights, kept snapshots, or a training in progress) moves to this id, once, under the lock."""
        legacy = self.train_id.legacy and self.root.with_name(f"{self.cfg['method']['name']}-{self.train_id.legacy}")
        if not legacy or not legacy.is_dir() or (self.root / "final" / "weights.safetensors").exists():
            return
        from filelock import FileLock

        with writing(self.root.parent):
            self.root.mkdir(parents=True, exist_ok=True)
            with FileLock(self.root / ".lock"):
                moved = adopt_checkpoint_folder(legacy, self.root, self.train_id)
        if moved:
            log.info("checkpoint %s moved to its content key %s (%s), once; nothing retrained", legacy.name, self.root.name, ", ".join(moved))

    def _reward_version(self) -> str | None:
        return f"{self.reward.info.name}@{self.reward.info.version}" if self.reward is not None else None

    def _micro_batches(self) -> tuple[int, int]:
        return micro_batches(self.train_cfg, self.method.splits_micro_batches, self.cfg["method"]["name"])

    def _precision(self) -> str:
        return mixed_precision(self.train_cfg["mixed_precision"], self.device.type)

    def _data(self, ctx: TrainContext):
        """The method's data source: what ``prepare`` made, cached under its data spec, or a source it
        reads as training goes (a pair dataset, online rounds), which is never cached."""
        spec = self.method.cached_data_spec(ctx)
        if not spec:
            return self.method.prepare(ctx)
        reward = self._reward_version()
        extra = {"reward": reward} if reward else {}
        shared = self.method.shared_data(ctx)
        own = self._data_path(spec, sampler_identity(self.model.sampler), recipe_source_hash(self.method), extra)
        path = self._data_path(spec, sampler_identity(self.model.sampler), module_tree_hash(shared), extra, shared.rsplit(".", 1)[-1]) if shared else own
        legacy = self._data_path(spec, str(self.model.sampler), legacy_recipe_source_hash(self.method))  # before content keys
        for earlier in ([own] if shared else []) + [legacy]:  # the same data under this recipe's own key (before it was shared) or a legacy one
            if self.ranks.main and not path.exists() and earlier.exists() and adopt_file(earlier, path):
                log.info("prepared data %s moved to its content key %s, once; nothing recomputed", earlier.name, path.name)
        if path.exists() or not self.ranks.main:
            self.ranks.barrier()  # rank 0 prepares the data the others read
            return load_file(path)
        data = {k: v.contiguous() for k, v in self.method.prepare(ctx).items()}
        with writing(path.parent):
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file(data, tmp)
            tmp.replace(path)
        self.ranks.barrier()
        return data

    def _data_path(self, spec, sampler, recipe_source: str | None, extra: dict | None = None, label: str | None = None) -> Path:
        """Where the prepared data lives: keyed by the data spec and what it is computed from (the
        model's weights, the sampler, the prompts or target images, the source of the code that makes it
        and, in ``extra``, the reward's version: ``scorers=tiny`` ranks pairs otherwise than the official
        one). Named after the method preset, or after the module of data that recipes share (``label``)."""
        what = {"model": self.model.identity, "sampler": sampler, "prompts": self.prompts, "spec": spec, "recipe_source": recipe_source, **(extra or {})}
        key = stable_hash(what | ({"images": self.images.sha256} if self.images is not None else {}))[:16]
        return self.cache_dir / "data" / f"{label or self.cfg['method']['name']}-{key}.safetensors"

    def _step_dirs(self) -> list[Path]:
        return sorted(self.root.glob("step-*"), key=lambda p: int(p.name.split("-")[1]))

    def _save(self, unet, opt, ema, step: int, history: list[float], keep_previous=False, only_if_new=False) -> None:
        """The resumable state after ``step`` (rank 0 writes it), then the data source is told of it."""
        target = self.root / f"step-{step:07d}"
        if not self.ranks.main:
            self._checkpointed(step)
            return
        if only_if_new and (target.exists() or step == 0):
            return
        tmp = self.root / f".tmp-step-{step:07d}"
        with writing(self.root):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(trainable_state(unet, self.trainable), tmp / "weights.safetensors")
            tensors, opt_meta = _optimizer_tensors(opt)
            save_file(tensors, tmp / "optimizer.safetensors")
            if ema is not None:
                save_file({k: v.contiguous() for k, v in ema.items()}, tmp / "ema.safetensors")
            extra = self.method.extra_state()
            if extra:
                save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, tmp / "method.safetensors")
            write_json(tmp / "state.json", {"step": step, "history": history, "optimizer": opt_meta})
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        if not keep_previous:
            for old in self._step_dirs():
                if old != target:
                    shutil.rmtree(old, ignore_errors=True)
        self._checkpointed(step)

    def _checkpointed(self, step: int) -> None:
        """Tell the data source that a resume starts at ``step`` at the earliest (online rounds before it go)."""
        hook = getattr(self.data_source, "checkpointed", None)
        if hook is not None:
            hook(step)

    def _resume(self, unet, opt, ema) -> tuple[int, list[float]]:
        dirs = [d for d in self._step_dirs() if (d / "state.json").exists()]
        if not dirs:
            return 0, []
        last = dirs[-1]
        state = json.loads((last / "state.json").read_text())
        copy_weights(unet, load_file(last / "weights.safetensors"))
        _load_optimizer(opt, load_file(last / "optimizer.safetensors"), state["optimizer"])
        if ema is not None and (last / "ema.safetensors").exists():
            ema.update(load_file(last / "ema.safetensors"))
        if (last / "method.safetensors").exists():
            self.method.load_extra_state(load_file(last / "method.safetensors"))
        log.info("resuming training from %s (step %d)", last, state["step"])
        return int(state["step"]), list(state["history"])

    def _eval_weights(self, unet, ema) -> dict[str, torch.Tensor]:
        """The weights a checkpoint is evaluated with: the EMA where there is one."""
        return {k: v.detach().clone().contiguous() for k, v in ema.items()} if ema is not None else trainable_state(unet, self.trainable)

    def _write_weights(self, folder: Path, weights: dict, steps: int, history: list[float], lora: bool, data_manifest: dict | None) -> None:
        """An evaluable checkpoint folder (weights.safetensors + train.json), written atomically."""
        tc = self.train_cfg
        tmp = folder.with_name(f".tmp-{folder.name}")
        first, last = (history[0], history[-1]) if history else (None, None)
        with writing(folder.parent):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_file(weights, tmp / "weights.safetensors")
            write_json(
                tmp / "train.json",
                {
                    "train_id": self.train_id,
                    "method": self.cfg["method"]["name"],
                    "lora_rank": int(tc["lora_rank"]) if lora else 0,
                    "lora_alpha": float(tc["lora_alpha"]) if lora else 0.0,
                    "lora_targets": list(self.model.lora_targets) if lora else None,
                    "steps": int(steps),
                    "data": data_manifest,
                    "loss_first": first,
                    "loss_last": last,
                    "history": history,
                },
            )
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)

    def _keep(self, unet, ema, step: int, history: list[float], lora: bool) -> None:
        """Keep this step's evaluation weights beside the run (``train.keep_checkpoints``): a protocol
        that chooses a checkpoint by a metric (LaSRO: the lowest FID) evaluates every one of them."""
        if self.ranks.main:
            self._write_weights(self.root / "kept" / f"step-{step:07d}", self._eval_weights(unet, ema), step, list(history), lora, None)

    def _finish(self, unet, ema, history, lora: bool, data_manifest: dict) -> Checkpoint:
        tc = self.train_cfg
        weights = self._eval_weights(unet, ema)
        if ema is not None:
            copy_weights(unet, ema)
        final = self.root / "final"
        if self.ranks.main:
            self._write_weights(final, weights, int(tc["steps"]), history, lora, data_manifest)
            for old in self._step_dirs():
                shutil.rmtree(old, ignore_errors=True)
        self.ranks.barrier()  # the checkpoint every rank returns is on disk
        return Checkpoint(final, self.train_id)
