"""One generic, lazy registry for models, methods, suites and metrics.

An entry is a name, a one-line description and a *target*: an object, a
``"module:Object"`` string imported on first use, or a path to a YAML config.
Built-in entries are declared without importing anything heavy; third-party
packages add entries through the entry-point groups ``bench.models``,
``bench.methods``, ``bench.suites``, ``bench.metrics``, ``bench.datasets`` and ``bench.protocols`` (the
entry point's value is loaded and must be a YAML path, a config dict or a class).
"""

from __future__ import annotations

import difflib
import importlib
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

    def load(self) -> Any:
        """Resolve the target: import ``module:Object`` strings, keep the rest."""
        if isinstance(self.target, str) and ":" in self.target and not self.target.endswith(".yaml"):
            module, _, attr = self.target.partition(":")
            obj = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
            self.target = obj
        return self.target


class Registry:
    """Name -> Entry for one kind of component ("model", "method", ...)."""

    def __init__(self, kind: str, group: str):
        self.kind = kind
        self.group = group
        self._entries: dict[str, Entry] = {}
        self._plugins_loaded = False

    def add(self, name: str, target: Any, description: str = "") -> None:
        self._entries[name] = Entry(name, target, description)

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
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        for ep in entry_points(group=self.group):
            if ep.name not in self._entries:
                self._entries[ep.name] = Entry(ep.name, ep.value, f"(plugin {ep.value})")

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._entries)

    def entry(self, name: str) -> Entry:
        self._load_plugins()
        if name not in self._entries:
            close = difflib.get_close_matches(name, list(self._entries), n=3, cutoff=0.5)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise UsageError(
                f"unknown {self.kind} '{name}'{hint} (`bench ls {self.kind}s` lists all {len(self._entries)})"
            )
        return self._entries[name]

    def get(self, name: str) -> Any:
        return self.entry(name).load()

    def describe(self) -> list[tuple[str, str]]:
        return [(n, self._entries[n].description) for n in self.names()]


def _yaml_description(path: Path) -> str:
    """The ``description:`` line of a YAML file, without parsing the whole file."""
    for line in Path(path).read_text().splitlines():
        if line.startswith("description:"):
            return line.split(":", 1)[1].strip().strip("'\"")
    return ""


MODELS = Registry("model", "bench.models")
METHODS = Registry("method", "bench.methods")
SUITES = Registry("suite", "bench.suites")
METRICS = Registry("metric", "bench.metrics")
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
