"""Suites and methods by path (issue 19, item 3): a suite YAML and a method plugin outside the repository,
given by path (or module:Class), evaluate and train with no install step, checked as shipped presets are;
`suite.limit_by` takes `suite.limit` prompts of each group; the key tables of docs/extending.md and the plugin
example are the code's (the example is read from docs/extending.md and trained here)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

from bench.config import compose, import_recipe, recipe_spec, to_dict
from bench.docs import COMMAND, render
from bench.schema import MethodSpec, SuiteKeys, fields_of
from bench.suite import load_suite

README = Path(__file__).resolve().parents[1] / "README.md"
EXTENDING = README.parent / "docs" / "extending.md"
PROMPTS = """prompt,group
a red apple,fruit
a green pear,fruit
a yellow banana,fruit
a small dog,animal
a black cat,animal
a blue car,vehicle
a red bus,vehicle
"""


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bench: error: ") and "Traceback" not in err, lines
    return lines[0]


@pytest.fixture
def suite_file(tmp_path) -> Path:
    """A three-group suite outside the repository: its YAML, prompt file and training prompts in one folder."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "prompts.csv").write_text(PROMPTS)
    (folder / "train.txt").write_text("a red apple\na small dog\n")
    path = folder / "mine.yaml"
    path.write_text("description: my prompts in three groups\nprompts: prompts.csv\ntrain_prompts: train.txt\n"
                    "group_columns: [group]\nreward: brightness\nmetrics: [brightness, contrast]\n")
    return path


@pytest.fixture
def clean_imports(monkeypatch, tmp_path):
    """sys.path and sys.modules as they were: the user's modules (files under tmp_path) are forgotten."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    yield
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


def group_rows(out: str) -> dict[str, int]:
    """The per-group table's rows: group -> its prompt count."""
    table = out.split("mean by group (95% CI):", 1)[1]
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\| (\w+)\s+\| (\d+)\s+\|", table, re.M) if m.group(1) != "group"}


