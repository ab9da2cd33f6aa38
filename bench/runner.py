"""The data flow: config -> train (cached) -> generate (content-addressed) -> score -> compare.

Every stage writes atomically and is keyed by what determines it, so a killed
command restarts where it stopped and ends with the same bytes.
"""

from __future__ import annotations

import json
import logging
import platform
import subprocess
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pandas as pd
import torch
from omegaconf import OmegaConf

from bench import report
from bench.distribution import FeatureRecorder, SetScorer, real_set
from bench.config import compose, import_recipe, stable_hash, to_dict
from bench.errors import DataError, UsageError
from bench.html_report import write_report
from bench.generate import GenerationStats, ImageJob, ImageStore, plan_images
from bench.generate import generate as generate_missing
from bench.images import TargetImages, images_from_files, read_captioned_images
from bench.io import cache_root, write_json, write_text
from bench.models import DiffusionModel, load_model, make_sampler, sampler_identity
from bench.metrics import DistributionMetric, Metric
from bench.method import Method
from bench.registry import METHODS, METRICS
from bench.schema import parse_shard
from bench.ranks import current as current_ranks
from bench.scoring import ID_COLUMNS, load_metrics, make_metric, score_frame, score_images, write_scores
from bench.suite import Suite, load_suite, prompts_of, read_prompt_source
from bench.trainer import Checkpoint, Trainer, apply_checkpoint
from bench.trainlog import train_log_path

log = logging.getLogger(__name__)
PACKAGES = ["diffusion-bench", "torch", "diffusers", "transformers", "peft", "accelerate", "numpy", "pandas", "pyarrow", "pillow", "safetensors"]


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The device of ``device=NAME``; under a launcher (``local_rank``), plain ``cuda`` is this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device={name} but no CUDA device is visible; use device=cpu")
    if name == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(name)


def read_result(run_dir: Path) -> RunResult:
    """A finished run folder's result, as rank 0 wrote it (what the other ranks return)."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    return RunResult(run_dir, json.loads((run_dir / "summary.json").read_text()), (run_dir / "table.md").read_text().rstrip("\n"), manifest.get("timings", {}))


def generation_dtype(name: str, device: torch.device) -> torch.dtype:
    """float64 on CPU makes images exactly independent of batch size (float32 kernels are not)."""
    if name == "auto":
        return torch.float64 if device.type == "cpu" else torch.float16
    try:
        return {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise UsageError(f"unknown gen.dtype '{name}': use auto, float64, float32, float16 or bfloat16") from None


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_revision() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


@dataclass
class RunResult:
    run_dir: Path
    summary: dict
    table: str
    timings: dict


@dataclass(frozen=True)
class RunIdentity:
    """What determines a run's numbers. Its hash names the run folder and the manifest is written
    from it, so the folder name and the record cannot disagree."""

    model: dict
    sampler: dict
    checkpoint: str | None
    suite: str
    prompts_sha256: str
    images_per_prompt: int
    metrics: tuple[str, ...]
    seed: int
    dtype: str
    stats: dict
    baseline: str | None = None  # the run folder compared against
    references_sha256: str | None = None  # a suite's reference photos (DreamBench)
    real_images: dict | None = None  # the real set of set-level metrics, with its resolution
    scorers: str = "official"
    protocol: dict | None = None  # the protocol cell (``bench.protocol``), its overrides included

    def as_dict(self) -> dict:
        """The identity as hashed: the optional parts only where present, and a protocol cell without
        its overrides (those that change images or scores are in the identity already), so the same
        evaluation keeps its folder name."""
        out = {
            "model": self.model, "sampler": self.sampler, "checkpoint": self.checkpoint, "suite": self.suite,
            "prompts_sha256": self.prompts_sha256, "images_per_prompt": self.images_per_prompt,
            "metrics": list(self.metrics), "seed": self.seed, "dtype": self.dtype, "stats": self.stats, "baseline": self.baseline,
        }
        optional = {
            "references_sha256": self.references_sha256,
            "real_images": self.real_images,
            "scorers": self.scorers if self.scorers != "official" else None,
            "protocol": {k: v for k, v in self.protocol.items() if k != "overrides"} if self.protocol else None,
        }
        return out | {k: v for k, v in optional.items() if v is not None}

    @property
    def hash(self) -> str:
        return stable_hash(self.as_dict())

    def run_id(self, model_name: str, label: str) -> str:
        return f"{self.suite}-{model_name}-{label}-{self.hash[:8]}"


@dataclass
class RunPlan:
    """An evaluation before any image is made: its identity and folder, the model, every image."""

    identity: RunIdentity
    run_dir: Path
    label: str
    model: DiffusionModel
    jobs: list[ImageJob]
    checkpoint: Checkpoint | None
    baseline: RunResult | None


@dataclass
class Scored:
    """The score stage's output: per-image scores, every metric loaded (per-image and set-level), and
    the set-level metrics' collected features."""

    scores: pd.DataFrame
    metrics: dict[str, Metric]
    sets: SetScorer | None


