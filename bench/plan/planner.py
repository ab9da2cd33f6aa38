"""``bench plan``: what a command will do and the GPU memory it will need, without loading a weight.

The config is composed exactly as ``bench run`` / ``train`` / ``eval`` compose it (protocol cells
included). The work is counted from the config and the method's ``plan`` hook (``bench.plan.work.Work``:
UNet passes with and without gradient per micro-batch, per round of on-policy sampling and for the
data made before training). The memory is a sum of terms, each from the real architectures
(``bench.plan.arch``: parameter counts of the networks built on the meta device) and measured
activation profiles (``bench.plan.profile``):

* weights: the training model in float32 (``Session.train`` moves it there; mixed precision is
  autocast), a frozen copy of the UNet for full fine-tuning, the reward and, for ``bench run``, the
  evaluation metrics (``bench.metrics`` keeps every loaded scorer for the process), each as
  ``bench.metrics`` holds it (float16 on CUDA); for evaluation the whole pipeline in ``gen.dtype``;
* trainable parameters: their gradients (float32), the optimizer's state (AdamW: two float32 moments;
  8-bit AdamW: two 1-byte moments plus a float32 scale per 256, float32 for tensors under 4,096
  elements; Adafactor without momentum: factored row and column second moments), an EMA copy, and
  AdamW's ``foreach`` step, which makes a float32 temporary of every moment at once;
* activations: per micro-batch, what its gradient-carrying passes keep for the backward (all of them
  are held until the one backward), then the larger of the backward's own peak and the passes made
  without gradient meanwhile; for sampling and evaluation, the peak of one UNet pass without gradient
  and of one VAE decode at the batch they run at.

Phases (data preparation, a round of sampling, a micro-batch, the optimizer step, evaluation) are
estimated separately and the peak is the largest. What is not in it: the CUDA context and the caching
allocator's fragmentation (``torch.cuda.max_memory_allocated`` is what is estimated; a card sold as
80 GB holds 80 GiB = 85.9 GB, and the estimate is held to 80 GB), kernel workspaces (cuBLAS, cuDNN),
the text encoders' and the rewards' activations (77 tokens, 224 px images), and what the notes of a
method's plan name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import UsageError
from bench.plan.work import PlanContext, Passes, Work

GB = 1e9
LIMIT = 80e9  # one 80 GB GPU, in 10^9 bytes (see the module docstring)
BYTES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2}


# ---- the result ---------------------------------------------------------------------------------
@dataclass
class Phase:
    name: str
    terms: list[tuple[str, int]] = field(default_factory=list)

    def add(self, label: str, nbytes: int | float) -> "Phase":
        if nbytes:
            self.terms.append((label, int(nbytes)))
        return self

    @property
    def total(self) -> int:
        return sum(b for _, b in self.terms)


@dataclass
class Plan:
    command: str
    args: list[str]
    device: str
    sections: list[tuple[str, list[str]]] = field(default_factory=list)
    phases: list[Phase] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.total)

    @property
    def peak_bytes(self) -> int:
        return self.peak.total

    @property
    def fits(self) -> bool:
        return self.peak_bytes < LIMIT

    def text(self) -> str:
        return render(self)


# ---- composing the command ----------------------------------------------------------------------
def preset_commands() -> list[list[str]]:
    """``bench plan`` arguments of every method preset that names its base model (the paper and
    official presets), with what the preset needs to run at all: a DreamBench subject for the
    customization presets."""
    from bench.config import load_entry_config
    from bench.plan.arch import is_flow_model
    from bench.registry import METHODS, MODELS

    out = []
    for name in sorted(METHODS.names()):
        cfg = load_entry_config(METHODS, name)
        if not cfg.get("base_model") or is_flow_model(load_entry_config(MODELS, str(cfg["base_model"]))):  # no memory model of them yet
            continue
        extra = ["suite=dreambench", "subject=dog"] if "dreambooth" in str(cfg.get("recipe", "")) or name.startswith("pso-dreambooth") else []
        out.append([f"method={name}", *extra])
    return out


def _device(cfg: dict) -> str:
    name = str(cfg.get("device") or "auto")
    if name == "auto" or name.startswith("cuda"):
        return "cuda"  # a plan is for the GPU the command will run on
    return name


def make_plan(command: str, args: list[str], profiles=None) -> Plan:
    """The plan of ``bench <command> <args>`` (command: run, train or eval)."""
    from bench.config import compose, to_dict
    from bench.io import cache_root
    from bench.plan.store import Profiles

    if command not in ("run", "train", "eval"):
        raise UsageError(f"bench plan plans run, train or eval commands, not {command!r}")
    train = command in ("run", "train")
    protocol = any(a.startswith("protocol=") for a in args)
    require = ("method",) if train else ()
    if protocol:
        require = (*require, "protocol")
    cfg = to_dict(compose(args, require=require))
    cells = [None]
    if protocol and command != "train":
        cells = protocol_cells(cfg, args)
    cell_cfgs = [to_dict(compose(args, cell=c)) for c in cells] if cells != [None] else [cfg]
    base_cfg = cell_cfgs[0]
    profiles = profiles or Profiles(cache_root(base_cfg))
    plan = Plan(command, list(args), _device(base_cfg))
    planner = _Planner(plan, base_cfg, profiles)
    p = base_cfg.get("protocol") or {}
    if p.get("per_subject") and not base_cfg.get("subject"):
        planner.one_subject = True  # a per-subject protocol trains once per subject: one subject's training is planned
        plan.notes.append("a per-subject protocol trains once per subject: the training planned here is one subject's, and every subject repeats it")
    select = (p.get("checkpoint") or {}).get("select", "final") if p else "final"
    if select != "final" and command == "run":
        every = int((p.get("checkpoint") or {}).get("every") or base_cfg["train"]["save_every"])
        planner.tuned_models = int(base_cfg["train"]["steps"]) // every + (1 if int(base_cfg["train"]["steps"]) % every else 0)
        plan.notes.append(f"protocol {p['name']} evaluates every kept checkpoint (one per {every} steps and the final one): {planner.tuned_models} tuned models")
    planner.header(cell_cfgs)
    resident_metrics: list[str] = []
    if command in ("run", "eval"):
        resident_metrics = planner.evaluation(cell_cfgs, trained=command == "run", protocol=protocol)
    if train:
        planner.training(resident_metrics if command == "run" else [])
    method = base_cfg.get("method") or {}
    plan.differences = [str(d) for d in method.get("code_differences") or []]
    return plan


def protocol_cells(cfg: dict, args: list[str]) -> list[dict]:
    """The protocol's cells (``bench.protocol.expand``), without listing a DreamBench folder: a
    per-subject protocol plans one subject's cells (every subject repeats them)."""
    from bench.protocol import expand, validate

    p = validate(cfg["protocol"])
    if p.get("per_subject") and not cfg.get("subject"):
        import copy

        single = copy.deepcopy(cfg)
        single["protocol"]["per_subject"] = False
        return [dict(c, per_subject=True) for c in expand(single, args)]
    return expand(cfg, args)


