"""Config composition (defaults < suite < method < command line), errors that name the fix,
the stable hash, and the lazy registry with entry-point plugins."""

from __future__ import annotations

import hashlib
import json
import sys
from importlib.metadata import EntryPoint
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import bench.registry
from bench.config import DEFAULTS, compose, stable_hash, to_dict
from bench.errors import UsageError
from bench.registry import METHODS, MODELS, Registry

METHODS_DIR = Path(bench.registry.__file__).resolve().parents[1] / "methods"


# ---- composition -----------------------------------------------------------------------------
def test_method_train_section_merges_over_defaults():
    sft_yaml = OmegaConf.load(METHODS_DIR / "sft.yaml")
    defaults = OmegaConf.create(DEFAULTS)
    assert sft_yaml.train.steps != defaults.train.steps  # otherwise the check below proves nothing
    cfg = to_dict(compose(["suite=smoke", "method=sft"]))
    assert cfg["train"]["steps"] == sft_yaml.train.steps == 300
    assert cfg["train"]["lr"] == sft_yaml.train.lr == 3e-4
    assert cfg["train"]["lora_rank"] == 8
    # keys the method leaves alone keep the defaults
    assert cfg["train"]["grad_accum"] == defaults.train.grad_accum == 1
    assert cfg["train"]["max_grad_norm"] == defaults.train.max_grad_norm
    assert cfg["method"]["name"] == "sft" and cfg["method"]["samples_per_prompt"] == 8
    assert cfg["suite"]["name"] == "smoke" and cfg["model"]["name"] == "tiny"


def test_command_line_overrides_win():
    cfg = to_dict(compose(["suite=smoke", "method=sft", "train.steps=7", "method.samples_per_prompt=3", "seed=5", "suite.limit=2"]))
    assert cfg["train"]["steps"] == 7
    assert cfg["method"]["samples_per_prompt"] == 3
    assert cfg["seed"] == 5 and cfg["suite"]["limit"] == 2
    # the override order does not matter against the method's own values
    cfg2 = to_dict(compose(["train.steps=7", "method=sft", "suite=smoke"]))
    assert cfg2["train"]["steps"] == 7


def test_fewstep_model_extends_tiny():
    tiny = to_dict(compose(["model=tiny"]))["model"]
    few = to_dict(compose(["model=tiny-fewstep"]))["model"]
    assert few["name"] == "tiny-fewstep" and tiny["name"] == "tiny"
    assert few["build"]["unet"] == tiny["build"]["unet"] and few["build"]["unet"]["block_out_channels"] == [32, 64]
    assert few["build"]["vae"] == tiny["build"]["vae"]
    assert few["build"]["pretrain"] == tiny["build"]["pretrain"]
    assert (tiny["build"]["seed"], few["build"]["seed"]) == (0, 1)
    assert (tiny["sampler"]["kind"], few["sampler"]["kind"]) == ("ddim", "lcm")
    assert few["sampler"]["timesteps"] == [999, 749, 499, 249] and few["sampler"]["guidance"] == 1.0
    assert few["resolution"] == tiny["resolution"] == 32
    assert "extends" not in few


def test_unknown_key_suggests_the_right_one():
    with pytest.raises(UsageError, match="unknown config key 'train.stpes'") as err:
        compose(["train.stpes=5"])
    assert "did you mean train.steps" in str(err.value)
    with pytest.raises(UsageError) as err:
        compose(["method=sft", "method.samples_per_promt=3"])
    assert "method.samples_per_prompt" in str(err.value)


@pytest.mark.parametrize("bad", ["train.steps", "=5", "train..steps=5", "1abc=2"])
def test_malformed_override(bad):
    with pytest.raises(UsageError, match="malformed override"):
        compose([bad])


def test_unknown_names_suggest_close_matches():
    with pytest.raises(UsageError, match="unknown method 'sfft'; did you mean sft"):
        compose(["method=sfft"])
    with pytest.raises(UsageError, match="unknown model 'tinny'; did you mean .*tiny"):
        compose(["model=tinny"])
    with pytest.raises(UsageError, match="unknown suite 'mikro'; did you mean micro"):
        compose(["suite=mikro"])


