"""Configuration: defaults + the selected model, method and suite YAMLs + ``key=value`` overrides.

Composition order, later wins: ``DEFAULTS`` < suite's ``gen`` < method's ``train``/``gen`` <
a protocol cell's settings (``bench.protocol``: suite, seed, sampler, metrics) < command-line overrides. A method preset's ``base_model`` picks the model when ``model=`` is not
given, and its ``base_data`` the dataset; ``data=`` names a pair dataset or a captioned image set (or
a local parquet file, or a folder of either). The tree is in OmegaConf struct mode, so a mistyped key
is an error that names the closest existing key, not a silently ignored value.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from bench.errors import UsageError

DEFAULTS = """
seed: 0                 # base seed: every image's seed is a pure function of (suite, prompt, image, seed)
out: runs               # where run folders go
cache_dir: null         # models, images, checkpoints; default $BENCH_HOME or ~/.cache/bench
device: auto            # auto: cuda if available, else cpu
model: tiny             # a method preset's `base_model` is used when model= is not given
method: null
suite: micro
data: null              # a pair dataset (pickapic-v2, FILE.parquet) or a captioned image set (FOLDER, pokemon-blip-captions) in place of self-generated data
protocol: null          # a paper's evaluation protocol (`bench ls protocols`): `bench run protocol=NAME method=M` runs every evaluation it names
scorers: official       # official: each metric's canonical weights; tiny: random tiny scorers of the same families (smoke tests, scores NOT meaningful)
subject: null           # a DreamBench subject (dreambench suites): evaluate on it, and customization methods train on its photos
gen:
  batch_size: 8         # does not change any image
  shard: null           # "i/N": generate only every N-th image from the i-th (parallel workers sharing cache_dir)
  steps: null           # null: the model's sampler default
  guidance: null
  dtype: auto           # auto: float64 on CPU (exactly batch-size invariant), float16 on CUDA
train:
  steps: 200
  lr: 1.0e-4
  batch_size: 8
  grad_accum: 1
  micro_batch_size: null # cut each batch into micro-batches of this size (gradients accumulate): memory, not the recipe
  lora_rank: 4          # 0 or null with full_finetune: true trains every UNet weight
  lora_alpha: 4
  full_finetune: false
  weight_decay: 0.01
  max_grad_norm: 1.0
  mixed_precision: auto # auto: bf16 on CUDA when supported, else no
  ema_decay: null       # e.g. 0.999 keeps an EMA of the trained weights, used for evaluation
  save_every: 50
  keep_checkpoints: false # true: keep the weights of every save_every step for evaluation (a protocol's checkpoint selection)
  seed: 0
  optimizer: adamw      # adamw | adafactor (transformers; the DSPO/DPO SDXL scripts) | adamw8bit (bitsandbytes)
  adam_betas: [0.9, 0.999] # (beta1, beta2) of adamw / adamw8bit
  lr_schedule: constant # constant | constant_with_warmup | linear | cosine (linear/cosine also warm up)
  warmup_steps: 0
  scale_lr: false       # true: lr *= batch_size * grad_accum (the Salesforce/DSPO --scale_lr)
  gradient_checkpointing: false
  sampler: null         # the sampler trajectory methods train through: null is the model's own; a mapping overrides its keys (steps, timesteps)
score:
  batch_size: 32
stats:
  n_boot: 1000          # bootstrap resamples of the prompts for a mean's interval
  n_permutations: 9999  # sign flips of the per-prompt differences for a paired test (all of them when 2^prompts is fewer)
  level: 0.95
  seed: 0
  n_boot_sets: 200      # FID/KID intervals: prompt halves, each recomputed from the run's features (0: none); ~3 s each for FID at 30k x 2048 on one core
