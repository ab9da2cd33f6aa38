"""The generated parts of the documentation (``docs/``, built by mkdocs).

Every table that lists what is registered, or the keys a preset may hold, is written from the code, so it
cannot drift: a page holds a marker block

    <!-- registry:KIND -->            <!-- keys:NAME -->
    (the table)                       (the table)
    <!-- /registry -->                <!-- /keys -->

and ``python -m bench.docs`` rewrites every block of every ``docs/**/*.md`` (``--check``: writes nothing,
exits 1 naming the stale pages; ``tests/test_docs.py`` runs it). KIND is one of ``TABLES``; NAME one of
``bench.schema.TABLES``. The rows are what ``bench ls`` lists (``Registry.describe``, the protocols'
``describe_rows``), sorted by name, without the entry-point plugins another package may have installed.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from bench.schema import table_cell

DOCS = Path(__file__).resolve().parents[1] / "docs"
BLOCK = re.compile(r"^(<!-- (registry|keys):([\w-]+) -->)\n.*?^(<!-- /\2 -->)$", re.S | re.M)  # the first closing marker
COMMAND = "python -m bench.docs"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table; every cell escaped (``bench.schema.table_cell``)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(table_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def code(name) -> str:
    return f"`{name}`" if name else "-"


def extends_of(registry, name: str) -> str | None:
    """The ``extends:`` a registered YAML states itself (not its parents'), or None."""
    from bench.config import read_yaml

    target = registry.entry(name).load()
    if not isinstance(target, (str, Path)):
        return None
    value = read_yaml(target, registry.kind).get("extends")
    return str(value) if value else None


def _rows(registry) -> list[tuple[str, str]]:
    return registry.describe(plugins=False)


def methods_table() -> str:
    """Every method preset: what it extends and its description."""
    from bench.registry import METHODS

    rows = [[code(name), code(extends_of(METHODS, name)), description] for name, description in _rows(METHODS)]
    return table(["preset", "extends", "description"], rows)


def method_recipes_table() -> str:
    """Every base preset (one that extends none) with its recipe class and the presets built on it,
    directly or through another preset."""
    from bench.config import load_entry_config
    from bench.registry import METHODS

    names = [name for name, _ in _rows(METHODS)]
    parent = {name: extends_of(METHODS, name) for name in names}

    def root(name: str) -> str:
        seen = set()
        while parent.get(name) and name not in seen:
            seen.add(name)
            name = parent[name]
        return name

    rows = []
    for name in names:
        if parent[name]:
            continue
        recipe = load_entry_config(METHODS, name).get("recipe")
        built = sorted(n for n in names if n != name and root(n) == name)
        rows.append([code(name), code(recipe), ", ".join(code(n) for n in built) or "-"])
    return table(["base preset", "recipe", "presets built on it"], rows)


def suites_table() -> str:
    """Every suite: its metrics, images per prompt and description."""
    from bench.config import load_entry_config
    from bench.registry import SUITES

    rows = []
    for name, description in _rows(SUITES):
        cfg = load_entry_config(SUITES, name)
        metrics = ", ".join(code(m) for m in (cfg.get("metrics") or []))
        rows.append([code(name), metrics or "-", str(cfg.get("images_per_prompt") or 1), description])
    return table(["suite", "metrics", "images per prompt", "description"], rows)


def metrics_table() -> str:
    """Every metric: what it reads, its direction, whether a reward can back-propagate through it,
    its version, whether it follows the published recipe, and its description."""
    from bench.html_report import NON_CANONICAL
    from bench.metrics import DistributionMetric
    from bench.registry import METRICS

    rows = []
    for name, description in _rows(METRICS):
        cls = METRICS.get(name)
        info = cls.info
        reads = ("the generated set against real images" if issubclass(cls, DistributionMetric)
                 else "pixels and reference photos" if cls.needs_refs
                 else "pixels and prompt" if cls.needs_prompts else "pixels")
        canonical = "no" if NON_CANONICAL in f"{info.scale} {description}".upper() else "yes"
        rows.append([code(name), reads, "higher" if info.higher_is_better else "lower",
                     "yes" if cls.differentiable else "no", code(info.version), canonical, description])
    return table(["metric", "reads", "better", "differentiable", "version", "canonical", "description"], rows)


def models_table() -> str:
    from bench.registry import MODELS

    return table(["model", "extends", "description"],
                 [[code(name), code(extends_of(MODELS, name)), description] for name, description in _rows(MODELS)])


def datasets_table() -> str:
    from bench.registry import DATASETS

    return table(["dataset", "description"], [[code(name), description] for name, description in _rows(DATASETS)])


def protocols_table() -> str:
    """Every protocol, with why it is not (fully) expressible where it is not (as `bench ls protocols`)."""
    from bench.protocol import describe_rows
    from bench.registry import PROTOCOLS

    return table(["protocol", "description"], [[code(name), description] for name, description in describe_rows(_rows(PROTOCOLS))])


TABLES = {
    "methods": methods_table,
    "method-recipes": method_recipes_table,
    "suites": suites_table,
    "metrics": metrics_table,
    "models": models_table,
    "datasets": datasets_table,
    "protocols": protocols_table,
}


def render(text: str, where: str = "") -> str:
    """``text`` with every marker block's table generated again."""
    from bench.schema import TABLES as KEYS, markdown_table

    def block(match):
        kind, name = match.group(2), match.group(3)
        known = TABLES if kind == "registry" else KEYS
        if name not in known:
            raise SystemExit(f"{where}: unknown block <!-- {kind}:{name} -->; known: {', '.join(sorted(known))}")
        body = TABLES[name]() if kind == "registry" else markdown_table(KEYS[name])
        return f"{match.group(1)}\n{body}\n{match.group(4)}"

    return BLOCK.sub(block, text)


def pages(docs: Path = DOCS) -> list[Path]:
    return sorted(docs.rglob("*.md"))


def stale(docs: Path = DOCS, write: bool = False) -> list[Path]:
    """The pages whose generated blocks are not current (rewritten when ``write``)."""
    out = []
    for page in pages(docs):
        text = page.read_text(encoding="utf-8")
        new = render(text, str(page))
        if new != text:
            out.append(page)
            if write:
                page.write_text(new, encoding="utf-8")
    return out


def main(argv: list[str]) -> int:
    check = "--check" in argv
    changed = stale(write=not check)
    root = DOCS.parent
    for page in changed:
        print(f"{'stale' if check else 'rewrote'}: {page.relative_to(root)}")
    if check and changed:
        print(f"the generated tables above are stale: run {COMMAND}", file=sys.stderr)
        return 1
    if not changed:
        print(f"the generated tables of {len(pages())} pages under {DOCS.relative_to(root)}/ are current")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