def test_required_group():
    with pytest.raises(UsageError, match="`method=NAME` is required"):
        compose([], require=("method",))


# ---- hashing ---------------------------------------------------------------------------------
def test_stable_hash():
    a = {"b": {"y": 2, "x": [1, 2]}, "a": 1.5}
    b = {"a": 1.5, "b": {"x": [1, 2], "y": 2}}
    assert stable_hash(a) == stable_hash(b)
    assert stable_hash(a) == hashlib.sha256(b'{"a":1.5,"b":{"x":[1,2],"y":2}}').hexdigest()
    assert stable_hash(OmegaConf.create(a)) == stable_hash(a)
    assert stable_hash({**a, "a": 1.6}) != stable_hash(a)
    assert stable_hash({"b": {"y": 2, "x": [2, 1]}, "a": 1.5}) != stable_hash(a)  # lists keep their order
    assert len(stable_hash(a)) == 64


def test_config_hash_tracks_overrides():
    base = to_dict(compose(["model=tiny"]))["model"]["build"]
    same = to_dict(compose(["model=tiny"]))["model"]["build"]
    other = to_dict(compose(["model=tiny", "model.build.seed=3"]))["model"]["build"]
    assert stable_hash(base) == stable_hash(same) != stable_hash(other)


# ---- registry --------------------------------------------------------------------------------
def test_registry_string_target_imports_lazily(monkeypatch):
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    reg = Registry("thing", "bench.test-no-such-group")
    reg.add("dumps", "json:dumps", "json dumps")
    reg.add("hsv", "colorsys:rgb_to_hsv")
    reg.add("join", "os:path.join")
    assert reg.names() == ["dumps", "hsv", "join"]
    assert "colorsys" not in sys.modules  # declaring an entry imports nothing
    assert reg.get("dumps") is json.dumps
    assert "colorsys" not in sys.modules
    fn = reg.get("hsv")
    assert "colorsys" in sys.modules and fn is sys.modules["colorsys"].rgb_to_hsv
    assert fn(1.0, 0.0, 0.0) == (0.0, 1.0, 1.0)
    import os.path

    assert reg.get("join") is os.path.join
    assert reg.describe()[0] == ("dumps", "json dumps")
    with pytest.raises(UsageError, match="unknown thing 'dump'; did you mean dumps"):
        reg.get("dump")


def test_registry_register_decorator():
    reg = Registry("thing", "bench.test-no-such-group")

    @reg.register("widget")
    class Widget:
        """Makes widgets.

        More text."""

    assert reg.get("widget") is Widget
    assert reg.describe() == [("widget", "Makes widgets.")]


def test_entry_point_plugins_are_listed_and_resolved(monkeypatch):
    calls = []

    def fake_entry_points(group):
        calls.append(group)
        return [EntryPoint(name="fake_loads", value="json:loads", group="bench.metrics")] if group == "bench.metrics" else []

    monkeypatch.setattr(bench.registry, "entry_points", fake_entry_points)
    reg = Registry("metric", "bench.metrics")
    reg.add("brightness", "bench.metrics.weightfree:Brightness")
    assert "fake_loads" not in reg._entries  # plugins are read on first use, not at construction
    assert reg.names() == ["brightness", "fake_loads"]
    assert calls == ["bench.metrics"]
    assert reg.get("fake_loads") is json.loads
    from bench.metrics.weightfree import Brightness

    assert reg.get("brightness") is Brightness
    assert dict(reg.describe())["fake_loads"] == "(plugin json:loads)"
    reg.names()
    assert calls == ["bench.metrics"]  # entry points are read once

    other = Registry("method", "bench.methods")
    assert other.names() == []