"""

GROUPS = ("model", "method", "suite", "data", "protocol")
_OVERRIDE = re.compile(r"^[A-Za-z_][\w\-]*(\.[\w\-]+)*=.*$", re.S)


def stable_hash(obj) -> str:
    """sha256 of the canonical JSON of ``obj``: equal configs hash equally on every machine."""
    if isinstance(obj, DictConfig):
        obj = OmegaConf.to_container(obj, resolve=True)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_entry_config(registry, name: str, _seen=()) -> DictConfig:
    """A registry entry as a config; ``extends: other`` inherits from another entry of the same kind."""
    if name in _seen:
        raise UsageError(f"{registry.kind} '{name}' extends itself through {' -> '.join(_seen)}")
    target = registry.get(name)
    if isinstance(target, (str, Path)):
        cfg = OmegaConf.load(target)
        cfg["_dir"] = str(Path(target).parent)
    elif isinstance(target, dict):
        cfg = OmegaConf.create(target)
    elif hasattr(target, "default_config"):
        cfg = OmegaConf.create(target.default_config())
    else:
        raise UsageError(f"{registry.kind} '{name}' is registered as {target!r}, which is no config")
    base = cfg.pop("extends", None)
    if base:
        cfg = OmegaConf.merge(load_entry_config(registry, base, (*_seen, name)), cfg)
    cfg["name"] = name
    return cfg


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for arg in args:
        if not _OVERRIDE.match(arg):
            raise UsageError(f"malformed override '{arg}': expected key=value, e.g. train.steps=50 or suite=micro")
        key, _, value = arg.partition("=")
        pairs.append((key, value))
    return pairs


def compose(args: list[str], require: tuple[str, ...] = (), cell: dict | None = None) -> DictConfig:
    """Build the resolved config for a command from its ``key=value`` arguments.

    ``cell`` is one evaluation of a protocol (``bench.protocol.expand``): its suite, unless the
    arguments name one, and its settings (``{"seed": 0, "gen.steps": 4, ...}``) go on top of the
    suite and method and under the arguments; ``cell["record"]`` lands in ``protocol.cell``.
    """
    from bench.registry import DATASETS, METHODS, MODELS, PROTOCOLS, SUITES

    pairs = parse_overrides(args)
    cfg = OmegaConf.create(DEFAULTS)
    choices = {k: v for k, v in pairs if k in GROUPS}
    if cell is not None and "suite" not in choices:
        choices["suite"] = cell["suite"]
    for group in GROUPS:
        if group in choices:
            cfg[group] = choices[group] or None
    for group in require:
        if cfg[group] is None:
            raise UsageError(f"`{group}=NAME` is required here (`bench ls {group}s` lists them)")
    registries = {"model": MODELS, "method": METHODS, "suite": SUITES, "data": DATASETS, "protocol": PROTOCOLS}
    if cfg.method is not None:
        cfg.method = load_entry_config(METHODS, str(cfg.method))
        if "model" not in choices and cfg.method.get("base_model"):
            cfg.model = cfg.method.base_model  # a paper preset names the base it was tuned for
        if "data" not in choices and cfg.method.get("base_data"):
            cfg.data = cfg.method.base_data  # ... and the dataset (PSO's style run: the Pokemon set)
    if cfg.data is not None and str(cfg.data) not in DATASETS.names() and ("/" in str(cfg.data) or str(cfg.data).endswith(".parquet")):
        source = str(cfg.data)  # data=FILE.parquet or a folder: pairs in the Pick-a-Pic v2 schema, or captioned images
        if not Path(source).exists():
            raise UsageError(
                f"data={source}: no such file or folder (give a .parquet file or folder in the Pick-a-Pic v2 schema, "
                "a folder of images with metadata.jsonl, or a name from `bench ls datasets`)"
            )
        images = any((Path(source) / m).is_file() for m in ("metadata.jsonl", "metadata.csv"))
        cfg.data = load_entry_config(DATASETS, "imagefolder" if images else "pickapic-v2")
        cfg.data.source, cfg.data.name = source, Path(source).name
    for group in GROUPS:
        if cfg[group] is not None and not isinstance(cfg[group], DictConfig):
            cfg[group] = load_entry_config(registries[group], str(cfg[group]))
    # Suite protocol, then method settings, over the defaults.
    if cfg.suite is not None and "gen" in cfg.suite:
        cfg.gen = OmegaConf.merge(cfg.gen, cfg.suite.gen)
    if cfg.method is not None:
        for section in ("train", "gen"):
            if section in cfg.method:
                cfg[section] = OmegaConf.merge(cfg[section], cfg.method[section])
    if cfg.protocol is not None:
        cfg.protocol.cell = (cell or {}).get("record")
    OmegaConf.set_struct(cfg, True)
    if cfg.protocol is not None and cfg.protocol.get("suites"):
        for name in cfg.protocol.suites:  # protocol.suites.NAME.KEY=VALUE: a suite key for that suite's cells only (its source)
            OmegaConf.set_struct(cfg.protocol.suites[name], False)
    for key, value in (cell or {}).get("set", {}).items():
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException:
            raise UsageError(f"protocol '{cfg.protocol.name}' sets unknown config key '{key}'{_close_keys(cfg, key)}") from None
    for key, value in pairs:
        if key in GROUPS:
            continue
        try:
            cfg.merge_with(OmegaConf.from_dotlist([f"{key}={value}"]))
        except OmegaConfBaseException:
            raise UsageError(f"unknown config key '{key}'{_close_keys(cfg, key)}") from None
    return cfg


def _close_keys(cfg: DictConfig, key: str) -> str:
    keys = list(_flat_keys(OmegaConf.to_container(cfg)))
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    return f"; did you mean {', '.join(close)}?" if close else " (see `bench ls` and the YAML configs)"


def _flat_keys(tree, prefix=""):
    for k, v in tree.items():
        path = f"{prefix}{k}"
        yield path
        if isinstance(v, dict):
            yield from _flat_keys(v, path + ".")


def to_dict(cfg: DictConfig) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)
