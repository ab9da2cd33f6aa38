"""Configuration: defaults + the selected model, method and suite YAMLs + ``key=value`` overrides.

Composition order, later wins: ``DEFAULTS`` < suite's ``gen`` < method's ``train``/``gen`` <
a protocol cell's settings (``bench.protocol``: suite, seed, sampler, metrics) < command-line overrides. A method preset's ``base_model`` picks the model when ``model=`` is not
given (else the suite's ``model``), and its ``base_data`` the dataset; ``data=`` names a pair dataset or a captioned image set (or
a local parquet file, or a folder of either). The tree is in OmegaConf struct mode, so a mistyped key
is an error that names the closest existing key, not a silently ignored value; and every value is
checked against ``bench.schema`` (types, ranges, names) before the config is returned, so a bad one
costs no model load and leaves no run folder.
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
from bench.schema import SECTIONS, SUITE_SHARED, Config, MethodSpec, SuiteKeys, check, close_key, defaults_of, defaults_yaml, show, unknown_keys

DEFAULTS = defaults_yaml()  # the commented YAML of bench.schema.Config: every default, its comment

GROUPS = ("model", "method", "suite", "data", "protocol")
VARIANT_KEY = "method.model_variant"  # picks the model, so it is read with the presets, before the other overrides
_OVERRIDE = re.compile(r"^[A-Za-z_][\w\-]*(\.[\w\-]+)*=.*$", re.S)


def stable_hash(obj) -> str:
    """sha256 of the canonical JSON of ``obj``: equal configs hash equally on every machine."""
    if isinstance(obj, DictConfig):
        obj = OmegaConf.to_container(obj, resolve=True)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_entry_config(registry, name: str, _seen=()) -> DictConfig:
    """A registry entry as a config; ``extends: other`` inherits from another entry of the same kind (a
    name, or a path: relative to the folder of the YAML that extends it). A preset given by path
    (``suite=/any/mine.yaml``, ``method=my_module:MyRecipe``; ``Registry.path_entry``) is named after its
    file (or class) and records where it came from in ``_path``."""
    if name in _seen:
        raise UsageError(f"{registry.kind} '{name}' extends itself through {' -> '.join(_seen)}")
    entry = registry.entry(name)
    target = entry.load()
    if isinstance(target, (str, Path)):
        cfg = read_yaml(target, registry.kind)
        cfg["_dir"] = str(Path(target).parent)
    elif isinstance(target, dict):
        cfg = OmegaConf.create(target)
    elif hasattr(target, "default_config"):
        cfg = OmegaConf.create(target.default_config())
    else:
        raise UsageError(f"{registry.kind} '{name}' is registered as {target!r}, which is no config")
    base = extended(registry, cfg.pop("extends", None), cfg.get("_dir"))
    if base:
        cfg = OmegaConf.merge(load_entry_config(registry, base, (*_seen, name)), cfg)
    cfg.pop("_path", None)
    if entry.name != name:  # given by path: the file (or module:Class) in error lines and `bench ls`
        cfg["_path"] = entry.source
    cfg["name"] = entry.name
    return cfg


def extended(registry, base, folder) -> str | None:
    """What an ``extends:`` value names: a registered name as written, a relative YAML path from
    ``folder`` (the YAML that extends it) for a kind taken by path."""
    from bench.registry import is_path

    if not base:
        return None
    base = str(base)
    if folder and registry.by_path and is_path(base) and ":" not in base and not Path(base).is_absolute():
        return str(Path(folder) / base)
    return base


def read_yaml(path, kind: str) -> DictConfig:
    """A preset YAML as a config: anything but a mapping of keys (a list, a bare word, invalid YAML) is
    one line naming the file and what to write. Parsed once by OmegaConf (every preset is read at every
    composition); only a file that is no mapping is read again, to say what it holds."""
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{kind} file {path} is not UTF-8 text: give a YAML file of `key: value` lines") from None
    try:
        cfg = OmegaConf.load(path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise UsageError(f"{kind} file {path} is not valid YAML ({getattr(err, 'problem', None) or type(err).__name__}{where}): write one `key: value` per line") from None
    except OSError:  # a bare number: OmegaConf takes no such type
        cfg = None
    if isinstance(cfg, DictConfig) and (len(cfg) == 0 or ":" in text):  # OmegaConf reads a bare word as {word: null}
        return cfg
    top = yaml.safe_load(text)
    raise UsageError(f"{kind} file {path} holds {_a(type(top).__name__)}, not a mapping of keys: write one `key: value` per line "
                     f"(`bench run --help` lists a {kind}'s keys)")


def _a(type_name: str) -> str:
    return {"list": "a list", "str": "a single value", "int": "a number", "float": "a number", "bool": "a single value"}.get(type_name, f"a {type_name}")


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for arg in args:
        if not _OVERRIDE.match(arg):
            raise UsageError(f"malformed override '{arg}': expected key=value, e.g. train.steps=50 or suite=smoke")
        key, _, value = arg.partition("=")
        pairs.append((key, value))
    return pairs


def compose(args: list[str], require: tuple[str, ...] = (), cell: dict | None = None) -> DictConfig:
    """Build the resolved config for a command from its ``key=value`` arguments: the chosen presets,
    their sections merged in order, the protocol cell's settings, the overrides, then the check.

    ``cell`` is one evaluation of a protocol (``bench.protocol.expand``): its suite, unless the
    arguments name one, and its settings (``{"seed": 0, "gen.steps": 4, ...}``) go on top of the
    suite and method and under the arguments; ``cell["record"]`` lands in ``protocol.cell``.
    """
    pairs = parse_overrides(args)
    cfg = OmegaConf.create(DEFAULTS)
    choose_presets(cfg, {k: v for k, v in pairs if k in GROUPS or k == VARIANT_KEY}, require, cell)
    merge_sections(cfg, cell)
    OmegaConf.set_struct(cfg, True)
    if cfg.protocol is not None and cfg.protocol.get("suites"):
        for name in cfg.protocol.suites:  # protocol.suites.NAME.KEY=VALUE: a suite key for that suite's cells only (its source)
            OmegaConf.set_struct(cfg.protocol.suites[name], False)
    for key, value in (cell or {}).get("set", {}).items():
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException:
            raise UsageError(f"protocol '{cfg.protocol.name}' sets unknown config key '{key}'{_close_keys(cfg, key)}") from None
    apply_overrides(cfg, [(k, v) for k, v in pairs if k not in GROUPS])
    validate(cfg, {k for k, _ in pairs}, set((cell or {}).get("set", {})))
    return cfg


def choose_presets(cfg: DictConfig, choices: dict, require: tuple[str, ...], cell: dict | None) -> None:
    """Load the chosen model, method, suite, data and protocol presets into ``cfg``; a method preset
    names its base model and data when the arguments do not, and ``data=FILE`` takes a local file."""
    from bench.registry import DATASETS, METHODS, MODELS, PROTOCOLS, SUITES

    if cell is not None and "suite" not in choices:
        choices["suite"] = cell["suite"]
    for group in GROUPS:
        if group in choices:
            cfg[group] = choices[group] or None
    for group in require:
        if cfg[group] is None:
            raise UsageError(f"`{group}=NAME` is required here (`bench ls {group}s` lists them)")
    if cfg.method is not None:
        cfg.method = load_entry_config(METHODS, str(cfg.method))
        if "model" not in choices and cfg.method.get("base_model"):
            cfg.model = cfg.method.base_model  # a paper preset names the base it was tuned for
        if "data" not in choices and cfg.method.get("base_data"):
            cfg.data = cfg.method.base_data  # ... and the dataset (PSO's style run: the Pokemon set)
    if cfg.data is not None and str(cfg.data) not in DATASETS.names() and ("/" in str(cfg.data) or str(cfg.data).endswith(".parquet")):
        cfg.data = local_data(str(cfg.data))
    registries = {"model": MODELS, "method": METHODS, "suite": SUITES, "data": DATASETS, "protocol": PROTOCOLS}
    if cfg.suite is not None and not isinstance(cfg.suite, DictConfig):
        cfg.suite = load_entry_config(SUITES, str(cfg.suite))
    if "model" not in choices and not (cfg.method is not None and cfg.method.get("base_model")) and cfg.suite is not None and cfg.suite.get("model"):
        if VARIANT_KEY in choices and cfg.method is not None:  # the command line's, over the preset's
            cfg.method.model_variant = choices[VARIANT_KEY]
        cfg.model = suite_model(cfg.suite.model, cfg.method.get("model_variant") if cfg.method is not None else None)
    for group in GROUPS:
        if cfg[group] is not None and not isinstance(cfg[group], DictConfig):
            cfg[group] = load_entry_config(registries[group], str(cfg[group]))


def suite_model(name: str, variant: str | None) -> str:
    """The model a suite names (micro: the world model its scorers judge), or its few-step or one-step
    variant when the method asks for one (PSO: ``model_variant: fewstep``) and the model lists it."""
    from bench.registry import MODELS

    if not variant:
        return name
    variants = load_entry_config(MODELS, name).get("variants") or {}
    return variants.get(variant, name)


def local_data(source: str) -> DictConfig:
    """``data=FILE.parquet`` or a folder: pairs in the Pick-a-Pic v2 schema, or captioned images."""
    from bench.registry import DATASETS

    if not Path(source).exists():
        raise UsageError(
            f"data={source}: no such file or folder (give a .parquet file or folder in the Pick-a-Pic v2 schema, "
            "a folder of images with metadata.jsonl, or a name from `bench ls datasets`)"
        )
    images = any((Path(source) / m).is_file() for m in ("metadata.jsonl", "metadata.csv"))
    data = load_entry_config(DATASETS, "imagefolder" if images else "pickapic-v2")
    data.source, data.name = source, Path(source).name
    data.revision = None  # a local copy: the hub commit of the dataset YAML does not apply
    return data


def merge_sections(cfg: DictConfig, cell: dict | None) -> None:
    """The suite's shared keys it leaves out, then its ``gen``, then the method's ``train`` and ``gen``,
    over the defaults; the protocol cell's record."""
    if cfg.suite is not None:  # the shared suite keys a suite's YAML leaves out (the suite enters no hash)
        for key, default in defaults_of(SuiteKeys, SUITE_SHARED).items():
            cfg.suite.setdefault(key, default)
    if cfg.suite is not None and "gen" in cfg.suite:
        cfg.gen = OmegaConf.merge(cfg.gen, cfg.suite.gen)
    if cfg.method is not None:
        for section in ("train", "gen"):
            if section in cfg.method:
                cfg[section] = OmegaConf.merge(cfg[section], cfg.method[section])
    if cfg.protocol is not None:
        cfg.protocol.cell = (cell or {}).get("record")


