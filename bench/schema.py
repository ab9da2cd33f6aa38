"""The typed schema of the composed config: every default, its type, its valid range and its comment.

One source for three readers: ``DEFAULTS`` (the YAML text composition starts from), the check at
composition (a bad value is one line naming the key, the value and the fix, before any model is
built or folder written) and ``bench <command> --help``. The DEFAULTS groups are dataclasses
validated through OmegaConf structured configs. Suites and models are closed too (``SuiteKeys``,
``ModelKeys``, ``SamplerKeys``: a key they do not declare is refused, naming the file), and a method
section is checked against its recipe's ``Spec`` (a ``MethodSpec`` subclass the recipe class declares;
``bench.method``), where the recipe's defaults live.
"""

import difflib
import functools
import re
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Callable, Dict, List, Optional, Union, get_args, get_origin, get_type_hints

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from bench.errors import UsageError


@dataclass(frozen=True)
class Rule:
    """What a valid value is, in words (for the error line and --help) and as a test."""

    text: str
    ok: Callable[[Any], bool]
    names: bool = False  # the text is the whole description (a list of names), not a range after the type


def at_least(n) -> Rule:
    return Rule(f">= {n}", lambda v: v >= n)


def above(n) -> Rule:
    return Rule(f"> {n}", lambda v: v > n)


def inside(lo, hi) -> Rule:
    return Rule(f"in ({lo}, {hi})", lambda v: lo < v < hi)


def between(lo, hi) -> Rule:
    return Rule(f"in [{lo}, {hi}]", lambda v: lo <= v <= hi)


def one_of(*names) -> Rule:
    return Rule(f"one of {', '.join(map(str, names))}", lambda v: v in names, names=True)