# ---- counting without downloading -----------------------------------------------------------------
def prompt_rows(spec, base: Path, cache: Path) -> int | None:
    """Rows of a prompt source that is on disk (a file, or a URL already in the cache); None otherwise."""
    from bench.suite import prompt_url_path, read_prompt_rows

    if spec is None or isinstance(spec, dict):
        return None
    spec = str(spec)
    if spec.startswith(("https://", "http://", "file://")):
        path = prompt_url_path(spec, cache)
    else:
        path = Path(spec) if Path(spec).is_absolute() else base / spec
    try:
        return len(read_prompt_rows(path)) if path.is_file() else None
    except Exception:
        return None


def suite_prompts(suite: dict, subject: str | None, cache: Path) -> tuple[int | None, str]:
    """(evaluation prompts, where the count comes from), with ``suite.limit`` applied."""
    limit = suite.get("limit")
    base = Path(suite.get("_dir") or ".")
    if suite.get("kind") == "dreambench":
        per = int(suite.get("prompts_per_subject") or 25)
        subjects = suite.get("subjects")
        count = len(subjects) if subjects else int((suite.get("canonical") or {}).get("count", 750)) // 25
        n = per * (1 if subject else count)
        return (min(n, int(limit)) if limit else n), (f"subject {subject}: {per} prompts" if subject else f"{count} subjects x {per} prompts")
    sets = suite.get("prompt_sets")
    if suite.get("source") and not sets:
        n = prompt_rows(suite["source"], Path.cwd(), cache)
        where = f"suite.source {suite['source']}"
    else:
        n = prompt_rows(suite.get("prompts"), base, cache) if not sets else None
        where = "prompt file"
    if n is None:
        canonical = (suite.get("canonical") or {}).get("count")
        n = int(canonical) if canonical else None
        where = "published count" if canonical else "count unknown offline"
    if n is not None and limit:
        n = min(n, int(limit) * (len(sets) if sets else 1))
        where += f", suite.limit={limit}" + (" per set" if sets else "")
    return n, where


