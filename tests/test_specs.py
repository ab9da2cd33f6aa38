"""Typed specs: every recipe, suite, model and sampler section is checked, closed, at composition,
wherever a value comes from (a preset YAML, its ``extends:`` parents, the command line); the
recipes read their typed settings from ``Method.spec``, whose defaults are the only ones."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bench import protocol as protocols
from bench.config import compose, recipe_spec, to_dict
from bench.errors import UsageError
from bench.method import Method
from bench.registry import DATASETS, METHODS, MODELS, PROTOCOLS, SUITES, Entry
from bench.schema import DOC_KEYS, MISSING, MethodSpec, _default, fields_of


@pytest.fixture
def register(monkeypatch, tmp_path):
    """Register a preset from YAML text for one test, as a plugin's YAML would be: returns its file."""

    def add(registry, name: str, text: str) -> Path:
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        registry._load_plugins()
        monkeypatch.setitem(registry._entries, name, Entry(name, path, "test"))
        return path

    return add


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("bench: error: ") and "Traceback" not in err, lines
    return lines[0]


# ---- a typo in a preset, a suite or a model YAML ---------------------------------------------------
def test_a_typo_in_a_method_preset_fails_at_composition_naming_its_file(cli, register):
    path = register(METHODS, "sft-typo", "extends: sft\npromt_dropout: 0.1\n")
    code, _, err = cli("train", "method=sft-typo")
    line = error_line(err)
    assert code == 2
    assert f"unknown key 'method.promt_dropout' in method 'sft-typo' ({path}); did you mean method.prompt_dropout?" in line


def test_a_typo_in_a_suite_yaml_fails_at_composition_naming_its_file(cli, register):
    path = register(SUITES, "micro-typo", "extends: micro\nimages_per_promt: 2\n")
    code, _, err = cli("eval", "suite=micro-typo", "model=tiny")
    assert code == 2
    assert f"unknown key 'suite.images_per_promt' in suite 'micro-typo' ({path}); did you mean suite.images_per_prompt?" in error_line(err)


def test_a_typo_in_a_model_yaml_fails_at_composition_naming_its_file(cli, register):
    path = register(MODELS, "tiny-typo", "extends: tiny\nsampler:\n  stpes: 3\n")
    code, _, err = cli("eval", "model=tiny-typo")
    assert code == 2
    assert f"unknown key 'model.sampler.stpes' in model 'tiny-typo' ({path}); did you mean model.sampler.steps?" in error_line(err)
    path = register(MODELS, "tiny-typo2", "extends: tiny\nresolutoin: 32\n")
    with pytest.raises(UsageError, match=rf"^unknown key 'model.resolutoin' in model 'tiny-typo2' \({path}\); did you mean model.resolution\?$"):
        compose(["model=tiny-typo2"])


def test_a_typo_in_an_extends_parent_names_the_parents_file(register):
    parent = register(METHODS, "sft-parent", "extends: sft\ndrop_tie: false\n")
    register(METHODS, "sft-child", "extends: sft-parent\nprompt_dropout: 0.1\n")
    with pytest.raises(UsageError, match=rf"^unknown key 'method.drop_tie' in method 'sft-child' \({parent}\); did you mean method.drop_ties\?$"):
        compose(["method=sft-child"])


def test_a_typo_on_the_command_line_is_refused_too(cli):
    code, _, err = cli("train", "method=sft", "method.promt_dropout=0.1")
    line = error_line(err)
    assert code == 2 and "unknown config key 'method.promt_dropout'" in line and "did you mean method.prompt_dropout" in line


# ---- types, ranges and required keys ----------------------------------------------------------------
def test_a_missing_required_recipe_key_is_refused_at_composition(register):
    register(METHODS, "pso-nobeta", "recipe: bench.methods.pso:PSO\nsamples_per_prompt: 4\n")
    with pytest.raises(UsageError, match=r"^method\.beta=null \(in method 'pso-nobeta'\): missing; use a number > 0$"):
        compose(["method=pso-nobeta"])
    from bench.methods.pso import PSO

    with pytest.raises(UsageError, match=r"^method\.beta=null: missing; use a number > 0$"):
        PSO({"samples_per_prompt": 4})  # a recipe built from a plain dict refuses it as well


def test_a_preset_without_a_recipe_is_refused_at_composition(register):
    path = register(METHODS, "norecipe", "beta: 5\n")
    with pytest.raises(UsageError, match=rf"^method 'norecipe' names no recipe: add `recipe: module:Class` to {path}$"):
        compose(["method=norecipe"])


@pytest.mark.parametrize(
    "text, message",
    [
        ("prompt_dropout: abc", r"^method\.prompt_dropout=abc \(in method 'sft-bad'\): not a number; use a number in \[0, 1\] \(default 0\.0\)$"),
        ("samples_per_prompt: 0", r"^method\.samples_per_prompt=0 \(in method 'sft-bad'\): out of range; use an integer >= 1 \(default 8\)$"),
        ("timesteps: karras", r"^method\.timesteps=karras \(in method 'sft-bad'\): not allowed; use one of uniform, sampler \(default uniform\)$"),
        ("drop_ties: maybe", r"^method\.drop_ties=maybe \(in method 'sft-bad'\): not true or false; use true or false \(default true\)$"),
    ],
)
def test_a_wrong_type_or_range_from_a_preset_is_one_line(register, text, message):
    register(METHODS, "sft-bad", f"extends: sft\n{text}\n")
    with pytest.raises(UsageError, match=message):
        compose(["method=sft-bad"])