def apply_overrides(cfg: DictConfig, pairs: list[tuple[str, str]]) -> None:
    """The command line's ``key=value`` overrides, last; an unknown key names the closest one."""
    for key, value in pairs:
        group = key.split(".")[0]
        if group in GROUPS and cfg[group] is None:  # method.seed=3 without a method would invent a section
            raise UsageError(f"{key}={value}: sets a key of the {group}, and no {group} is chosen; add {group}=NAME (`bench ls {group}s`)")
        try:
            cfg.merge_with(OmegaConf.from_dotlist([f"{key}={value}"]))
        except OmegaConfBaseException:
            current = OmegaConf.select(cfg, key, default=KeyError)
            if current is not KeyError:  # the key is there: a mapping given for a list, or the reverse
                raise UsageError(f"{key}={value}: does not fit the value it replaces ({show(current)}); write one of the same shape") from None
            raise UsageError(f"unknown config key '{key}' ({key}={value}){_close_keys(cfg, key)}") from None


def validate(cfg: DictConfig, given: set[str], from_protocol: set[str] = frozenset()) -> None:
    """Check the composed config against ``bench.schema``: one UsageError line naming the key, the
    value, the preset that set it (when not the command line) and the fix."""
    from bench.registry import METRICS

    def where(key: str) -> str:
        if key in given:
            return ""
        if key in from_protocol:
            return f" (set by protocol '{cfg.protocol.name}')"
        group = key.split(".")[0]
        if group in SECTIONS and cfg[group] is not None:
            return f" (in {group} '{cfg[group].name}')"
        for owner in ("method", "suite"):  # gen/train values merged from a preset's own section
            if cfg[owner] is not None and OmegaConf.select(cfg[owner], key) is not None:
                return f" (set by {owner} '{cfg[owner].name}')"
        return ""

    typed = check(Config, cfg, where=where, closed=True)
    batch, micro = typed["train"]["batch_size"], typed["train"]["micro_batch_size"]
    if micro and micro < batch and batch % micro:
        raise UsageError(f"train.micro_batch_size={micro}{where('train.micro_batch_size')}: train.batch_size={batch} is not a multiple of "
                         f"train.micro_batch_size={micro}; use a divisor of {batch}, or null")
    for group in SECTIONS:
        if cfg[group] is not None:
            check_section(cfg, group, where)
    metrics = [("suite.metrics", name) for name in (cfg.suite.metrics if cfg.suite is not None else [])]
    metrics += [(f"{g}.reward", cfg[g].reward) for g in ("suite", "method") if cfg[g] is not None and cfg[g].get("reward")]
    for key, name in metrics:  # registered names, before any weights load
        try:
            METRICS.entry(str(name))
        except UsageError as err:
            raise UsageError(f"{key}={show(OmegaConf.select(cfg, key))}{where(key)}: {err}") from None
    if cfg.protocol is not None:
        from bench.protocol import validate as validate_protocol

        validate_protocol(to_dict(cfg.protocol))