def _fmt(n) -> str:
    return "?" if n is None else f"{int(n):,}"


def gb(nbytes) -> str:
    return f"{nbytes / GB:.1f}"


def size(nbytes) -> str:
    """Bytes as GB (10^9) down to 1 GB, as MB below."""
    return f"{nbytes / GB:.1f} GB" if abs(nbytes) >= GB else f"{nbytes / 1e6:.1f} MB"


# ---- the planner --------------------------------------------------------------------------------
@dataclass
class TrainingSetup:
    """What the training plan is computed from: the recipe, its batch split, sampler and work."""

    tc: dict
    method_cfg: dict
    method: object
    micro: int
    accum: int
    sampler: object
    cfg_pass: int
    lora: int
    prompts: int | None
    reward: str | None
    work: Work | None
    mp: str

    @property
    def every(self) -> Passes:
        """All the work of one micro-batch (its passes and what runs before them)."""
        return self.work.micro + self.work.before if self.work.before is not None else self.work.micro


class _Planner:
    def __init__(self, plan: Plan, cfg: dict, profiles):
        from bench.io import cache_root
        from bench.plan.arch import model_architecture

        self.plan, self.cfg, self.profiles = plan, cfg, profiles
        self.device = plan.device
        self.cache = cache_root(cfg)
        self.arch = model_architecture(cfg["model"])
        from bench.plan.arch import parameter_count

        self.params = {role: parameter_count(c) for role, c in self.arch.components.items()}
        self.one_subject = False
        self.tuned_models = 1

    # ---- profiles ----
    def grad_profile(self, setting, lora: int | None, checkpointing: bool) -> dict:
        from bench.plan import store
        from bench.trainer import LORA_TARGETS

        return store.unet_training(self.profiles, self.arch.unet, self.arch.latent_side, setting, lora, LORA_TARGETS, checkpointing)

    def forward_profile(self, setting) -> dict:
        from bench.plan import store

        return store.unet_forward(self.profiles, self.arch.unet, self.arch.latent_side, setting)

    def decode_profile(self, setting) -> dict:
        from bench.plan import store

        return store.vae_decode(self.profiles, self.arch.components["vae"], self.arch.latent_side, setting)

    def encode_profile(self, setting) -> dict:
        from bench.plan import store

        return store.vae_encode(self.profiles, self.arch.components["vae"], self.arch.resolution, setting)

    def transient(self, stage: Passes | None, setting) -> tuple[int, str]:
        """The larger of the peaks of the stage's largest pass without gradient and largest decode / encode."""
        if stage is None:
            return 0, ""
        options = [(0, "")]
        n = Passes.largest(stage.nograd)
        if n:
            f = self.forward_profile(setting)
            options.append((f["const"] + f["per_sample"] * n, f"a UNet pass without gradient, {n} samples"))
        n = Passes.largest(stage.decode)
        if n:
            d = self.decode_profile(setting)
            options.append((d["const"] + d["per_sample"] * n, f"a VAE decode of {n} images"))
        n = Passes.largest(stage.encode)
        if n:
            e = self.encode_profile(setting)
            options.append((e["const"] + e["per_sample"] * n, f"a VAE encode of {n} images"))
        return max(options)

    # ---- weights ----
    def pipeline_bytes(self, dtype: str) -> list[tuple[str, int]]:
        b = BYTES[dtype]
        out = [(f"UNet weights ({dtype}, {self.params['unet']:,} parameters)", self.params["unet"] * b)]
        encoders = [r for r in ("text_encoder", "text_encoder_2") if r in self.params]
        n = sum(self.params[r] for r in encoders)
        out.append((f"text encoder{'s' if len(encoders) > 1 else ''} ({dtype}, {n:,})", n * b))
        out.append((f"VAE ({dtype}, {self.params['vae']:,})", self.params["vae"] * b))
        return out

    def metric_term(self, names: list[str], label: str) -> tuple[str, int] | None:
        from bench.plan.arch import shared_metric_bytes

        names = [n for n in dict.fromkeys(names) if n]
        if not names:
            return None
        total, unknown = shared_metric_bytes(names, self.device)
        if unknown:
            self.plan.notes.append(f"no architecture on file for the weights of {', '.join(unknown)}: not in the estimate")
        return (f"{label} ({', '.join(names)})", total) if total else None

    # ---- sections ----
    def header(self, cells: list[dict]) -> None:
        cfg = self.cfg
        lines = [
            f"model {cfg['model']['name']}: {', '.join(f'{r} {c.name}' for r, c in self.arch.components.items())}; {self.arch.resolution} px, latents {self.arch.latent_side}x{self.arch.latent_side}",
            f"device {self.device} (the plan is for it; no weights are loaded and nothing is downloaded)",
        ]
        if cfg.get("method"):
            lines.insert(0, f"method {cfg['method']['name']}" + (f" ({cfg['method'].get('description')})" if cfg["method"].get("description") else ""))
        if cfg.get("protocol"):
            lines.append(f"protocol {cfg['protocol']['name']}: {len(cells)} evaluation cell(s)" + (" per subject" if cells and cells[0].get("per_subject") else ""))
        self.plan.sections.append(("command", lines))

    def eval_dtype(self, cfg: dict) -> str:
        name = cfg["gen"]["dtype"]
        if name == "auto":
            return "float16" if self.device == "cuda" else "float64"
        return name

    def evaluation(self, cells: list[dict], trained: bool, protocol: bool) -> list[str]:
        from bench.models import make_sampler
        from bench.plan import profile

        lines, metrics = [], []
        models = 1 + self.tuned_models if trained else 1
        total_images = total_forwards = 0
        worst = None
        for cfg in cells:
            suite = cfg["suite"]
            n, where = suite_prompts(suite, cfg.get("subject"), self.cache)
            per = int(suite.get("images_per_prompt") or 1)
            sampler = make_sampler(cfg["model"]["sampler"], cfg["gen"]["steps"], cfg["gen"]["guidance"])
            cfg_pass = 2 if sampler.guidance > 1.0 and not self.arch.guidance_embedded() else 1
            batch = int(cfg["gen"]["batch_size"])
            images = None if n is None else n * per
            forwards = None if images is None else images * sampler.steps * cfg_pass
            cell = (cfg.get("protocol") or {}).get("cell") or {}
            label = f"{suite['name']}" + (f" ({cell.get('variant')}, seed {cell.get('seed')})" if cell else "")
            guidance = f"guidance {sampler.guidance:g}" + (" (classifier-free: 2 passes per step)" if cfg_pass == 2 else " (embedded in the UNet)" if sampler.guidance > 1 else " (no CFG)")
            lines.append(
                f"{label}: {_fmt(n)} prompts ({where}) x {per} image(s) = {_fmt(images)} images per model; "
                f"{sampler.kind} {sampler.steps} steps, {guidance}: {sampler.steps * cfg_pass} UNet passes per image, "
                f"{_fmt(forwards)} per model; batch {batch} ({batch * cfg_pass} samples per UNet call), {self.arch.resolution} px, {self.eval_dtype(cfg)}"
            )
            metrics += list(suite.get("metrics") or [])
            total_images += images or 0
            total_forwards += forwards or 0
            if worst is None or batch * cfg_pass > worst[0]:
                worst = (batch * cfg_pass, batch, cfg)
        evaluated = f"{models} models (the base and {self.tuned_models} tuned)" if trained else "the base model"
        lines.append(f"in all: {total_images * models:,} images and {total_forwards * models:,} UNet sample-passes for {evaluated}; metrics {', '.join(dict.fromkeys(metrics))}")
        self.plan.sections.append(("evaluation", lines))

        samples, batch, cfg = worst
        dtype = self.eval_dtype(cfg)
        setting = profile.Setting(dtype)
        phase = Phase("evaluation")
        for label, b in self.pipeline_bytes(dtype):
            phase.add(label, b)
        term = self.metric_term(metrics, "metrics' weights")
        if term:
            phase.add(*term)
        stage = Passes(nograd=[(samples, 1)], decode=[(batch, 1)])
        t, why = self.transient(stage, setting)
        phase.add(f"working memory: {why}", t)
        self.plan.phases.append(phase)
        return list(dict.fromkeys(metrics))

    def training(self, resident_metrics: list[str]) -> None:
        """The training section (what one micro-batch, one round and the prepared data cost, over the
        run) and its memory phases, from the recipe's ``plan`` hook."""
        t = self.training_setup()
        if t.work is None:
            self.plan.sections.append(("training", [f"method {t.method_cfg['name']} gives no plan (its recipe has no `plan` hook)"]))
            return
        self.plan.sections.append(("training", self.training_lines(t)))
        self.training_memory(t, resident_metrics)

    def training_setup(self) -> TrainingSetup:
        from bench.models import make_sampler
        from bench.plan import arch
        from bench.registry import METHODS
        from bench.config import import_recipe
        from bench.trainer import micro_batches, mixed_precision

        cfg = self.cfg
        method_cfg = dict(cfg["method"])
        METHODS.entry(str(method_cfg.get("_path") or method_cfg["name"]))
        cls = import_recipe(method_cfg)
        tc = cfg["train"]
        targets, reward = self.targets_and_reward(method_cfg)
        method = cls(method_cfg)
        micro, accum = micro_batches(tc, method.splits_micro_batches, method_cfg["name"])
        sampler = make_sampler({**cfg["model"]["sampler"], **(tc.get("sampler") or {})})
        cfg_pass = 2 if sampler.guidance > 1.0 and not self.arch.guidance_embedded() else 1
        lora = int(tc["lora_rank"] or 0) if tc["lora_rank"] and not tc["full_finetune"] else 0
        data = cfg.get("data") or {}
        unet = self.arch.unet
        if targets == 0:  # not known without reading them: one micro-batch of them stands for the data made from them
            targets = micro
        prompts = targets if targets is not None else self.train_prompt_count(method_cfg)
        p = PlanContext(
            batch_size=micro, grad_accum=accum, steps=int(tc["steps"]), sampler_steps=int(sampler.steps), cfg=cfg_pass,
            sample_batch_size=int(cfg["gen"]["batch_size"]), prompts=prompts, images=targets, dataset=data.get("kind", "pairs") == "pairs" and bool(data),
            full_finetune=not lora, unet_parameters=self.params["unet"],
            part_parameters=lambda prefixes, backbone=None: arch.part_parameters(arch.backbone_unet(backbone, unet), prefixes),
        )
        mp = mixed_precision(tc["mixed_precision"], self.device, bf16_supported=True)
        return TrainingSetup(tc, method_cfg, method, micro, accum, sampler, cfg_pass, lora, prompts, reward, method.plan(p), mp)

    def training_lines(self, t: TrainingSetup) -> list[str]:
        """The training section's lines: the steps, the sampler, what trains, one micro-batch and the
        run's totals, one round, the data prepared once, the reward and the recipe's notes."""
        from bench.trainer import LORA_TARGETS

        tc, work, accum, micro, steps, every = t.tc, t.work, t.accum, t.micro, int(t.sampler.steps), t.every
        optimizer_steps = int(tc["steps"])
        per_step = f"{accum} micro-batches of {micro}" if accum > 1 else f"one micro-batch of {micro}"
        lines = [
            f"{optimizer_steps:,} optimizer steps of {int(tc['batch_size']) * int(tc['grad_accum']):,} units (train.batch_size {tc['batch_size']} x grad_accum {tc['grad_accum']}"
            + (f", train.micro_batch_size {tc['micro_batch_size']}" if tc.get("micro_batch_size") else "") + f"): {per_step} per step, {optimizer_steps * accum:,} micro-batches in all",
            f"training sampler: {t.sampler.kind}, {steps} steps ({max(steps - 1, 0)} stochastic), guidance {t.sampler.guidance:g}" + (" with CFG" if t.cfg_pass == 2 else ""),
            f"{'LoRA rank ' + str(t.lora) + ' on ' + '/'.join(LORA_TARGETS) if t.lora else 'full fine-tuning (a frozen copy of the UNet is the reference)'}; "
            f"optimizer {tc['optimizer']}; mixed precision {t.mp}; gradient checkpointing {'on' if tc['gradient_checkpointing'] else 'off'}"
            + (f"; EMA {tc['ema_decay']}" if tc.get("ema_decay") else ""),
            self.describe("one micro-batch", every),
            f"over the run: {optimizer_steps * accum * Passes.total(every.grad):,} UNet sample-passes with gradient, "
            f"{optimizer_steps * accum * Passes.total(every.nograd):,} without (reference, in-loss sampling)"
            + (f", {optimizer_steps * accum * Passes.total(every.encode):,} VAE encodes" if every.encode else ""),
        ]
        if work.round is not None and work.steps_per_round:
            rounds = math.ceil(optimizer_steps / work.steps_per_round)
            lines.append(self.describe(f"one round (every {work.steps_per_round:g} optimizer steps at most, {rounds:,} rounds at least)" if "at most" in " ".join(work.notes) else f"one round (every {work.steps_per_round:g} optimizer steps, {rounds:,} rounds)", work.round))
            lines.append(
                f"over the run: {rounds * work.round.samples:,} trajectories, {rounds * Passes.total(work.round.nograd):,} UNet sample-passes, "
                f"{rounds * work.round.rewards:,} reward evaluations"
            )
        if work.prepare is not None and (work.prepare.nograd or work.prepare.encode or work.prepare.samples):
            lines.append(self.describe("data prepared once", work.prepare) + ("" if t.prompts is not None else " (per training prompt: their count is unknown offline)"))
        if t.reward:
            lines.append(f"reward {t.reward}")
        return lines + [f"note: {n}" for n in work.notes]

    def training_memory(self, t: TrainingSetup, resident_metrics: list[str]) -> None:
        """The phases of training: data preparation, round sampling, a micro-batch, the optimizer step."""
        from bench.plan import arch, profile
        from bench.trainer import LORA_TARGETS

        tc, work = t.tc, t.work
        train_setting = profile.Setting("float32", {"bf16": "bfloat16", "fp16": "float16", "no": None}.get(t.mp, None))
        shapes = arch.trainable_shapes(self.arch.unet, t.lora, LORA_TARGETS)
        trainable = sum(arch._numel(s) for s in shapes)
        static = Phase("static")
        for label, b in self.pipeline_bytes("float32"):
            static.add(label, b)
        if t.lora:
            static.add(f"LoRA adapters (float32, {trainable:,})", trainable * 4)
        elif t.method.uses_reference:
            static.add("frozen reference UNet (float32)", self.params["unet"] * 4)
        term = self.metric_term([*resident_metrics, t.reward], "reward and loaded metrics' weights" if resident_metrics else "reward's weights")
        if term:
            static.add(*term)
        for label, n, per in work.networks:
            static.add(f"{label}: {n:,} parameters", n * per)
        opt, opt_label, opt_tmp = optimizer_bytes(str(tc["optimizer"]), shapes)
        state = Phase("state").add(opt_label, opt)
        if tc.get("ema_decay"):
            state.add("EMA of the trained weights (float32)", trainable * 4)
        grads = ("gradients (float32)", trainable * 4)
        if work.prepare is not None:
            b, why = self.transient(work.prepare, profile.Setting("float32"))
            if b:
                self.plan.phases.append(Phase("data preparation", list(static.terms)).add(f"working memory: {why} (float32, no autocast)", b))
        if work.round is not None:
            b, why = self.transient(work.round, train_setting)
            self.plan.phases.append(Phase("round sampling", static.terms + state.terms).add(f"working memory: {why}", b))
        phase = Phase("training micro-batch", static.terms + state.terms + [grads])
        phase.terms += self.micro_batch_terms(t, train_setting)
        self.plan.phases.append(phase)
        step = Phase("optimizer step", static.terms + state.terms + [grads])
        step.add(f"optimizer step temporaries ({tc['optimizer']})", opt_tmp)
        self.plan.phases.append(step)
        if t.every.grad_decode:
            self.plan.notes.append("the VAE decoder's activations with gradient (reward back-propagation) are not in the estimate")

    def micro_batch_terms(self, t: TrainingSetup, train_setting) -> list[tuple[str, int]]:
        """What a training micro-batch holds at its peak above the static state: the activations its
        gradient-carrying passes keep plus the largest transient, or the work done before them alone
        when that is larger."""
        from bench.plan import arch, store

        work, tc, unet = t.work, t.tc, self.arch.unet
        during: list[tuple[str, int]] = []  # what the micro-batch's passes hold at their peak
        if work.micro.grad:
            g = self.grad_profile(train_setting, t.lora, bool(tc["gradient_checkpointing"]))
            samples, passes = Passes.total(work.micro.grad), sum(c for _, c in work.micro.grad)
            largest = Passes.largest(work.micro.grad)
            held = g["per_region"] + passes * g["per_pass"] + samples * g["per_sample"]
            fw_extra = g["forward_const"] + g["forward_per_sample"] * largest
            backward = g["backward_const"] + g["backward_per_sample"] * largest
            nograd, why = self.transient(Passes(nograd=work.micro.nograd, decode=work.micro.decode), train_setting)
            peak_extra, what = max(
                (fw_extra, f"the peak of the last forward above what it keeps ({largest} samples)"),
                (backward, f"the backward's peak above what the forwards keep ({largest} samples)"),
                (nograd, why),
            )
            during += [(f"activations kept for the backward ({samples} sample-passes in {passes} pass(es))", held), (f"working memory: {what}", peak_extra)]
        alone: list[tuple[str, int]] = []  # work done before the passes, with nothing of theirs alive
        if work.before is not None:
            b, why = self.transient(work.before, train_setting)
            alone.append((f"working memory: {why} (before the micro-batch's gradient-carrying passes)", b))
        for label, backbone, n, kept in work.trained_encoders:
            enc = arch.backbone_unet(backbone, unet)
            g = store.unet_encoder_training(self.profiles, enc, self.arch.latent_side, train_setting, bool(tc["gradient_checkpointing"]))
            b = g["per_region"] + g["per_pass"] + g["per_sample"] * n + g["backward_const"] + g["backward_per_sample"] * n
            (during if kept else alone).append((f"{label}: {enc.name}'s encoder on {n} samples with gradient", b))
        if not (during or alone):
            return []
        if max((b for _, b in alone), default=0) > sum(b for _, b in during):
            return [max(alone, key=lambda term: term[1])]
        return during

    def describe(self, what: str, stage: Passes) -> str:
        parts = []
        if stage.samples:
            parts.append(f"{stage.samples:,} samples")
        passes = []
        if stage.grad:
            passes.append(f"{Passes.total(stage.grad):,} with gradient ({_calls(stage.grad)})")
        if stage.nograd:
            passes.append(f"{Passes.total(stage.nograd):,} without ({_calls(stage.nograd)})")
        if passes:
            parts.append("UNet sample-passes " + ", ".join(passes))
        if stage.decode or stage.grad_decode:
            parts.append(f"{Passes.total(stage.decode) + stage.grad_decode:,} VAE decodes")
        if stage.encode:
            parts.append(f"{Passes.total(stage.encode):,} VAE encodes")
        if stage.rewards:
            parts.append(f"{stage.rewards:,} reward evaluations")
        return f"{what}: " + ("; ".join(parts) if parts else "nothing")

    def targets_and_reward(self, method_cfg: dict) -> tuple[int | None, str | None]:
        """(target images or None, the reward) as ``Session.resolve_method`` decides them."""
        cfg, suite = self.cfg, self.cfg["suite"]
        data = cfg.get("data") or {}
        dreambench = suite.get("kind") == "dreambench"
        if dreambench and not cfg.get("subject") and not self.one_subject:
            raise UsageError(f"suite '{suite['name']}' covers several subjects: set subject=NAME to fine-tune on one")
        has_targets = data.get("kind") == "images" or dreambench
        targets = None
        if has_targets:
            self.plan.notes.append("the number of target images is not known without reading them: data preparation is counted for one micro-batch of them")
            targets = 0
        reward = method_cfg.get("reward") if "reward" in method_cfg else None
        if "reward" in method_cfg and reward is None and not has_targets:
            reward = suite.get("reward")
            if reward is None:
                raise UsageError(f"method '{method_cfg['name']}' needs a reward and suite '{suite['name']}' names none: set method.reward=NAME")
        if data or (has_targets and not method_cfg.get("reward")):
            reward = None
        return targets, reward

    def train_prompt_count(self, method_cfg: dict) -> int | None:
        spec = method_cfg.get("train_prompts")
        if spec:
            return prompt_rows(spec, Path.cwd(), self.cache)
        suite = self.cfg["suite"]
        return prompt_rows(suite.get("train_prompts"), Path(suite.get("_dir") or "."), self.cache)


