"""One generic, lazy registry for models, methods, suites and metrics.

An entry is a name, a one-line description and a *target*: an object, a
``"module:Object"`` string imported on first use, or a path to a YAML config.
Built-in entries are declared without importing anything heavy; third-party
packages add entries through the entry-point groups ``bench.models``,
``bench.methods``, ``bench.suites``, ``bench.metrics``, ``bench.datasets`` and ``bench.protocols`` (the
entry point's value is loaded and must be a YAML path, a config dict or a class).

Surprises are errors: a name declared twice, or a plugin that shadows a built-in, is one line naming
both sources (the first would otherwise win silently, and a run would not be what its name says), and
a class target is checked against the kind's base class when it is loaded.

Suites and methods are also taken by path, with no install step (``suite=/any/mine.yaml``,
``method=./mine.yaml``, ``method=my_module:MyRecipe``, ``method=path/to/file.py:MyRecipe``):
``Registry.entry`` answers such a value with an entry of its own, named after the file (or class), that
is not added to the registry; ``import_target`` loads a recipe from a file or from the working folder.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import os
import re
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from bench.errors import UsageError


@dataclass
class Entry:
    name: str
    target: Any
    description: str = ""
    source: str = ""  # where it was declared (a file, an entry point and its package), for error lines
    base: str | None = None  # "module:Class" a class target must subclass
    plugin: bool = False  # added by an entry point (another package), not shipped here

    def load(self, search: tuple = ()) -> Any:
        """Resolve the target: import ``module:Object`` strings (``file.py:Object`` loads that file, relative
        to a folder of ``search`` or the working folder), keep the rest; a class is checked against ``base``."""
        if isinstance(self.target, str) and ":" in self.target and not self.target.endswith((".yaml", ".yml")):
            self.target = import_target(self.target, search)
        if self.base and isinstance(self.target, type):
            base = import_target(self.base)
            if not issubclass(self.target, base):
                where = f" ({self.source})" if self.source else ""
                module = sys.modules.get(self.target.__module__)
                shown = (f"{module.__file__}:" if self.target.__module__.startswith("bench_user_") and module is not None else f"{self.target.__module__}.")
                raise UsageError(
                    f"'{self.name}'{where} is {shown}{self.target.__qualname__}, which is no "
                    f"{base.__module__}.{base.__name__}: a plugin class must subclass it"
                )
        return self.target


def import_target(target: str, search: tuple = ()) -> Any:
    """The object a ``module:Object.attr`` string names. ``path/to/file.py:Object`` loads that file (a
    relative path from the first folder of ``search`` that holds it, else the working folder); a module
    that is not importable as it stands is looked for in ``search`` and the working folder too (a user's
    recipe beside their YAML, or where `bench` is run), so a plugin needs no install step."""
    module, _, attr = target.rpartition(":") if target.rpartition(":")[0].endswith(".py") else target.partition(":")
    if module.endswith(".py"):
        obj = load_file_module(find_file(module, search))
    else:
        try:
            obj = importlib.import_module(module)
        except ModuleNotFoundError as err:
            folders = [str(Path(d).resolve()) for d in (*search, Path.cwd())]
            if err.name != module.split(".")[0] or all(d in sys.path for d in folders):
                raise
            sys.path.extend(d for d in dict.fromkeys(folders) if d not in sys.path)
            obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def find_file(path: str, search: tuple = ()) -> Path:
    """``path`` as given, or relative to the first folder of ``search`` that holds it, else the working folder."""
    if Path(path).is_absolute():
        return Path(path)
    return next((Path(d) / path for d in search if (Path(d) / path).is_file()), Path.cwd() / path)


def load_file_module(path: Path):
    """The module of a Python file, loaded under a name of its own (its stem and a hash of its absolute
    path) and kept in ``sys.modules``, so its source is found and hashed as a recipe's
    (``bench.trainer.recipe_source_hash``); loaded again when the file has changed. Its folder goes on
    ``sys.path``, so it imports the modules beside it."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ModuleNotFoundError(f"no such file: {path}", name=str(path))
    source = path.read_bytes()
    digest = hashlib.sha256(source).hexdigest()
    stem = re.sub(r"\W", "_", path.stem)
    name = f"bench_user_{stem}_{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"
    module = sys.modules.get(name)
    if module is not None and getattr(module, "__bench_sha256__", None) == digest:
        return module
    if str(path.parent) not in sys.path:
        sys.path.append(str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    module.__bench_sha256__ = digest
    return module


def is_path(value: str) -> bool:
    """Whether a preset value is a file or ``module:Class`` rather than a registered name."""
    value = str(value)
    return value.endswith((".yaml", ".yml")) or "/" in value or os.sep in value or (":" in value and "://" not in value)


class Registry:
    """Name -> Entry for one kind of component ("model", "method", ...)."""

    def __init__(self, kind: str, group: str, base: str | None = None, by_path: bool = False):
        self.kind = kind
        self.group = group
        self.base = base  # "module:Class" every class entry subclasses
        self.by_path = by_path  # a value that is a path (or module:Class) names a preset outside the registry
        self._entries: dict[str, Entry] = {}
        self._plugins_loaded = False

    def add(self, name: str, target: Any, description: str = "", source: str = "") -> None:
        """Declare ``name``; a name already declared is an error naming both sources."""
        source = source or _source_of(target)
        if name in self._entries:
            first = self._entries[name]
            raise UsageError(
                f"{self.kind} '{name}' is declared twice: by {first.source or repr(first.target)} and by {source or repr(target)}; "
                "rename one of them"
            )
        self._entries[name] = Entry(name, target, description, source, self.base)

    def register(self, name: str, description: str = ""):
        """Decorator form of :meth:`add` for classes defined in Python."""

        def wrap(obj):
            self.add(name, obj, description or (obj.__doc__ or "").strip().split("\n")[0])
            return obj

        return wrap

    def add_yaml_dir(self, directory: Path) -> None:
        """Register every ``*.yaml`` in a folder under its stem, reading only its description."""
        for path in sorted(Path(directory).glob("*.yaml")):
            self.add(path.stem, path, _yaml_description(path))

    def _load_plugins(self) -> None:
        """Add the entry points of group ``self.group`` (once): a plugin is an addition, so one that takes
        a built-in's name, or another plugin's, is refused in one line naming both."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.group):
            package = f" of package {ep.dist.name}" if getattr(ep, "dist", None) is not None else ""
            self.add(ep.name, ep.value, f"(plugin {ep.value})", f"the entry point {ep.name} = {ep.value} in group {self.group}{package}")
            self._entries[ep.name].plugin = True

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)

    def entry(self, name: str) -> Entry:
        self._load_plugins()
        if name not in self._entries and self.by_path and is_path(name):
            return self.path_entry(name)
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UsageError(
                f"unknown {self.kind} '{name}'{hint} (`bench ls {self.kind}s` lists all {len(self._entries)})"
            )
        return self._entries[name]

    def get(self, name: str) -> Any:
        return self.entry(name).load()

    def path_entry(self, value: str) -> Entry:
        """A preset given by path instead of a name, not added to the registry: a YAML file (absolute, or
        relative to the working folder), named after its stem; for a kind with a base class (a method) also
        ``module:Class`` or ``path/to/file.py:Class``, a preset of the class alone, named after the class."""
        value = str(value)
        if ":" in value and self.base and not value.endswith((".yaml", ".yml")):
            name = value.rpartition(":")[2].split(".")[-1]
            return Entry(name, {"recipe": value, "_dir": str(Path.cwd())}, f"(given as {value})", value, self.base)
        path = Path(os.path.abspath(Path(value).expanduser()))  # normalized: ../mine.yaml names the file itself
        if not path.is_file():
            what = "is a folder, not a file" if path.is_dir() else "no such file"
            raise UsageError(
                f"{self.kind}={value}: {what} ({path}); give the path of a {self.kind} YAML, absolute or relative to the "
                f"current folder, or a name from `bench ls {self.kind}s`"
            )
        return Entry(path.stem, path, _yaml_description(path), str(path), self.base)

    def describe(self, plugins: bool = True) -> list[tuple[str, str]]:
        """(name, description) of every entry, sorted; ``plugins=False`` leaves out the entry points'
        (the generated documentation lists what ships here, whatever else is installed)."""
        return [(n, self._entries[n].description) for n in self.names() if plugins or not self._entries[n].plugin]


def _source_of(target: Any) -> str:
    """Where a target comes from, in words: its file, its ``module:Object``, or its module."""
    if isinstance(target, Path) or (isinstance(target, str) and target.endswith(".yaml")):
        return str(target)
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None)
    return f"{module}:{getattr(target, '__qualname__', '')}" if module else ""


def _yaml_description(path: Path) -> str:
    """The ``description:`` line of a YAML file, without parsing the whole file."""
    for line in Path(path).read_text().splitlines():
        if line.startswith("description:"):
            return line.split(":", 1)[1].strip().strip("'\"")
    return ""


MODELS = Registry("model", "bench.models")
METHODS = Registry("method", "bench.methods", base="bench.method:Method", by_path=True)  # a method's class is its YAML's ``recipe``
SUITES = Registry("suite", "bench.suites", by_path=True)
METRICS = Registry("metric", "bench.metrics", base="bench.metrics:Metric")
DATASETS = Registry("dataset", "bench.datasets")
PROTOCOLS = Registry("protocol", "bench.protocols")  # a paper's evaluation protocol: suites, seeds, samplers, metrics, checkpoint choice

REGISTRIES = {"models": MODELS, "methods": METHODS, "suites": SUITES, "metrics": METRICS, "datasets": DATASETS, "protocols": PROTOCOLS}


def _builtins() -> None:
    """Declare the built-in entries (nothing heavy is imported here)."""
    import bench.methods
    import bench.suites

    MODELS.add_yaml_dir(Path(__file__).parent / "models" / "configs")
    DATASETS.add_yaml_dir(Path(__file__).parent / "datasets")
    METHODS.add_yaml_dir(Path(bench.methods.__file__).parent)
    SUITES.add_yaml_dir(Path(bench.suites.__file__).parent)
    PROTOCOLS.add_yaml_dir(Path(bench.suites.__file__).parent / "protocols")
    from bench.metrics import BUILTIN_METRICS

    for name, (target, description) in BUILTIN_METRICS.items():
        METRICS.add(name, target, description)


_builtins()