def test_a_plugin_that_shadows_a_builtin_fails_naming_both(monkeypatch, tmp_path):
    """A plugin named like a built-in used to be dropped without a word (or, the other way round, would
    silently replace it): either way a run would not be what its name says."""
    monkeypatch.setattr(
        bench.registry, "entry_points",
        lambda group: [EntryPoint(name="sft", value="mypkg.recipes:Sft", group=group)] if group == "bench.methods" else [],
    )
    reg = Registry("method", "bench.methods")
    builtin = tmp_path / "sft.yaml"
    builtin.write_text("description: x\n")
    reg.add_yaml_dir(tmp_path)
    with pytest.raises(UsageError) as err:
        reg.names()
    line = str(err.value)
    assert "\n" not in line
    assert line.startswith("method 'sft' is declared twice: by ") and str(builtin) in line
    assert "the entry point sft = mypkg.recipes:Sft in group bench.methods" in line and line.endswith("rename one of them")


def test_a_name_declared_twice_is_refused():
    reg = Registry("metric", "bench.test-no-such-group")
    reg.add("loads", "json:loads")
    with pytest.raises(UsageError, match=r"metric 'loads' is declared twice: by json:loads and by pickle:loads; rename one of them"):
        reg.add("loads", "pickle:loads")
    assert reg.get("loads") is json.loads


def test_entries_are_checked_against_their_base_class(tmp_path, monkeypatch):
    from bench.registry import METHODS, METRICS
    from bench.config import import_recipe

    assert METRICS.base == "bench.metrics:Metric" and METHODS.base == "bench.method:Method"
    reg = Registry("metric", "bench.test-no-such-group", base="bench.metrics:Metric")
    reg.add("decoder", "json:JSONDecoder")
    with pytest.raises(UsageError, match=r"'decoder' \(json:JSONDecoder\) is json.decoder.JSONDecoder, which is no bench.metrics.Metric: a plugin class must subclass it"):
        reg.get("decoder")
    reg.add("brightness", "bench.metrics.weightfree:Brightness")
    assert reg.get("brightness").__name__ == "Brightness"
    with pytest.raises(UsageError, match=r"is collections.OrderedDict, which is no bench.method.Method"):
        import_recipe({"name": "mine", "recipe": "collections:OrderedDict"})
    assert import_recipe({"name": "sft", "recipe": "bench.methods.sft:SFT"}).__name__ == "SFT"


def test_builtin_registries():
    assert {"tiny", "tiny-fewstep", "sd15"} <= set(MODELS.names())
    assert "sft" in METHODS.names()
    assert str(MODELS.get("tiny")).endswith("tiny.yaml")
    assert MODELS.describe()[MODELS.names().index("tiny")][1].startswith("embedded tiny latent diffusion model")


def test_the_suite_names_its_model_and_a_method_takes_its_few_step_or_one_step_variant():
    """`bench run suite=micro method=M` runs on the world model its scorers judge: PSO's presets ask for
    the few-step variant, Diff-Instruct++'s for the one-step generator; model= and a paper preset's
    base_model still win, and a suite without `model:` keeps the default."""
    model = lambda *args: to_dict(compose(list(args)))["model"]["name"]  # noqa: E731
    assert to_dict(compose(["method=sft"]))["suite"]["name"] == "micro" and model("method=sft") == "world"
    assert model("suite=micro", "method=pso-offline") == model("suite=micro", "method=lasro") == "world-fewstep"
    assert model("suite=micro", "method=di-pp") == "world-onestep"
    assert model("suite=micro", "method=pso-offline", "model=world") == "world"
    assert model("suite=micro", "method=sft", "method.model_variant=fewstep") == "world-fewstep"  # on the command line too
    assert model("suite=micro", "method=pso-online-turbo") == "sdxl-turbo"
    assert model("suite=smoke", "method=pso-offline") == model("suite=smoke") == "tiny"
    with pytest.raises(UsageError, match=r"method.model_variant=twostep: not allowed"):
        compose(["suite=micro", "method=pso-offline", "method.model_variant=twostep"])