def test_a_wrong_value_in_a_suite_or_sampler_is_named():
    with pytest.raises(UsageError, match=r"^model\.sampler\.kind=heun: not allowed; use one of ddim, euler"):
        compose(["model.sampler.kind=heun"])
    with pytest.raises(UsageError, match=r"^suite\.group_columns=5: "):
        compose(["suite=parti", "suite.group_columns=5"])


# ---- the typed settings the recipes read ------------------------------------------------------------
def test_the_recipe_reads_typed_settings_with_the_specs_defaults():
    from bench.methods.d3po import D3PO
    from bench.methods.pso import PSO

    pso = PSO({"beta": 5, "seed": "3"})
    assert pso.spec.beta == 5.0 and isinstance(pso.spec.beta, float) and pso.spec.seed == 3
    assert (pso.spec.samples_per_prompt, pso.spec.drop_ties, pso.spec.reduction, pso.spec.prompt_dropout) == (8, True, "sum", 0.0)
    rounds = D3PO({"beta": 0.1, "prompts_per_round": 4}).rounds()
    assert (rounds.prompts_per_round, rounds.samples_per_prompt, rounds.epochs, rounds.seed) == (4, 2, 1, 0)


def test_every_preset_builds_its_recipe_and_its_typed_values_are_the_composed_ones():
    for name in METHODS.names():
        method = to_dict(compose([f"method={name}"]))["method"]
        cls = Entry(name, method["recipe"], base="bench.method:Method").load()
        spec = cls(method).spec
        assert type(spec) is cls.Spec and cls.Spec is not MethodSpec, name
        for key, value in method.items():
            typed = getattr(spec, key)
            assert typed == value or (isinstance(value, int) and typed == float(value)), (name, key)


def test_the_base_presets_state_the_specs_defaults():
    """A preset states only what it chooses; a base preset (the YAML naming its recipe, for no paper's
    base model) also documents every default with its comment, and must agree with the spec."""
    checked = 0
    for name in METHODS.names():
        raw = OmegaConf.to_container(OmegaConf.load(METHODS.entry(name).target))
        if "recipe" not in raw or "base_model" in raw:
            continue
        spec = Entry(name, raw["recipe"], base="bench.method:Method").load().Spec
        for f in fields_of(spec):
            if f.name in raw and f.name not in DOC_KEYS and _default(f) is not MISSING:
                assert raw[f.name] == _default(f), f"{name}.yaml states {f.name}: {raw[f.name]!r}, its spec's default is {_default(f)!r}"
                checked += 1
    assert checked > 100


def test_the_composed_method_section_is_the_presets_own():
    """The trainer hashes the method section into the checkpoint id: spec defaults stay out of it."""
    method = to_dict(compose(["method=diff-instruct"]))["method"]
    assert "seed" not in method and "train_prompts" not in method and "reward" not in method
    assert set(method) == set(OmegaConf.load(METHODS.entry("diff-instruct").target)) | {"name", "_dir"}


class FreeForm(Method):
    """A plugin recipe that declares no Spec: its keys stay free-form (the shared ones are checked)."""


def test_a_recipe_without_a_spec_keeps_free_form_keys(register):
    register(METHODS, "free", "recipe: test_specs:FreeForm\nanything: 3\n")
    assert to_dict(compose(["method=free"]))["method"]["anything"] == 3
    register(METHODS, "free-bad", "recipe: test_specs:FreeForm\nseed: -1\n")
    with pytest.raises(UsageError, match=r"^method\.seed=-1 \(in method 'free-bad'\): out of range"):
        compose(["method=free-bad"])


# ---- every shipped preset composes ------------------------------------------------------------------
def test_every_shipped_preset_suite_model_and_protocol_cell_composes():
    for name in METHODS.names():
        assert recipe_spec(compose([f"method={name}"]).method) is not MethodSpec, name
    for name in MODELS.names():
        compose([f"model={name}"])
    for name in SUITES.names():
        compose([f"suite={name}"])
    for name in DATASETS.names():
        compose([f"data={name}"])
    cells = 0
    for name in PROTOCOLS.names():
        p = to_dict(compose([f"protocol={name}"]))["protocol"]
        if p["expressible"] is False or p["per_subject"]:
            continue
        for model in p["variants"]:
            args = [f"protocol={name}"] + ([f"protocol.model={model}"] if model != "default" else [])
            for cell in protocols.expand(to_dict(compose(args)), args):
                compose(args, cell=cell)
                cells += 1
    assert cells > 20


# ---- --help --------------------------------------------------------------------------------------
def test_run_help_with_a_method_lists_its_recipes_keys(cli):
    code, out, _ = cli("run", "method=dspo-sdxl", "--help")
    assert code == 0
    assert "method dspo-sdxl (recipe bench.methods.dspo:DSPO, spec DSPO.Spec)" in out
    line = next(l for l in out.splitlines() if l.strip().startswith("method.lam "))
    assert line.split()[1:4] == ["float", ">", "0"] and "[preset: 5000]" in line and "--beta_dpo" in line
    line = next(l for l in out.splitlines() if l.strip().startswith("method.samples_per_prompt "))
    assert line.split()[1:5] == ["int", ">=", "1", "8"]
    code, _, err = cli("run", "method=nope", "--help")
    assert code == 2 and "unknown method 'nope'" in error_line(err)