def check_section(cfg: DictConfig, group: str, where) -> None:
    """Check a suite, model or method section against its schema, closed: a key the schema does not
    declare is one line naming it, the file of the preset (or ``extends:`` parent) that wrote it and the
    nearest declared key. A method's schema is its recipe's ``Spec``; a plugin recipe that declares
    none keeps free-form keys (only the shared ones are checked)."""
    from bench.registry import METHODS, MODELS, SUITES

    registry = {"suite": SUITES, "model": MODELS, "method": METHODS}[group]
    cls = recipe_spec(cfg.method) if group == "method" else SECTIONS[group]
    if cls is not MethodSpec:
        for key in unknown_keys(cls, cfg[group]):
            close = close_key(cls, key)
            listing = f"bench run method={preset_key(cfg.method)} --help" if group == "method" else "bench run --help"
            hint = f"; did you mean {group}.{close}?" if close else f"; `{listing}` lists the keys"
            raise UsageError(f"unknown key '{group}.{key}' in {group} '{cfg[group].name}' ({preset_file(registry, preset_key(cfg[group]), key)}){hint}")
    check(cls, cfg[group], f"{group}.", where)


def recipe_spec(method: DictConfig) -> type:
    """The ``Spec`` of a method section's recipe (``recipe: module:Class``), imported to read it."""
    return getattr(import_recipe(method), "Spec", MethodSpec)