def _calls(calls: list) -> str:
    """(samples per call, calls) as "calls x samples", equal call sizes merged."""
    merged: dict[int, int] = {}
    for n, c in calls:
        if c:
            merged[n] = merged.get(n, 0) + c
    return ", ".join(f"{c:,} x {n}" for n, c in merged.items())


def optimizer_bytes(name: str, shapes) -> tuple[int, str, int]:
    """(state bytes, a label, the step's temporaries) of ``bench.trainer.make_optimizer``'s optimizer."""
    from bench.plan.arch import _numel

    sizes = [_numel(s) for s in shapes]
    n = sum(sizes)
    if name == "adamw":
        return 8 * n, "AdamW state (two float32 moments)", 4 * n  # the foreach step's float32 temporary of every moment
    if name == "adamw8bit":
        state = sum((2 + 8 / 256) * k if k >= 4096 else 8 * k for k in sizes)  # bitsandbytes: 8-bit blockwise moments for tensors of 4,096+ elements
        return int(state), "8-bit AdamW state (bitsandbytes)", 0
    if name == "adafactor":
        state = 0
        for s in shapes:
            if len(s) >= 2:  # factored second moment: a row and a column vector (no first moment: beta1 is None)
                state += 4 * (_numel(s[:-1]) + _numel(s[:-2]) * s[-1])
            else:
                state += 4 * _numel(s)
        return state, "Adafactor state (factored second moments)", 4 * 2 * max(sizes, default=0)
    return 8 * n, f"{name} state (assumed like AdamW)", 4 * n