class Clock:
    """Stage timings of an evaluation, for the manifest."""

    def __init__(self):
        self.start = self.last = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage], self.last = now - self.last, now

    def timings(self, made: GenerationStats) -> dict:
        return {
            "total_s": time.perf_counter() - self.start,
            "plan_s": self.laps["plan"],  # loading the model, planning the images
            "generate_s": self.laps["generate"],
            "model_forward_s": made.model_seconds,
            "score_s": self.laps["score"],
            "generated": made.generated,
            "cached": made.cached,
        }


def fix_cpu_threads() -> None:
    """Set the CPU thread count to what it is, which also turns MKL's dynamic threading off.

    PyTorch leaves MKL free to pick each matmul's thread count until ``torch.set_num_threads`` is
    first called, so a float32 result's last bits depended on whether the process had happened to
    call it (building a model does, loading one does not): ReFL trained apart from its second step
    on a warm cache. Calling it once at the start makes every run take the same path."""
    torch.set_num_threads(torch.get_num_threads())


class Session:
    """What every command shares: the resolved config, device, cache and suite."""

    def __init__(self, cfg, progress: bool = True):
        self.cfg = to_dict(cfg)
        self.progress = progress
        self.ranks = current_ranks()  # rank 0 of 1 outside torchrun / accelerate launch
        self.device = resolve_device(self.cfg["device"], self.ranks.local_rank if self.ranks.size > 1 else None)
        self.dtype = generation_dtype(self.cfg["gen"]["dtype"], self.device)
        self.dtype_name = str(self.dtype).replace("torch.", "")
        self.cache = cache_root(self.cfg)
        self.store = ImageStore(self.cache / "images")
        self.suite: Suite = load_suite(self.cfg["suite"], self.cfg.get("subject"), self.cache)
        self.metric_names = list(self.suite.metrics)
        for name in self.metric_names:  # fail on an unknown metric before any work
            if METRICS.get(name).needs_refs and self.suite.references is None:
                raise UsageError(f"metric {name} compares with reference images and suite '{self.suite.name}' has none (use a dreambench suite)")
        self.set_metrics = [n for n in self.metric_names if isinstance(METRICS.get(n), type) and issubclass(METRICS.get(n), DistributionMetric)]
        self.real = None  # the real images of the set-level metrics, checked when an evaluation starts
        fix_cpu_threads()
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
        self.sampler = make_sampler(self.cfg["model"]["sampler"], self.cfg["gen"]["steps"], self.cfg["gen"]["guidance"])

    def model(self, checkpoint: Checkpoint | None = None, sampler=None) -> DiffusionModel:
        model = load_model(self.cfg["model"], self.cache, sampler or self.sampler)
        if checkpoint is not None:
            apply_checkpoint(model, checkpoint)
        return model

    def plan(self, model: DiffusionModel, checkpoint: Checkpoint | None = None) -> list[ImageJob]:
        """Every image of the suite for this model: prompt, seed and store key."""
        ckpt_id = checkpoint.train_id if checkpoint else None
        return plan_images(self.suite.name, self.suite.prompts, self.suite.images_per_prompt, int(self.cfg["seed"]), model, self.sampler, ckpt_id, self.dtype_name)

    # ---- evaluation --------------------------------------------------------------------------
    def protocol_record(self, trained: bool) -> dict | None:
        """The protocol cell this evaluation belongs to (``bench.protocol``), or None outside a protocol;
        the base model's record leaves out the training's overrides (``bench eval`` makes the same run)."""
        protocol = self.cfg.get("protocol")
        if not protocol or not protocol.get("cell"):
            return None
        record = dict(protocol["cell"])
        if not trained:
            record["overrides"] = [o for o in record.get("overrides") or [] if not o.startswith(("train.", "method.", "data"))]
        return record

    def evaluate(self, checkpoint: Checkpoint | None, label: str, baseline: RunResult | None = None, protocol_extra: dict | None = None) -> RunResult:
        """One run folder: plan -> generate -> score -> aggregate -> write (report.html last). Each stage is keyed by what
        determines it (images by their content key, the folder by the run identity), so a killed
        evaluation restarts where it stopped and ends with the same bytes. Under a launcher every rank
        generates and scores its share; rank 0 aggregates and writes, and the others read its result."""
        clock = Clock()
        plan = self.plan_run(checkpoint, label, baseline)
        clock.lap("plan")
        made = self.generate(plan)
        clock.lap("generate")
        scored = self.score(plan)
        clock.lap("score")
        if scored is not None:  # rank 0, or the only process
            summary, table = self.aggregate(plan, scored)
            timings = clock.timings(made)
            self.write(plan.run_dir, summary, table, self.manifest(plan, scored, summary, timings, protocol_extra))
        self.ranks.barrier()  # the other ranks read what rank 0 wrote
        return RunResult(plan.run_dir, summary, table, timings) if scored is not None else read_result(plan.run_dir)

    def write(self, run_dir: Path, summary: dict, table: str, manifest: dict) -> None:
        """The run folder's summary, table and manifest, then its report.html."""
        write_json(run_dir / "summary.json", summary)
        write_text(run_dir / "table.md", table + "\n")
        write_json(run_dir / "manifest.json", manifest)
        if (self.cfg.get("report") or {}).get("html", True):
            self.write_report(run_dir)

    def generate(self, plan: RunPlan) -> GenerationStats:
        """Every missing image of the plan (this rank's share of the generation batches under a
        launcher), then the counts of every rank; the scoring batches read images any rank made."""
        batch = int(self.cfg["gen"]["batch_size"])
        made = generate_missing(plan.model, self.ranks.share(plan.jobs, batch), self.store, batch, self.sampler, self.progress)
        counts = self.ranks.gather("generated", {"counts": torch.tensor([made.generated, made.cached])})
        if counts is not None:
            made.generated, made.cached = (int(sum(c["counts"][i] for c in counts)) for i in (0, 1))
        return made

    def write_report(self, run_dir: Path) -> None:
        """report.html, last: a by-product, so a failure is one warning line and the run's results stand."""
        try:
            write_report([run_dir], max_prompts=int((self.cfg.get("report") or {}).get("max_prompts", 200)))  # images: the manifest's image_store
        except (DataError, ImportError) as err:
            log.warning("report.html not written (%s); `bench report run=%s` writes it", str(err).splitlines()[0], run_dir)

    def plan_run(self, checkpoint: Checkpoint | None, label: str, baseline: RunResult | None) -> RunPlan:
        """The model, every image to make and the run's identity, before any image is made; missing
        real images of a set-level metric fail here, before a model is built."""
        if self.set_metrics and self.real is None:
            self.real = real_set(self.suite, self.cache)
        model = self.model(checkpoint).to(self.device, self.dtype)
        protocol = self.protocol_record(checkpoint is not None)
        identity = RunIdentity(
            model=model.identity,
            sampler=sampler_identity(self.sampler),
            checkpoint=checkpoint.train_id if checkpoint else None,
            suite=self.suite.name,
            prompts_sha256=self.suite.sha256,
            images_per_prompt=self.suite.images_per_prompt,
            metrics=tuple(self.metric_names),
            seed=int(self.cfg["seed"]),
            dtype=self.dtype_name,
            stats=self.cfg["stats"],
            baseline=baseline.run_dir.name if baseline else None,
            references_sha256=self.suite.references_sha256 if self.suite.references is not None else None,
            real_images={**self.real.identity(), "resolution": self.real.resolution} if self.real is not None else None,
            scorers=self.cfg["scorers"],
            protocol=protocol,
        )
        run_dir = Path(self.cfg["out"]) / identity.run_id(self.cfg["model"]["name"], label)
        return RunPlan(identity, run_dir, label, model, self.plan(model, checkpoint), checkpoint, baseline)

    def score(self, plan: RunPlan) -> Scored | None:
        """Every image under every metric in one pass over decoded batches: per-image metrics make
        columns, set-level metrics (FID, KID) collect features that ``aggregate`` reduces. The scores are
        written at once, so a failure later loses nothing. Under a launcher each rank scores its share
        of the batches and rank 0 puts them together (None on the other ranks)."""
        metrics = load_metrics(self.metric_names, self.device, self.cfg["scorers"])
        per_image = {n: m for n, m in metrics.items() if n not in self.set_metrics}
        st, batch = self.cfg["stats"], int(self.cfg["score"]["batch_size"])
        sets = SetScorer(
            {n: metrics[n] for n in self.set_metrics}, self.suite.groups, self.real, self.cache, self.suite.name, batch,
            self.progress, int(st["n_boot_sets"]), float(st["level"]), int(st["seed"]),
        ) if self.set_metrics else None
        shared = self.ranks.size > 1
        recorder = FeatureRecorder(sets) if shared and sets is not None else sets
        scores = score_images(
            self.ranks.share(plan.jobs, batch), self.store, per_image, batch, self.device, self.progress, self.suite.references, self.suite.metric_scope, recorder
        )
        if shared:
            scores = self.gather_scores(plan, scores, list(per_image), recorder, batch)
            if scores is None:
                return None
        for offset, (column, labels) in enumerate(self.suite.groups.items()):
            scores.insert(len(ID_COLUMNS) + offset, column, [labels[i] for i in scores["prompt_index"]])
        write_scores(scores, plan.run_dir / "scores.parquet")
        return Scored(scores, metrics, sets)

    def gather_scores(self, plan: RunPlan, scores: pd.DataFrame, names: list[str], recorder: FeatureRecorder | None, batch: int) -> pd.DataFrame | None:
        """Rank 0: every rank's scores and features put back in the order one process makes them
        (global batch b was scored by rank b mod N), the features folded into the set-level
        statistics batch by batch as one process folds them. None on the other ranks."""
        mine = {"values": torch.tensor(scores[names].to_numpy(dtype="float64").reshape(len(scores), len(names)))}
        for key, feats in (recorder.batches.items() if recorder is not None else ()):
            mine[f"features.{key}"] = torch.cat(feats) if feats else torch.zeros(0)
        parts = self.ranks.gather("scores", mine)
        if parts is None:
            return None
        columns: dict[str, list[float]] = {n: [] for n in names}
        offsets = [0] * len(parts)
        for b, start in enumerate(range(0, len(plan.jobs), batch)):
            jobs, part = plan.jobs[start : start + batch], parts[b % len(parts)]
            lo, hi = offsets[b % len(parts)], offsets[b % len(parts)] + len(jobs)
            offsets[b % len(parts)] = hi
            for i, name in enumerate(names):
                columns[name].extend(part["values"][lo:hi, i].tolist())
            if recorder is not None:
                recorder.sets.add_features(jobs, {key: part[f"features.{key}"][lo:hi] for key in recorder.batches})
        return score_frame(plan.jobs, columns)

    def aggregate(self, plan: RunPlan, scored: Scored) -> tuple[dict, str]:
        """The summary (means, intervals, paired differences and win rates against the baseline, the
        set-level values) and its table."""
        infos = {n: {"higher_is_better": m.info.higher_is_better, "version": m.info.version, "scale": m.info.scale} for n, m in scored.metrics.items() if n not in self.set_metrics}
        for name, applies in self.suite.metric_scope.items():  # the prompts a scoped metric scored (the rest hold NaN)
            infos[name]["prompts"] = [i for i, a in enumerate(applies) if a]
        baseline, st = plan.baseline, self.cfg["stats"]
        base_scores = pd.read_parquet(baseline.run_dir / "scores.parquet") if baseline else None
        summary = report.summarize(
            scored.scores, infos, base_scores, int(st["n_boot"]), float(st["level"]), int(st["seed"]), plan.identity.baseline, list(self.suite.groups),
            int(st["n_permutations"]), self.suite.overall_by,
        )
        if scored.sets is not None:
            summary["sets"] = scored.sets.results(baseline.summary.get("sets") if baseline else None)
        title = f"{self.suite.name} / {self.cfg['model']['name']} / {plan.label}" + (f" vs {plan.identity.baseline}" if baseline else "")
        if self.cfg["scorers"] != "official":
            title += f" (scorers={self.cfg['scorers']}: random tiny scorers, scores NOT meaningful)"
        return summary, report.render_table(summary, title)

    def manifest(self, plan: RunPlan, scored: Scored, summary: dict, timings: dict, protocol_extra: dict | None) -> dict:
        """manifest.json: the run identity and what it was derived from (the config, the prompts, the
        metrics' versions), plus where and how it ran; the identity's fields are not written twice."""
        identity, checkpoint = plan.identity, plan.checkpoint
        return {
            "run_id": plan.run_dir.name,
            "suite": identity.suite,
            "model": self.cfg["model"]["name"],
            "method": plan.label,
            "config": self.cfg,
            "config_hash": identity.hash,
            "identity": identity.as_dict(),
            "prompts_sha256": identity.prompts_sha256,
            "prompt_source": self.suite.source,
            "n_prompts": len(self.suite.prompts),
            "n_empty_prompts": sum(1 for p in self.suite.prompts if not p.strip()),
            "published_prompt_set": self.suite.canonical,  # the suite's full prompt list equals the published one (count, sha256)
            "subjects": self.suite.subjects or None,
            "seeds": {"base_seed": identity.seed, "image_seed": "sha256('suite/prompt_index/image_index/base_seed')[:8] little-endian & (2**63-1)"},
            "metrics": {
                n: {"version": m.info.version, "scale": m.info.scale, "model_id": m.info.model_id, "revision": m.info.revision, "higher_is_better": m.info.higher_is_better}
                | ({"protocol": summary["sets"][n]["protocol"]} if n in self.set_metrics else {})
                for n, m in scored.metrics.items()
            },
            **({"set_metrics": scored.sets.manifest()} if scored.sets is not None else {}),
            "checkpoint": {"train_id": checkpoint.train_id, "path": str(checkpoint.path), "data": checkpoint.data, "train_log": str(train_log_path(checkpoint.path))}
            if checkpoint else None,
            "image_store": str(self.store.root),  # where report.html finds the images
            "baseline": identity.baseline,
            **({"protocol": identity.protocol | (protocol_extra or {})} if identity.protocol else {}),
            "scorers": identity.scorers,
            "device": str(self.device),
            "processes": self.ranks.size,  # ranks that generated and scored (torchrun, accelerate launch); the results do not depend on it
            "device_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else platform.processor() or platform.machine(),
            "dtype": identity.dtype,
            "versions": package_versions(),
            "python": platform.python_version(),
            "git_revision": git_revision(),
            "timings": timings,
        }

    # ---- training ----------------------------------------------------------------------------
    def resolve_method(self):
        """The recipe class and reward, checked before any work so a typo costs no compute."""
        method_cfg = self.cfg["method"]
        recipe = METHODS.entry(str(method_cfg.get("_path") or method_cfg["name"]))  # validates the name (or the path it was given by)
        targets = self.suite.train_images or (self.cfg.get("data") or {}).get("kind") == "images"
        if self.suite.subjects and not self.suite.train_images:
            raise UsageError(f"suite '{self.suite.name}' covers {len(self.suite.subjects)} subjects: set subject=NAME to fine-tune on one ({', '.join(self.suite.subjects)})")
        if "reward" in method_cfg and method_cfg["reward"] is None and not targets:
            method_cfg["reward"] = self.suite.reward
            if method_cfg["reward"] is None:
                raise UsageError(f"method '{recipe.name}' needs a reward and suite '{self.suite.name}' names none: set method.reward=NAME (`bench ls metrics`)")
        cls = import_recipe(method_cfg)
        if self.cfg.get("data") or (targets and not method_cfg.get("reward")):  # a pair dataset or target images: no reward
            return cls(method_cfg), None
        reward = make_metric(method_cfg["reward"], self.cfg["scorers"]).to(self.device) if method_cfg.get("reward") else None
        if not method_cfg.get("train_prompts") and not self.suite.train_prompts:
            raise UsageError(f"suite '{self.suite.name}' has no training prompts for method '{recipe.name}': set method.train_prompts=FILE (a prompt file, or a URL)")
        return cls(method_cfg), reward

    def check_run(self) -> None:
        """Before any work of a run: the recipe resolves, and the model as evaluated samples what the
        recipe trains (a method that trains a one-step generator refuses a 4-step evaluation)."""
        method, _ = self.resolve_method()
        if type(method).check_evaluation is not Method.check_evaluation:  # only a recipe that checks pays for a model load
            method.check_evaluation(self.model())

    def train(self) -> Checkpoint:
        """Train with the training sampler: gen.steps and gen.guidance change evaluation only,
        so a model tuned at its 4 steps is evaluated at 1 step from the same checkpoint. A recipe
        that starts from another preset's checkpoint (``init_from``) trains that one first."""
        self.train_init_preset()
        method, reward = self.resolve_method()
        model = self.model(sampler=self.train_sampler()).to(self.device, torch.float32)
        images = self.target_images(model.resolution)
        prompts = images.captions if images is not None else self.train_prompts()
        return Trainer(self.cfg, model, method, prompts, reward, self.device, self.cache, self.progress, images).run()

    def train_init_preset(self) -> None:
        """``method.init_from: NAME``: train preset NAME on the same model, suite, data and cache (with
        ``method.init_overrides``, key=value strings) and start this recipe from its checkpoint
        (``method.init``): Diff-Instruct++ aligns the generator its Diff-Instruct stage pre-trained."""
        method = self.cfg["method"]
        name = method.get("init_from")
        if not name or method.get("init"):
            return
        cfg = to_dict(compose([f"method={name}", *(method.get("init_overrides") or [])]))
        for key in ("model", "suite", "data", "subject", "device", "cache_dir", "scorers", "seed", "gen"):
            cfg[key] = self.cfg[key]
        log.info("method %s starts from a %s checkpoint: training it first", method["name"], name)
        method["init"] = str(Session(OmegaConf.create(cfg), self.progress).train().path)

    def train_sampler(self):
        """The sampler a method trains through: the model's own (its card's steps), the model's
        ``train_sampler`` keys over it (a flow model trains through Flow-GRPO's SDE), and the keys a
        preset names in ``train.sampler`` on top (PSO trains SDXL-Turbo at 4 steps; its card samples at 1)."""
        return make_sampler({**self.cfg["model"]["sampler"], **(self.cfg["model"].get("train_sampler") or {}), **(self.cfg["train"].get("sampler") or {})})

    def train_prompts(self) -> list[str]:
        """The prompts a method samples its own training data for: the method's ``train_prompts``
        (the PSO presets: SPO's 4k Pick-a-Pic prompts) when it names them, else the suite's."""
        spec = self.cfg["method"].get("train_prompts")
        if not spec:
            return self.suite.train_prompts
        rows, where = read_prompt_source(spec, Path.cwd(), f"method={self.cfg['method']['name']}", "method.train_prompts", self.cache)
        return prompts_of(rows, where)

    def target_images(self, resolution: int) -> TargetImages | None:
        """The images customization and style methods fine-tune toward: a captioned image
        dataset (``data=``) or the chosen subject's photos of a dreambench suite."""
        data = self.cfg.get("data") or {}
        if data.get("kind") == "images":
            return read_captioned_images(data, resolution)
        if self.suite.train_images:
            return images_from_files(self.suite.train_images, self.suite.train_prompts, resolution, f"{self.suite.source} ({', '.join(self.suite.subjects)})", self.suite.prior_prompt)
        return None