def import_recipe(method) -> type:
    """The recipe class of a method section (``recipe: module:Class``, or ``path/to/file.py:Class``
    relative to the preset's folder or the working folder), checked against ``bench.method.Method``;
    one that does not import, or is no class, is one line naming it and the fix."""
    from bench.registry import METHODS, Entry

    name, target = str(method.get("name")), method.get("recipe")
    if not target:
        raise UsageError(f"method '{name}' names no recipe: add `recipe: module:Class` to {preset_file(METHODS, preset_key(method), 'recipe')}")
    target = str(target)
    where = f"method.recipe={target} (in method '{name}')"
    if ":" not in target:
        raise UsageError(f"{where}: name a class as module:Class or path/to/file.py:Class (a subclass of bench.method.Method)")
    module = target.rpartition(":")[0] if target.rpartition(":")[0].endswith(".py") else target.partition(":")[0]
    fix = ("check the file's path (relative to the method's YAML or the current folder)" if module.endswith(".py") else
           f"put {module.split('.')[0]}.py in the current folder or on PYTHONPATH, or give path/to/file.py:Class")
    search = tuple(d for d in [method.get("_dir")] if d)
    try:
        cls = Entry(name, target, source=f"recipe: {target} of method '{name}'", base="bench.method:Method").load(search)
    except AttributeError:
        raise UsageError(f"{where}: {module} has no {target.rpartition(':')[2]}; name a class it defines") from None
    except (ImportError, OSError) as err:
        raise UsageError(f"{where}: does not import ({type(err).__name__}: {_one_line(err)}{_raised_at(err)}); {fix}") from None
    except Exception as err:  # a user's module that does not compile or fails as it runs (in a shipped recipe: a bug, its traceback)
        if module.startswith("bench."):
            raise
        message = err.msg if isinstance(err, SyntaxError) else _one_line(err)
        raise UsageError(f"{where}: fails on import ({type(err).__name__}: {message}{_raised_at(err)}); fix the module") from None
    if not isinstance(cls, type):
        raise UsageError(f"{where}: is {type(cls).__name__} {cls!r:.60}, not a class; name a subclass of bench.method.Method")
    return cls


def _raised_at(err: BaseException) -> str:
    """`` at FILE:LINE`` of a user's module where the error was raised (a syntax error's own line), or ""."""
    import traceback

    if isinstance(err, SyntaxError) and err.filename and err.lineno:
        return f" at {err.filename}:{err.lineno}"
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "importlib" not in f.filename and not f.filename.startswith(str(Path(__file__).parent))]
    return f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def preset_key(section) -> str:
    """What finds a preset section's entry again: its name, or the path it was given by."""
    return str(section.get("_path") or section.get("name"))


def preset_file(registry, name: str, dotted: str) -> str:
    """Where preset ``name`` (or the ``extends:`` parent that wrote it) sets ``dotted``: its file, or its
    entry; the preset's own where none does."""
    own, seen = None, []
    while name and name not in seen:
        seen.append(name)
        entry = registry.entry(name)
        target = entry.load()
        if isinstance(target, (str, Path)):
            raw, where = OmegaConf.to_container(OmegaConf.load(target)), str(target)
        else:
            raw = dict(target) if isinstance(target, dict) else dict(getattr(target, "default_config", dict)())
            where = entry.source or f"{registry.kind} '{name}'"
        own = own or where
        tree = raw
        for part in dotted.split("."):
            tree = tree.get(part, KeyError) if isinstance(tree, dict) else KeyError
        if tree is not KeyError:
            return where
        name = extended(registry, raw.get("extends"), Path(target).parent if isinstance(target, (str, Path)) else None)
    return own


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