# `train.mixed_precision=no` reads as YAML's false, which the trainer takes as "no"
PRECISION = Rule("one of auto, no, fp16, bf16", lambda v: v is False or v in ("auto", "no", "fp16", "bf16"), names=True)
DEVICE = Rule("auto, cpu, cuda, cuda:N or mps", lambda v: re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", v) is not None, names=True)
SHARD = Rule('"i/N" with 0 <= i < N, e.g. 0/4', lambda v: parse_shard(v) is not None, names=True)
BETAS = Rule("two numbers in [0, 1)", lambda v: len(v) == 2 and all(0 <= b < 1 for b in v), names=True)
SAMPLER_KINDS = ("ddim", "euler", "euler_ancestral", "lcm", "pndm", "flow_euler", "flow_sde", "dance_sde")  # bench.models.diffusion.SAMPLER_KINDS + bench.models.flow.FLOW_KINDS (tested equal), without importing diffusers
NONEMPTY = Rule("a list of at least one metric name", lambda v: len(v) > 0, names=True)


def setting(default, help: str = "", rule: Rule | None = None):
    """A schema field: its default, the comment DEFAULTS and --help show, and its rule."""
    meta = {"help": help, "rule": rule}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def fields_of(cls) -> tuple:
    """``dataclasses.fields`` with each field's type resolved: a recipe module written with
    ``from __future__ import annotations`` leaves its annotations as strings."""
    if any(isinstance(f.type, str) for f in fields(cls)):
        hints = get_type_hints(cls)
        for f in fields(cls):
            f.type = hints[f.name]
    return fields(cls)


def parse_shard(spec) -> tuple[int, int] | None:
    """``gen.shard="i/N"`` as (i, N), None when unset; malformed raises nothing here, the rule refuses it."""
    index, _, count = str(spec).partition("/")
    if index.isdigit() and count.isdigit() and int(index) < int(count):
        return int(index), int(count)
    return None


# ---- the DEFAULTS groups ------------------------------------------------------------------------
@dataclass
class Gen:
    batch_size: int = setting(8, "does not change any image", at_least(1))
    shard: Optional[str] = setting(None, "generate only every N-th image from the i-th (parallel workers sharing cache_dir)", SHARD)
    steps: Optional[int] = setting(None, "null: the model's sampler default", at_least(1))
    guidance: Optional[float] = setting(None, "null: the model's sampler default", at_least(0))
    dtype: str = setting("auto", "auto: float64 on CPU (exactly batch-size invariant), float16 on CUDA",
                         one_of("auto", "float64", "float32", "float16", "bfloat16"))


@dataclass
class Train:
    steps: int = setting(200, "optimizer steps", at_least(1))
    lr: float = setting(1.0e-4, "peak learning rate", above(0))
    batch_size: int = setting(8, "", at_least(1))
    grad_accum: int = setting(1, "", at_least(1))
    micro_batch_size: Optional[int] = setting(None, "cut each batch into micro-batches of this size (gradients accumulate): memory, not the recipe", at_least(1))
    lora_rank: Optional[int] = setting(4, "0 or null with full_finetune: true trains every UNet weight", at_least(0))
    lora_alpha: float = setting(4, "", above(0))
    full_finetune: bool = setting(False)
    weight_decay: float = setting(0.01, "", at_least(0))
    max_grad_norm: Optional[float] = setting(1.0, "0 or null: no clipping", at_least(0))
    mixed_precision: Union[str, bool] = setting("auto", "auto: bf16 on CUDA when supported, else no", PRECISION)
    ema_decay: Optional[float] = setting(None, "e.g. 0.999 keeps an EMA of the trained weights, used for evaluation", inside(0, 1))
    save_every: int = setting(50, "", at_least(1))
    keep_checkpoints: bool = setting(False, "true: keep the weights of every save_every step for evaluation (a protocol's checkpoint selection)")
    seed: int = setting(0, "", at_least(0))
    optimizer: str = setting("adamw", "adamw | adafactor (transformers; the DSPO/DPO SDXL scripts) | adamw8bit (bitsandbytes)",
                             one_of("adamw", "adafactor", "adamw8bit"))
    adam_betas: List[float] = setting([0.9, 0.999], "(beta1, beta2) of adamw / adamw8bit", BETAS)
    lr_schedule: str = setting("constant", "constant | constant_with_warmup | linear | cosine (linear/cosine also warm up)",
                               one_of("constant", "constant_with_warmup", "linear", "cosine"))
    warmup_steps: int = setting(0, "", at_least(0))
    scale_lr: bool = setting(False, "true: lr *= batch_size * grad_accum (the Salesforce/DSPO --scale_lr)")
    gradient_checkpointing: bool = setting(False)
    sampler: Optional[Dict[str, Any]] = setting(None, "the sampler trajectory methods train through: null is the model's own; a mapping overrides its keys (steps, timesteps)")
    log_with: Optional[str] = setting(None, "tensorboard | wandb: also send train.jsonl's lines through accelerate's trackers (the package must be installed); no checkpoint key",
                                      one_of("tensorboard", "wandb"))


@dataclass
class Score:
    batch_size: int = setting(32, "", at_least(1))


@dataclass
class Stats:
    n_boot: int = setting(1000, "bootstrap resamples of the prompts for a mean's interval", at_least(1))
    n_permutations: int = setting(9999, "sign flips of the per-prompt differences for a paired test (all of them when 2^prompts is fewer)", at_least(1))
    level: float = setting(0.95, "confidence level of every interval; 1 - level is the tests' alpha", inside(0, 1))
    seed: int = setting(0, "", at_least(0))
    n_boot_sets: int = setting(200, "FID/KID intervals: prompt halves, each recomputed from the run's features (0: none); ~3 s each for FID at 30k x 2048 on one core", at_least(0))


@dataclass
class Report:
    html: bool = setting(True, "write report.html into the run folder of every `bench run` and `bench eval` (false: a sweep that no one opens; `bench report run=DIR` writes it later)")
    max_prompts: int = setting(200, "report.html's image grid shows at most this many prompts: those with the largest |paired difference| on the first metric", at_least(1))


@dataclass
class Config:
    seed: int = setting(0, "base seed: every image's seed is a pure function of (suite, prompt, image, seed)", at_least(0))
    out: str = setting("runs", "where run folders go")
    cache_dir: Optional[str] = setting(None, "models, images, checkpoints; default $BENCH_HOME or ~/.cache/bench")
    device: str = setting("auto", "auto: cuda if available, else cpu", DEVICE)
    model: Any = setting("tiny", "a model (`bench ls models`); when model= is not given, a method preset's `base_model`, else the suite's `model`")
    method: Any = setting(None, "a training recipe preset (`bench ls methods`)")
    suite: Any = setting("micro", "an evaluation suite (`bench ls suites`)")
    data: Any = setting(None, "a pair dataset (pickapic-v2, FILE.parquet) or a captioned image set (FOLDER, pokemon-blip-captions) in place of self-generated data")
    protocol: Any = setting(None, "a paper's evaluation protocol (`bench ls protocols`): `bench run protocol=NAME method=M` runs every evaluation it names")
    scorers: str = setting("official", "official: each metric's canonical weights; tiny: random tiny scorers of the same families (smoke tests, scores NOT meaningful)",
                           one_of("official", "tiny"))
    subject: Optional[str] = setting(None, "a DreamBench subject (dreambench suites): evaluate on it, and customization methods train on its photos")
    gen: Gen = field(default_factory=Gen)
    train: Train = field(default_factory=Train)
    score: Score = field(default_factory=Score)
    stats: Stats = field(default_factory=Stats)
    report: Report = field(default_factory=Report)


# ---- the preset sections: suites, models (with their sampler) and methods ---------------------
@dataclass
class SuiteKeys:
    metrics: List[str] = setting(MISSING, "the metrics every image is scored with (`bench ls metrics`)", NONEMPTY)
    limit: Optional[int] = setting(None, "evaluate only the first N prompts (null: all); with limit_by, the first N of each group", at_least(1))
    limit_by: Optional[str] = setting(None, "the column whose groups `limit` takes N prompts of each (null: the prompt set, for a suite of prompt_sets; else the first N in all)")
    images_per_prompt: int = setting(1, "images generated per prompt (each with its own seed)", at_least(1))
    reward: Optional[str] = setting(None, "default training reward for methods on this suite")
    model: Optional[str] = setting(None, "the model when neither model= nor the method's base_model gives one (null: the default, tiny)")
    source: Optional[str] = setting(None, "a local prompt file (or folder) in place of the suite's prompts")
    allow_empty_prompts: bool = setting(False, "true: generate images of empty prompts (Pick-a-Pic's test set keeps one); false: an empty prompt is an error")
    prompts_per_subject: Optional[int] = setting(None, "dreambench: the first N prompt templates of each subject", at_least(1))
    fid_resolution: Optional[int] = setting(None, "FID/KID: images are center-cropped and resized to it first", at_least(1))
    # the keys of a suite's YAML that say where its prompts and references are (no defaults: set by the suite)
    name: Optional[str] = setting(None, "the suite's name (set at composition)")
    description: Optional[str] = setting(None, "one line for `bench ls suites`")
    _dir: Optional[str] = setting(None, "the suite's folder (set at composition)")
    _path: Optional[str] = setting(None, "the YAML file of a suite given by path, suite=FILE (set at composition)")
    extends: Optional[str] = setting(None, "another suite this one starts from: a name, or a YAML path relative to this one")
    kind: Optional[str] = setting(None, "prompts (default), dreambench or distribution (FID/KID against reference images)")
    prompts: Any = setting(None, "the prompt file: a path beside the YAML, an https:// URL, or {hub, file, split, revision}")
    prompt_column: Any = setting(None, "the column (or columns, first present wins) holding the prompt")
    prompt_set_column: Optional[str] = setting(None, "the column naming each prompt's set, for a suite of several prompt sets")
    prompt_sets: Optional[Dict[str, Any]] = setting(None, "set name -> its prompt file (a URL or {hub, file})")
    canonical: Optional[Dict[str, Any]] = setting(None, "the published prompt set: count and sha256 a full run checks")
    group_columns: Optional[List[str]] = setting(None, "columns whose values group the prompts in the summary (a category)")
    overall_by: Optional[str] = setting(None, "a group column whose groups' means are averaged, each alike, into the overall score (GenEval's tag)")
    metric_scope: Optional[Dict[str, List[str]]] = setting(None, "metric -> the prompt groups it scores (T2I-CompBench)")
    references: Optional[str] = setting(None, "a local folder of reference images (distribution suites)")
    reference_source: Any = setting(None, "where the reference images come from: an URL, {hub, file}, or {world: {seed, per_tag}} (the micro world renders them)")
    reference_file: Optional[str] = setting(None, "the reference images' archive (distribution suites)")
    subjects: Optional[List[str]] = setting(None, "dreambench: the subjects (null: all)")
    token: Optional[str] = setting(None, "dreambench: the rare token naming the subject in prompts")
    train_prompts: Optional[str] = setting(None, "the prompts methods train on (a file beside the YAML or a URL)")
    gen: Optional[Dict[str, Any]] = setting(None, "gen.* settings of the suite's protocol (checked as gen.*)")


@dataclass
class SamplerKeys:
    kind: str = setting(MISSING, "the model card's diffusers scheduler", one_of(*SAMPLER_KINDS))
    steps: int = setting(MISSING, "", at_least(1))
    guidance: float = setting(MISSING, "classifier-free guidance scale", at_least(0))
    eta: Optional[float] = setting(None, "ddim: eta; flow_sde: Flow-GRPO's noise level a; dance_sde: DanceGRPO's constant diffusion coefficient", at_least(0))
    timesteps: Optional[List[int]] = setting(None, "explicit timesteps (at their own length)")
    scheduler_config: Optional[Dict[str, Any]] = setting(None, "keys passed to the diffusers scheduler (timestep_spacing: trailing)")
    timestep_scaling: Optional[float] = setting(None, "lcm: the scheduler's timestep_scaling", above(0))


@dataclass
class ModelKeys:
    source: str = setting(MISSING, "a hub id, a local pipeline folder or tiny (built offline)")
    sampler: SamplerKeys = setting(MISSING)
    revision: Optional[str] = setting(None, "")
    resolution: Optional[int] = setting(None, "", at_least(1))
    name: Optional[str] = setting(None, "the model's name (set at composition)")
    description: Optional[str] = setting(None, "one line for `bench ls models`")
    _dir: Optional[str] = setting(None, "the model config's folder (set at composition)")
    extends: Optional[str] = setting(None, "another model config this one starts from")
    unet: Optional[Dict[str, Any]] = setting(None, "a distilled UNet in place of the pipeline's: {repo, file, revision}")
    vae: Optional[Dict[str, Any]] = setting(None, "a VAE in place of the pipeline's: {repo, file, revision}")
    train_sampler: Optional[Dict[str, Any]] = setting(None, "what training samples with, over `sampler` (a flow model's Flow-GRPO SDE); a preset's train.sampler goes on top")
    max_sequence_length: Optional[int] = setting(None, "flow models: T5's prompt length (null: the pipeline's default, FLUX 512, SD3 256)", at_least(1))
    build: Optional[Dict[str, Any]] = setting(None, "source: tiny: the architecture and pre-training of the embedded model")
    variants: Optional[Dict[str, str]] = setting(None, "fewstep/onestep -> the model of the same weights with that sampler, for a method's model_variant")


@dataclass(kw_only=True)
class MethodSpec:
    """The keys every method preset may hold: the ones that document it or say how the harness runs it
    (none of them configures the loss). A recipe's ``Spec`` subclasses it with its own settings."""

    recipe: Optional[str] = setting(None, "the recipe class, a bench.method.Method: module:Class, or path/to/file.py:Class relative to the YAML (required in a preset)")
    name: Optional[str] = setting(None, "the preset's name (set at composition)")
    description: Optional[str] = setting(None, "one line for `bench ls methods`")
    _dir: Optional[str] = setting(None, "the preset's folder (set at composition)")
    _path: Optional[str] = setting(None, "the YAML file, or module:Class, of a preset given by path, method=FILE (set at composition)")
    extends: Optional[str] = setting(None, "the preset this one starts from: a name, or a YAML path relative to this one")
    train: Optional[Dict[str, Any]] = setting(None, "train.* settings of the preset (checked as train.*)")
    gen: Optional[Dict[str, Any]] = setting(None, "gen.* settings of the preset (checked as gen.*)")
    code_differences: Optional[List[str]] = setting(None, "where the preset differs from the authors' code (`bench plan` prints them)")
    base_model: Optional[str] = setting(None, "the model when model= is not given")
    model_variant: Optional[str] = setting(None, "fewstep or onestep: on a suite that names its model, that model's variant of this kind (its `variants`)", one_of("fewstep", "onestep"))
    base_data: Optional[str] = setting(None, "the dataset when data= is not given")
    base_protocol: Optional[str] = setting(None, "the protocol `bench run` runs when suite= is not given")
    init_from: Optional[str] = setting(None, "a preset to train first and start from")
    init_overrides: List[str] = setting([], "key=value overrides of the init_from preset's config")
    init: Optional[str] = setting(None, "a finished checkpoint folder to start from (set from init_from when null)")
    seed: int = setting(0, "the recipe's own sampling; method.seed=0,1,2 trains once per value", at_least(0))


@dataclass(kw_only=True)
class RewardSpec(MethodSpec):
    """The keys of a recipe that scores its own samples with a reward on training prompts."""

    reward: Optional[str] = setting(None, "the reward metric (null: the suite's)")
    train_prompts: Optional[str] = setting(None, "null: the suite's training prompts; a prompt file or an https:// URL")


# the keys of a method preset that document it (or are set at composition) and configure no recipe
DOC_KEYS = ("recipe", "name", "description", "_dir", "_path", "extends", "train", "gen", "code_differences", "base_model", "model_variant", "base_data", "base_protocol")
SECTIONS = {"suite": SuiteKeys, "model": ModelKeys, "method": MethodSpec}


def unknown_keys(cls, tree, prefix: str = "") -> list[str]:
    """The dotted keys of ``tree`` that ``cls`` does not declare (a nested section's too)."""
    names = {f.name: f for f in fields_of(cls)}
    out = []
    for key, value in tree.items():
        f = names.get(key)
        if f is None:
            out.append(prefix + str(key))
        elif is_dataclass(f.type) and hasattr(value, "items"):
            out += unknown_keys(f.type, value, f"{prefix}{key}.")
    return out


def close_key(cls, dotted: str) -> str | None:
    """The declared key nearest to a mistyped ``dotted`` key, at its own level."""
    head, _, last = dotted.rpartition(".")
    for part in filter(None, head.split(".")):
        cls = next(f.type for f in fields_of(cls) if f.name == part)
    close = difflib.get_close_matches(last, [f.name for f in fields_of(cls)], n=1, cutoff=0.6)
    return f"{head}.{close[0]}" if close and head else close[0] if close else None


def build_spec(cls, cfg):
    """The typed settings (an instance of ``cls``) of a method section: the keys ``cls`` declares,
    converted to their types, and its defaults for the rest. Unknown keys and ranges are composition's
    to refuse; a required key that is missing is refused here too (a recipe built from a plain dict)."""
    tree = _plain(cfg) or {}
    known = {f.name: tree[f.name] for f in fields_of(cls) if f.name in tree}
    try:
        return OmegaConf.to_object(OmegaConf.merge(_template(cls), known))
    except (ValidationError, TypeError) as err:
        key = getattr(err, "full_key", None) or _refused(cls, known) or "?"
        f = _field(cls, key)
        raise (bad_value(f"method.{key}", _get(known, key), f, f"not {noun(f)}") if f else UsageError(f"method: {err}")) from None
    except OmegaConfBaseException as err:  # MissingMandatoryValue
        f = _field(cls, str(err.full_key))
        raise bad_value(f"method.{err.full_key}", None, f, "missing") from None


# the suite keys every suite gets (its YAML may leave them out); the others are the suite's own
SUITE_SHARED = ("limit", "limit_by", "images_per_prompt", "reward", "source", "allow_empty_prompts", "prompts_per_subject", "fid_resolution")


def defaults_of(cls, only=None) -> dict:
    """The keys of ``cls`` (or of them, those in ``only``) that have a default, with it: a suite gets
    the shared ones its YAML leaves out, so ``suite.limit=8`` or ``suite.allow_empty_prompts=true``
    works on every suite."""
    return {f.name: f.default for f in fields_of(cls) if f.default is not MISSING and (only is None or f.name in only)}


# ---- DEFAULTS and --help ------------------------------------------------------------------------
def _default(f):
    """A field's default (MISSING for a section's required key)."""
    return f.default_factory() if f.default_factory is not MISSING else f.default


def _yaml(value) -> str:
    """A default as one line of YAML."""
    if isinstance(value, list):
        return "[" + ", ".join(map(_yaml, value)) + "]"
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def defaults_yaml(cls=Config, indent: str = "") -> str:
    """The defaults as commented YAML (``bench.config.DEFAULTS``)."""
    lines = []
    for f in fields_of(cls):
        if is_dataclass(f.type):
            lines += [f"{indent}{f.name}:", defaults_yaml(f.type, indent + "  ").rstrip("\n")]
            continue
        help = f.metadata.get("help")
        lines.append(f"{indent}{f.name}: {_yaml(_default(f))}" + (f"  # {help}" if help else ""))
    return "\n".join(lines) + "\n"


def _base(tp):
    """``Optional[X]`` -> (X, True); ``X`` -> (X, False)."""
    if get_origin(tp) is Union and type(None) in get_args(tp):
        return next(a for a in get_args(tp) if a is not type(None)), True
    return tp, False


NOUNS = {int: "an integer", float: "a number", bool: "true or false", str: "a name"}


def noun(f) -> str:
    """The type of field ``f`` in words: 'an integer', 'a list of numbers'."""
    tp, _ = _base(f.type)
    origin = get_origin(tp)
    if origin is list and get_args(tp) and get_args(tp)[0] in NOUNS:
        return f"a list of {NOUNS[get_args(tp)[0]].split(' ', 1)[1]}s"
    return NOUNS.get(tp) or {list: "a list", dict: "a mapping"}.get(origin) or "a valid value"


def expected(f) -> str:
    """What a valid value of field ``f`` is, in words: 'an integer >= 1, or null'."""
    rule = f.metadata.get("rule")
    words = rule.text if rule is not None and rule.names else f"{noun(f)} {rule.text}" if rule else noun(f)
    return words + (", or null" if _base(f.type)[1] else "")


def _type_name(f) -> str:
    """``int``, ``float?`` (null allowed), ``list[float]``; a config group (Any) is a registered ``name``."""
    tp, optional = _base(f.type)
    name = "name" if tp is Any else tp.__name__ if get_origin(tp) is None else str(tp).replace("typing.", "").lower()
    return name.replace("union[str, bool]", "str") + ("?" if optional else "")


def keys(cls=Config, prefix: str = ""):
    """(dotted key, field) of every setting, depth first."""
    for f in fields_of(cls):
        if is_dataclass(f.type):
            yield from keys(f.type, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def help_text() -> str:
    """The settings table of ``bench run|eval|train|plan|prefetch --help``."""
    sections = [row for name, cls in SECTIONS.items() for row in keys(cls, f"{name}.") if name != "method" or row[0][len("method."):] not in DOC_KEYS[1:]]
    return rows_text(list(keys()) + sections)


def spec_help(spec, values: dict) -> str:
    """The settings table of a recipe (``bench run method=NAME --help``): every key of its ``Spec``
    but the ones that only document a preset, with type, default and help, and the preset's value."""
    rows = [(key, f) for key, f in keys(spec, "method.") if key[len("method."):] not in DOC_KEYS]
    return rows_text(rows, {key: _yaml(_plain(values[key[len("method."):]])) for key, _ in rows if key[len("method."):] in values})


def rows_text(rows, preset: dict | None = None) -> str:
    """One line per (key, field): type and range, default, help; ``preset`` adds 'preset: VALUE' where given."""
    lines = []
    for key, f in rows:
        default = "" if _default(f) is MISSING else _yaml(_default(f))
        rule = f.metadata.get("rule")
        kind = _type_name(f) + (f" {rule.text}" if rule and not rule.names else "")
        comment = f.metadata.get("help") or (rule.text if rule and rule.names else "")
        if rule and rule.names and comment != rule.text and "|" not in comment:
            comment = f"{rule.text}; {comment}"
        if preset and key in preset:
            comment = f"[preset: {preset[key]}] {comment}"
        lines.append(f"  {key:<28} {kind:<18} {default:<10} {comment}".rstrip())
    return "\n".join(lines)


# ---- validation ---------------------------------------------------------------------------------
def show(value) -> str:
    """A value as the command line writes it."""
    return _yaml(_plain(value))


def bad_value(key: str, value, f, why: str, where: str = "") -> UsageError:
    """The one line: the key, the value, what is wrong, what to write instead."""
    tail = "" if _default(f) is MISSING else f" (default {show(_default(f))})"
    return UsageError(f"{key}={show(value)}{where}: {why}; use {expected(f)}{tail}")


def _field(cls, dotted: str):
    """The dataclass field of a dotted key under ``cls``, or None."""
    head, _, rest = dotted.partition(".")
    match = next((f for f in fields_of(cls) if f.name == head), None)
    if match is None or not rest:
        return match
    return _field(match.type, rest) if is_dataclass(match.type) else None


def _known(cls, tree: dict, closed: bool) -> dict:
    """The part of ``tree`` that ``cls`` describes; with ``closed`` (the DEFAULTS groups) also its
    unknown keys, which the merge refuses. A free-form section keeps its other keys unchecked, and
    the config groups (typed Any, no rule) are checked as sections of their own."""
    names = {f.name for f in fields_of(cls)}
    out = {k: _plain(v) for k, v in tree.items() if k not in names} if closed else {}
    for f in fields_of(cls):
        if f.name not in tree or (f.type is Any and f.metadata.get("rule") is None):
            continue
        value = tree[f.name]
        out[f.name] = _known(f.type, value, closed) if is_dataclass(f.type) and hasattr(value, "items") else _plain(value)
    return out


def _plain(value):
    return OmegaConf.to_container(value) if OmegaConf.is_config(value) else value


def _get(tree: dict, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


def _refused(cls, known: dict) -> str | None:
    """The first key whose value the schema refuses on its own (only on the error path)."""
    for key, _ in keys(cls):
        value = _get(known, key, MISSING)
        if value is MISSING:
            continue
        for part in reversed(key.split(".")):
            value = {part: value}
        try:
            OmegaConf.merge(_template(cls), value)
        except (ValidationError, TypeError):
            return key
    return None


@functools.cache
def _template(cls):
    return OmegaConf.structured(cls)


def check(cls, tree, prefix: str = "", where: Callable[[str], str] = lambda key: "", closed: bool = False) -> dict:
    """Check the keys ``cls`` describes in ``tree``: types through OmegaConf's structured merge,
    then each field's rule; returns the typed values. ``where(key)`` names the preset that set a
    bad value (or ""). The tree itself is left as composed, so config hashes do not change."""
    known = _known(cls, tree, closed)
    try:
        typed = OmegaConf.to_container(OmegaConf.merge(_template(cls), known))
    except ConfigKeyError as err:  # a preset's train:/gen: section with a key the schema lacks
        key = prefix + str(err.full_key)
        close = difflib.get_close_matches(key, [k for k, _ in keys(Config)], n=1)
        raise UsageError(f"unknown config key '{key}'{where(key)}" + (f"; did you mean {close[0]}?" if close else "")) from None
    except (ValidationError, TypeError):  # OmegaConf raises TypeError for a list given to a mapping
        key = _refused(cls, known)
        if key is None:  # a value given for a whole group (gen=5)
            key = next(f.name for f in fields_of(cls) if is_dataclass(f.type) and not isinstance(known.get(f.name, {}), dict))
            raise UsageError(f"{prefix}{key}={show(known[key])}{where(prefix + key)}: {prefix}{key} is a group of keys; "
                             f"set {prefix}{key}.KEY=VALUE (`bench run --help` lists them)") from None
        f = _field(cls, key)
        raise bad_value(prefix + key, _get(known, key), f, f"not {noun(f)}", where(prefix + key)) from None
    for key, f in keys(cls):
        rule = f.metadata.get("rule")
        if _get(known, key) is None:
            if _default(f) is MISSING:  # a section's required key
                raise bad_value(prefix + key, None, f, "missing", where(prefix + key))
            continue
        if rule is not None and not rule.ok(_get(typed, key)):
            # shown as written: -1, not -1.0
            raise bad_value(prefix + key, _get(known, key), f, "not allowed" if rule.names else "out of range", where(prefix + key))
    return typed


# ---- the key tables of docs/extending.md ---------------------------------------------------------
TABLES = {"SuiteKeys": SuiteKeys, "MethodSpec": MethodSpec}  # docs/*.md: <!-- keys:NAME --> ... <!-- /keys -->, written by python -m bench.docs


def table_cell(text: str) -> str:
    """``text`` as one markdown table cell: a pipe escaped, ``<`` as an entity (no stray HTML), lines joined."""
    return " ".join(line.strip() for line in str(text).splitlines()).replace("|", "\\|").replace("<", "&lt;")


def markdown_table(cls) -> str:
    """Every key of a preset schema as a markdown table: key, type (and range), default, meaning."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for f in fields_of(cls):
        rule = f.metadata.get("rule")
        kind = ("any" if _base(f.type)[0] is Any else _type_name(f)) + (f" {rule.text}" if rule and not rule.names else "")
        default = "required" if _default(f) is MISSING else f"`{_yaml(_default(f))}`"
        meaning = f.metadata.get("help") or ""
        if rule and rule.names and rule.text not in meaning:
            meaning = f"{rule.text}; {meaning}" if meaning else rule.text
        lines.append(f"| `{f.name}` | {table_cell(kind)} | {default} | {table_cell(meaning)} |")
    return "\n".join(lines)