def run(cfg, progress: bool = True) -> tuple[RunResult, RunResult]:
    """Evaluate the base model, train the method (or reuse its checkpoint), evaluate, compare."""
    session = Session(cfg, progress)
    session.check_run()
    base = session.evaluate(None, "base")
    checkpoint = session.train()
    tuned = session.evaluate(checkpoint, session.cfg["method"]["name"], baseline=base)
    return base, tuned


def generate_shard(cfg, progress: bool = True) -> tuple[int, int, int]:
    """Generate one worker's share of a suite's images into the shared store (no scoring).

    Because an image depends only on its own seed, N workers with ``gen.shard=i/N``
    fill the store with exactly the images one process would make; a final
    ``bench eval`` without ``gen.shard`` then generates nothing and scores.
    """
    session = Session(cfg, progress)
    index, count = parse_shard(session.cfg["gen"]["shard"])  # checked at composition (bench.schema)
    model = session.model().to(session.device, session.dtype)
    jobs = session.plan(model)
    mine = jobs[index::count]
    stats = generate_missing(model, mine, session.store, int(session.cfg["gen"]["batch_size"]), session.sampler, progress)
    return stats.generated, stats.cached, len(jobs)


def evaluate(cfg, progress: bool = True) -> RunResult:
    return Session(cfg, progress).evaluate(None, "base")
