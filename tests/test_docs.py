"""The documentation (issue 19, item 5): the README is a landing page and the reference lives in docs/, a
mkdocs site. Its generated tables (what is registered, the keys a preset may hold) are the code's, every
relative link of the README and the pages points at a file, every page is in the site's nav, and the site
builds with no warning. Nothing here builds a model."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bench.docs import COMMAND, TABLES, render
from bench.schema import table_cell

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md"))


def test_the_generated_tables_are_current():
    """One command writes every generated block; run in a process of its own, so no test's registration leaks in."""
    done = subprocess.run([sys.executable, "-m", "bench.docs", "--check"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{done.stdout}{done.stderr}\nthe generated tables of docs/ are stale: run {COMMAND}"


def test_every_registry_kind_has_a_block_and_blocks_are_filled():
    """Each generated table appears on some page, and each block holds a table (not an empty marker pair)."""
    text = "\n".join(page.read_text(encoding="utf-8") for page in PAGES)
    for kind in TABLES:
        assert f"<!-- registry:{kind} -->\n| " in text, f"no page holds a filled <!-- registry:{kind} --> block: add one and run {COMMAND}"


def test_table_cells_are_escaped():
    assert table_cell("a | b\nc <d>") == "a \\| b c &lt;d>"
    # a marker block is replaced whole, and text around it kept
    text = "before\n<!-- registry:datasets -->\nstale\n<!-- /registry -->\nafter\n"
    out = render(text)
    assert out.startswith("before\n<!-- registry:datasets -->\n| dataset | description |") and out.endswith("<!-- /registry -->\nafter\n")
    assert render(out) == out


def test_an_installed_plugin_stays_out_of_the_generated_tables(monkeypatch):
    """The tables list what ships here: another package's entry points are left out (`bench ls` shows them)."""
    from importlib.metadata import EntryPoint

    import bench.registry

    monkeypatch.setattr(bench.registry, "entry_points", lambda group: [EntryPoint(name="theirs", value="json:loads", group=group)])
    reg = bench.registry.Registry("dataset", "bench.datasets")
    reg.add("ours", {"description": "shipped"}, "shipped")
    assert [name for name, _ in reg.describe()] == ["ours", "theirs"]
    assert reg.describe(plugins=False) == [("ours", "shipped")]


def _links(page: Path) -> list[str]:
    """The link and image targets of a markdown page, outside code."""
    text = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.M | re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


def test_every_relative_link_points_at_a_file():
    bad = []
    for page in [ROOT / "README.md", *PAGES]:
        for target in _links(page):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = (page.parent / target.split("#", 1)[0]).resolve()
            inside = page == ROOT / "README.md" or path.is_relative_to(DOCS)  # the site holds only docs/
            if not path.is_file() or not inside:
                bad.append(f"{page.relative_to(ROOT)}: {target}")
    assert not bad, "links to no file (or, from docs/, outside it):\n" + "\n".join(bad)


def test_the_readme_links_every_page_and_is_short():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    linked = {(ROOT / t.split("#", 1)[0]).resolve() for t in _links(ROOT / "README.md")}
    missing = [str(p.relative_to(ROOT)) for p in PAGES if p.resolve() not in linked]
    assert not missing, f"README.md links no page {missing}"
    assert len(readme.splitlines()) <= 160, "README.md is a landing page: the reference goes in docs/"


def _nav_pages(node) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [p for value in node.values() for p in _nav_pages(value)]
    if isinstance(node, list):
        return [p for value in node for p in _nav_pages(value)]
    return []


def test_every_page_is_in_the_nav():
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))
    nav = _nav_pages(config["nav"])
    pages = [str(p.relative_to(DOCS)) for p in PAGES]
    assert sorted(set(pages) - set(nav)) == [], "pages missing from mkdocs.yml's nav"
    assert sorted(set(nav) - set(pages)) == [], "mkdocs.yml's nav names pages that do not exist"


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason="mkdocs or mkdocs-material is not installed (pip install -e '.[docs]'); .ci/run builds the site")
def test_the_site_builds_strict(tmp_path):
    """About 1 s: the build that .ci/run runs, with every warning (a broken link or anchor, a page outside the nav)
    an error (not with -q, which hides the warnings from --strict too)."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "index.html").is_file()