# ---- suites by path -----------------------------------------------------------------------------------
def test_a_suite_by_relative_path_evaluates_and_prints_its_groups(cli, suite_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("eval", "suite=elsewhere/mine.yaml", "model=tiny-fewstep", "suite.limit=1", "suite.limit_by=group", "gen.batch_size=4")
    assert code == 0, err
    assert group_rows(out) == {"animal": 1, "fruit": 1, "vehicle": 1}  # one prompt of each group
    run_dir = next((tmp_path / "runs").iterdir())
    assert run_dir.name.startswith("mine-tiny-fewstep-base-")
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["n_prompts"] == 3 and manifest["suite"] == "mine"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert [g["by"] for g in summary["by_group"]] == ["group"]


def test_run_trains_a_shipped_method_on_a_suite_by_absolute_path(cli, suite_file, tmp_path):
    with suite_file.open("a") as f:
        f.write("limit_by: group\n")  # the suite's own default: suite.limit=1 takes one prompt of each group
    code, out, err = cli("run", f"suite={suite_file}", "method=sft", "model=tiny-fewstep", "suite.limit=1", "train.steps=1",
                         "train.batch_size=2", "method.samples_per_prompt=2", "gen.batch_size=4")
    assert code == 0, err
    assert "# mine / tiny-fewstep / sft vs mine-tiny-fewstep-base-" in out
    assert group_rows(out) == {"animal": 1, "fruit": 1, "vehicle": 1}
    assert sorted(p.name.rsplit("-", 2)[1] for p in (tmp_path / "runs").iterdir()) == ["base", "sft"]


def test_limit_by_takes_n_prompts_of_each_group_and_limit_alone_the_first_n(suite_file):
    def prompts(*overrides):
        return load_suite(to_dict(compose([f"suite={suite_file}", *overrides]))["suite"]).prompts

    assert prompts("suite.limit=2") == ["a red apple", "a green pear"]  # a grouped suite without limit_by: the first N, as before
    assert prompts("suite.limit=2", "suite.limit_by=group") == ["a red apple", "a green pear", "a small dog", "a black cat", "a blue car", "a red bus"]
    assert prompts("suite.limit=1", "suite.limit_by=GROUP") == ["a red apple", "a small dog", "a blue car"]  # a column matched without regard to case
    assert len(prompts()) == 7


def test_extends_takes_a_path_beside_the_yaml_and_a_typo_names_the_file_that_wrote_it(suite_file, cli):
    child = suite_file.parent / "sub" / "child.yaml"
    child.parent.mkdir()
    child.write_text("extends: ../mine.yaml\nimages_per_prompt: 2\n")
    suite = to_dict(compose([f"suite={child}"]))["suite"]
    assert suite["name"] == "child" and suite["_path"] == str(child) and suite["_dir"] == str(child.parent)
    assert suite["images_per_prompt"] == 2 and suite["group_columns"] == ["group"] and suite["metrics"] == ["brightness", "contrast"]
    with suite_file.open("a") as f:
        f.write("images_per_promt: 3\n")
    code, _, err = cli("eval", f"suite={child}")
    assert code == 2 and f"unknown key 'suite.images_per_promt' in suite 'child' ({suite_file}); did you mean suite.images_per_prompt?" in error_line(err)


def test_a_suite_whose_prompt_file_is_missing_is_one_line_and_leaves_no_run_folder(cli, tmp_path):
    (tmp_path / "lost.yaml").write_text("prompts: lost.csv\nmetrics: [brightness]\n")
    code, _, err = cli("eval", f"suite={tmp_path / 'lost.yaml'}")
    assert code == 3 and f"prompt file not found: {tmp_path / 'lost.csv'}" in error_line(err)
    assert not (tmp_path / "runs").exists()


def test_ls_lists_a_suite_and_a_method_by_path_beside_the_registered_ones(cli, suite_file, tmp_path):
    method = tmp_path / "sft-mine.yaml"
    method.write_text("extends: sft\ndescription: sft, my way\nsamples_per_prompt: 4\n")
    code, out, err = cli("ls", "suites", "methods", f"suite={suite_file}", f"method={method}")
    assert code == 0, err
    suites, methods = out.split("methods:")
    assert re.search(r"^  smoke +embedded smoke-test suite", suites, re.M)
    assert re.search(rf"^  mine +my prompts in three groups \[{re.escape(str(suite_file))}\]$", suites, re.M)
    assert re.search(r"^  sft +supervised fine-tuning", methods, re.M)
    assert re.search(rf"^  sft-mine +sft, my way \[{re.escape(str(method))}\]$", methods, re.M)


# ---- a method plugin: docs/extending.md's example -------------------------------------------------------------
def readme_block(language: str, first_line: str, page: Path = README) -> str:
    """The README's (or ``page``'s) fenced ``language`` block whose first line is ``first_line``."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```", page.read_text(encoding="utf-8"), re.M | re.S)
    match = [b for b in blocks if b.startswith(first_line)]
    assert len(match) == 1, f"{page.name}: no single ```{language} block starting with {first_line!r}"
    return match[0]


def test_docs_extending_holds_the_readme_suite_example():
    """The README's suite example is docs/extending.md's, word for word (the plugin example is only there)."""
    assert readme_block("yaml", "# mine.yaml", EXTENDING) == readme_block("yaml", "# mine.yaml"), "the ```yaml block '# mine.yaml' differs between README.md and docs/extending.md"


@pytest.fixture
def plugin(tmp_path) -> Path:
    """docs/extending.md's recipe file and method YAML, written outside the repository."""
    folder = tmp_path / "plugin"
    folder.mkdir()
    recipe = readme_block("python", "# my_recipe.py", EXTENDING)
    assert 20 <= len(recipe.splitlines()) <= 32
    (folder / "my_recipe.py").write_text(recipe)
    (folder / "my_method.yaml").write_text(readme_block("yaml", "# my_method.yaml", EXTENDING))
    return folder / "my_method.yaml"


def test_the_documented_plugin_trains_two_steps(cli, plugin, cache_dir, clean_imports):
    assert "bench run suite=smoke method=./my_method.yaml" in README.read_text() and "30-line recipe" in README.read_text()
    code, out, err = cli("train", f"method={plugin}", "model=tiny-fewstep", "train.steps=2", "train.batch_size=2", "method.samples=2")
    assert code == 0, err
    final = Path(out.strip().splitlines()[-1].removeprefix("checkpoint: "))
    assert final.parent.parent == cache_dir / "checkpoints" and final.parent.name.startswith("my_method-")
    assert (final / "weights.safetensors").is_file()
    history = json.loads((final / "train.json").read_text())["history"]
    assert len(history) == 2 and all(math.isfinite(x) and x > 0 for x in history)


def test_a_recipe_by_module_or_file_composes_with_its_spec_and_its_source_keys_the_checkpoint(plugin, monkeypatch, clean_imports):
    from bench.trainer import recipe_source_hash

    folder = plugin.parent
    monkeypatch.chdir(folder)
    for value in ("my_recipe:SelfTune", "my_recipe.py:SelfTune", str(folder / "my_recipe.py") + ":SelfTune", "my_method.yaml"):
        method = compose([f"method={value}"]).method
        assert recipe_spec(method).__qualname__ == "SelfTune.Spec", value
        assert method.name == ("my_method" if value.endswith(".yaml") else "SelfTune")
    method = to_dict(compose([f"method={plugin}"]))["method"]
    assert method["samples"] == 16 and method["_path"] == str(plugin) and method["_dir"] == str(folder)

    def key() -> str:
        return recipe_source_hash(import_recipe(method)(method))

    (folder / "helper.py").write_text("SCALE = 1.0\n")
    (folder / "my_recipe.py").write_text("import helper\n" + (folder / "my_recipe.py").read_text())
    first = key()
    assert first == key()
    (folder / "helper.py").write_text("SCALE = 2.0\n")  # a module beside the recipe that it imports
    sys.modules.pop("helper", None)
    second = key()
    (folder / "my_recipe.py").write_text((folder / "my_recipe.py").read_text() + "# edited\n")
    assert len({first, second, key()}) == 3  # every edit is another checkpoint


# ---- errors: one line, exit 2, no run folder ------------------------------------------------------------
@pytest.mark.parametrize(
    "files, args, expected",
    [
        ({}, ["eval", "suite=missing/mine.yaml"], r"suite=missing/mine.yaml: no such file \(.*missing/mine.yaml\); give the path of a suite YAML"),
        ({"list.yaml": "- brightness\n- contrast\n"}, ["eval", "suite=list.yaml"], r"suite file .*list.yaml holds a list, not a mapping of keys: write one `key: value` per line"),
        ({"bad.yaml": "metrics: [brightness\n"}, ["eval", "suite=bad.yaml"], r"suite file .*bad.yaml is not valid YAML \(.* at line 2, column 1\)"),
        ({"typo.yaml": "prompts: p.txt\ngroup_colums: [group]\nmetrics: [brightness]\n"}, ["eval", "suite=typo.yaml"],
         r"unknown key 'suite.group_colums' in suite 'typo' \(.*typo.yaml\); did you mean suite.group_columns\?"),
        ({}, ["run", "method=no_such_module_xyz:Recipe"],
         r"method.recipe=no_such_module_xyz:Recipe \(in method 'Recipe'\): does not import \(ModuleNotFoundError: No module named 'no_such_module_xyz'\); put no_such_module_xyz.py in the current folder"),
        ({"plain.py": "class NotAMethod:\n    pass\n"}, ["run", "method=plain.py:NotAMethod"],
         r"'NotAMethod' \(recipe: plain.py:NotAMethod of method 'NotAMethod'\) is .*plain.py:NotAMethod, which is no bench.method.Method: a plugin class must subclass it"),
        ({"plain.py": "def recipe():\n    pass\n"}, ["run", "method=plain.py:recipe"], r"method.recipe=plain.py:recipe \(in method 'recipe'\): is function .*, not a class"),
        ({"m.yaml": "recipe: gone.py:Recipe\n"}, ["run", "method=m.yaml"], r"method.recipe=gone.py:Recipe \(in method 'm'\): does not import \(ModuleNotFoundError: no such file: .*gone.py\); check the file's path"),
        ({"m.yaml": "recipe: bench.methods.sft:SFTT\n"}, ["run", "method=m.yaml"], r"method.recipe=bench.methods.sft:SFTT \(in method 'm'\): bench.methods.sft has no SFTT; name a class it defines"),
        ({"m.yaml": "just a sentence\n"}, ["run", "method=m.yaml"], r"method file .*m.yaml holds a single value, not a mapping of keys"),
        ({"boom.py": "import math\nx = 1 / 0\n"}, ["run", "method=boom.py:Recipe"],
         r"method.recipe=boom.py:Recipe \(in method 'Recipe'\): fails on import \(ZeroDivisionError: division by zero at .*boom.py:2\); fix the module"),
        ({"syn.py": "def f(:\n"}, ["run", "method=syn.py:Recipe"], r"fails on import \(SyntaxError: invalid syntax at .*syn.py:1\); fix the module"),
    ],
)
def test_a_bad_path_is_one_line_and_leaves_no_run_folder(cli, tmp_path, monkeypatch, clean_imports, files, args, expected):
    monkeypatch.chdir(tmp_path)
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    code, _, err = cli(*args)
    assert code == 2 and re.search(expected, error_line(err)), err
    assert not (tmp_path / "runs").exists()


def test_limit_by_a_column_the_prompts_lack_is_one_line(cli, suite_file, tmp_path):
    code, _, err = cli("eval", f"suite={suite_file}", "suite.limit=1", "suite.limit_by=colour")
    assert code == 3
    assert f"suite.limit_by=colour: {suite_file.parent / 'prompts.csv'} has no column colour (its columns: prompt, group)" in error_line(err)
    assert not (tmp_path / "runs").exists()


# ---- the key tables of docs/extending.md are the schema's ---------------------------------------------
def test_the_key_tables_list_every_suite_and_method_key_as_the_schema_does():
    text = EXTENDING.read_text(encoding="utf-8")
    assert render(text) == text, f"docs/extending.md's generated tables are stale: run {COMMAND}"
    for name, cls in (("SuiteKeys", SuiteKeys), ("MethodSpec", MethodSpec)):
        table = text.split(f"<!-- keys:{name} -->", 1)[1].split("<!-- /keys -->", 1)[0]
        assert [re.match(r"\| `(\w+)`", line).group(1) for line in table.strip().splitlines()[2:]] == [f.name for f in fields_of(cls)]