# ---- rendering ----------------------------------------------------------------------------------
def render(plan: Plan) -> str:
    out = []
    for title, lines in plan.sections:
        out.append(f"{title}:")
        out += [f"  {line}" for line in lines]
    out.append("estimated peak GPU memory (GB = 10^9 bytes; torch.cuda.max_memory_allocated):")
    width = max(len(p.name) for p in plan.phases) if plan.phases else 0
    for p in plan.phases:
        out.append(f"  {p.name:<{width}}  {size(p.total):>9}")
    peak = plan.peak
    out.append(f"  peak: {size(peak.total)} in {peak.name}, under one 80 GB GPU ({gb(LIMIT - peak.total)} GB to spare)" if plan.fits
               else f"  peak: {size(peak.total)} in {peak.name}, OVER one 80 GB GPU by {gb(peak.total - LIMIT)} GB: lower train.micro_batch_size or gen.batch_size")
    for label, b in sorted(peak.terms, key=lambda t: -t[1]):
        out.append(f"    {size(b):>9}  {label}")
    for note in dict.fromkeys(plan.notes):
        out.append(f"  note: {note}")
    if plan.differences:
        out.append("where the preset differs from the authors' code:")
        out += [f"  - {d}" for d in plan.differences]
    elif plan.command in ("run", "train"):
        out.append("where the preset differs from the authors' code: nothing recorded (method code_differences)")
    return "\n".join(out)
