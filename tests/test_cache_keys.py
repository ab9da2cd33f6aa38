"""Caches keyed by content: an image by its sampler's identity without fields at their defaults, a
checkpoint by the source of the recipe modules it imports, prepared data by its spec and what it is
computed from, a built model by its build spec; a cache written under the keys of earlier versions
is adopted once, with one line, and serves the same bytes without generating or training anything."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import bench.generate
import bench.runner
import bench.trainer
from bench.cli import main
from bench.config import compose, import_recipe, to_dict
from bench.generate import CheckpointId, ImageStore, plan_images
from bench.method import Method
from bench.models import Sampler, embedded_build_path, make_sampler, sampler_identity
from bench.trainer import Trainer, legacy_recipe_source_hash, module_source, recipe_source_hash

STUB_MODEL = {"source": "tiny", "build_hash": "abc"}
SFT_ARGS = ["suite=smoke", "method=sft", "suite.limit=2", "train.steps=4", "train.save_every=2", "method.samples_per_prompt=2"]


@dataclasses.dataclass(frozen=True)
class SamplerWithOption(Sampler):
    """The sampler as it would be after adding an option with a default."""

    churn: float = 0.0


def tiny_sampler(cls=Sampler, **extra) -> Sampler:
    s = make_sampler(to_dict(compose(["model=tiny"]))["model"]["sampler"])
    return cls(**{**asdict(s), **extra})


def keys(sampler, checkpoint=None) -> list:
    model = SimpleNamespace(identity=STUB_MODEL, resolution=32, sampler=sampler)
    return plan_images("micro", ["a cat", "a dog"], 2, 0, model, sampler, checkpoint, "float64")


# ---- the sampler's identity ----------------------------------------------------------------------
def test_sampler_identity_leaves_out_the_fields_at_their_defaults():
    assert sampler_identity(tiny_sampler()) == {"kind": "ddim", "steps": 4, "guidance": 3.0, "eta": 1.0}
    onestep = make_sampler(to_dict(compose(["model=tiny-onestep"]))["model"]["sampler"])
    assert sampler_identity(onestep) == {"kind": "euler", "steps": 1, "guidance": 1.0, "timesteps": (625,), "scheduler_config": (("timestep_spacing", "trailing"),)}
    assert sampler_identity("stand-in") == "stand-in"


def test_a_new_sampler_option_at_its_default_keeps_every_image_key():
    before = keys(tiny_sampler())
    assert [j.key for j in keys(tiny_sampler(SamplerWithOption))] == [j.key for j in before]
    changed = keys(tiny_sampler(SamplerWithOption, churn=0.5))
    assert not {j.key for j in changed} & {j.key for j in before} and len({j.key for j in changed}) == 4
    # today's keys, pinned: a change of formula would orphan every store
    assert before[0].key == "00fa1d64345abc343e9e036ac6dc77e9c6ad7438"
    # the legacy key is the formula of earlier versions (every field, asdict), measured with that code
    assert before[0].legacy_key == "3be2c8b06224993be81c2ee63fddc2695ab87346"
    assert keys(tiny_sampler(), CheckpointId("new", "ckpt123"))[0].legacy_key == "e89a628098c8ea05dd2fce518a3e9e37c23bcafd"


# ---- the recipe hash -----------------------------------------------------------------------------
RECIPES = {"sft": "sft", "d3po": "d3po", "pso-online": "pso_online", "spo": "spo", "pso": "pso", "dspo": "dspo", "ddpo": "ddpo"}


def edited_reader(module: str, text: str):
    """``module_source`` with ``text`` appended to the source of ``module``; records what it was asked."""
    read, asked = module_source, []

    def reader(name):
        asked.append(name)
        source = read(name)
        return source + text if source is not None and name == module else source

    reader.asked = asked
    return reader


@pytest.fixture(scope="module")
def recipes():
    """(config, recipe instance) of every recipe in RECIPES, and their train ids as the files are."""
    out = {}
    for name in RECIPES:
        cfg = to_dict(compose([f"method={name}"]))
        out[name] = cfg, import_recipe(cfg["method"])(cfg["method"])
    return out, train_ids(out)


def train_ids(recipes, reader=None) -> dict[str, str]:
    """Every recipe's train id (stub model), its sources read through ``reader``."""
    from unittest import mock

    model = SimpleNamespace(identity=STUB_MODEL, sampler=tiny_sampler())
    with mock.patch.object(bench.trainer, "module_source", reader or module_source):
        return {n: Trainer(cfg, model, method, ["a"], None, torch.device("cpu"), Path("/nonexistent")).train_id for n, (cfg, method) in recipes.items()}


@pytest.mark.parametrize(
    "edited, changed",
    [
        ("sft", {"sft"}),
        ("online", {"d3po", "pso-online", "spo", "pso", "ddpo"}),  # spo imports d3po, pso imports pso_online: both import online
        ("preference_data", {"sft", "pso", "dspo"}),
        ("diffusion_dpo", {"dspo"}),
        ("d3po", {"d3po", "spo"}),
        ("lasro", set()),
    ],
)
def test_editing_one_recipe_file_retrains_only_the_recipes_that_import_it(edited, changed, recipes):
    reader = edited_reader(f"bench.methods.{edited}", "\nEDITED = 1\n")
    base, after = recipes[1], train_ids(recipes[0], reader)
    assert {n for n in RECIPES if after[n] != base[n]} == changed
    assert all(n.startswith("bench.methods.") for n in reader.asked)  # the core (bench.trainer, bench.method, bench.models) never enters


def test_a_planner_hook_edit_retrains_nothing(monkeypatch):
    recipe = import_recipe({"name": "pso-online", "recipe": "bench.methods.pso_online:OnlinePSO"})
    method = recipe.__new__(recipe)  # the hash reads only the class
    before = recipe_source_hash(method)
    monkeypatch.setattr(bench.trainer, "module_source", edited_reader("bench.methods.online", "\n\ndef plan_extra(p):\n    return p\n"))
    assert recipe_source_hash(method) == before
    monkeypatch.setattr(bench.trainer, "module_source", edited_reader("bench.methods.online", "\nX = 1\n"))
    assert recipe_source_hash(method) != before


def test_relative_and_package_imports_are_followed():
    src = "from . import online\nfrom .preference_data import PairMethod\nimport bench.methods.d3po\nfrom bench.methods import nothing_here\nimport torch\n"
    assert bench.trainer.recipe_imports("bench.methods.x", src) == {"bench.methods.online", "bench.methods.preference_data", "bench.methods.d3po"}


# ---- built models ----------------------------------------------------------------------------------
def test_names_with_the_same_weights_share_one_build(tmp_path):
    """tiny-onestep is tiny's weights with another sampler (trailing Euler at t=625): one build."""
    path = {n: embedded_build_path(to_dict(compose([f"model={n}"]))["model"], tmp_path) for n in ("tiny", "tiny-onestep", "tiny-fewstep")}
    assert path["tiny"] == path["tiny-onestep"] != path["tiny-fewstep"]
    cfg = to_dict(compose(["model=tiny"]))["model"]
    trailing = {**cfg, "name": "tiny-trailing", "sampler": {**cfg["sampler"], "scheduler_config": {"timestep_spacing": "trailing"}}}
    assert embedded_build_path(trailing, tmp_path) == path["tiny"]


# ---- prepared data ---------------------------------------------------------------------------------
class CountingRecipe(Method):
    prepared = 0

    def data_spec(self) -> dict:
        return {"n": 3}

    def prepare(self, ctx):
        CountingRecipe.prepared += 1
        return {"x": torch.arange(3.0)}


def test_prepared_data_under_its_legacy_key_is_adopted_once(tmp_path, monkeypatch, caplog):
    cfg = to_dict(compose(["method=sft"]))
    model = SimpleNamespace(identity=STUB_MODEL, sampler=tiny_sampler())
    trainer = lambda: Trainer(cfg, model, CountingRecipe(cfg["method"]), ["a"], None, torch.device("cpu"), tmp_path)
    ctx = SimpleNamespace(data_cfg=None)
    with monkeypatch.context() as legacy:  # the formula of earlier versions
        legacy.setattr(bench.trainer, "sampler_identity", str)
        legacy.setattr(bench.trainer, "recipe_source_hash", legacy_recipe_source_hash)
        trainer()._data(ctx)
    (old,) = (tmp_path / "data").iterdir()
    caplog.set_level(logging.INFO)
    data = trainer()._data(ctx)
    assert CountingRecipe.prepared == 1 and torch.equal(data["x"], torch.arange(3.0))
    files = sorted((tmp_path / "data").iterdir())
    assert len(files) == 2 and old in files and len([r for r in caplog.records if "prepared data" in r.getMessage()]) == 1
    trainer()._data(ctx)
    assert CountingRecipe.prepared == 1 and len([r for r in caplog.records if "prepared data" in r.getMessage()]) == 1


def test_self_generated_pairs_are_drawn_once_for_every_pair_recipe(tmp_path, monkeypatch, caplog):
    """SFT, Diffusion-DPO, DSPO and offline PSO on one model read the same best/worst-of-K samples: the
    first run draws them, the others load the file, and K or the seed of the samples keys them apart."""
    import bench.methods.preference_data as preference_data

    drawn = []

    def best_worst_pairs(ctx, k, seed, drop_ties):
        drawn.append((k, seed))
        return {"latents_w": torch.full((2, 4, 8, 8), float(k)), "latents_l": torch.zeros(2, 4, 8, 8), "prompt_index": torch.arange(2)}

    monkeypatch.setattr(preference_data, "best_worst_pairs", best_worst_pairs)
    model, ctx = SimpleNamespace(identity=STUB_MODEL, sampler=tiny_sampler()), SimpleNamespace(data_cfg=None, images=None)

    def data(*overrides):
        cfg = to_dict(compose(list(overrides)))
        return Trainer(cfg, model, import_recipe(cfg["method"])(cfg["method"]), ["a", "b"], None, torch.device("cpu"), tmp_path)._data(ctx)

    with monkeypatch.context() as before_sharing:  # under this recipe's own key: adopted, not drawn again
        before_sharing.setattr(preference_data.PairMethod, "shared_data", lambda self, ctx: None)
        own = data("method=sft")
    caplog.set_level(logging.INFO)
    for name in ("sft", "diffusion-dpo", "dspo", "pso-offline", "pso"):
        assert torch.equal(data(f"method={name}")["latents_w"], own["latents_w"])
    assert drawn == [(8, 0)] and len([r for r in caplog.records if "moved to its content key" in r.getMessage()]) == 1
    data("method=diffusion-dpo", "method.samples_per_prompt=4")
    data("method=sft", "method.seed=1")
    assert drawn == [(8, 0), (4, 0), (8, 1)]
    assert sorted(p.name.split("-")[0] for p in (tmp_path / "data").iterdir()) == ["preference_data"] * 3 + ["sft"]
    dreambooth = compose(["method=dreambooth"])["method"]
    assert import_recipe(dreambooth)(to_dict(dreambooth)).shared_data(ctx) is None  # its own data: a subject's photos


def test_image_store_adopts_sound_legacy_images_only(tmp_path, caplog):
    import numpy as np

    store = ImageStore(tmp_path)
    jobs = keys(tiny_sampler())
    image = np.full((32, 32, 3), 7, dtype=np.uint8)
    store.save(jobs[0].legacy_key, image)
    store.path(jobs[1].legacy_key).parent.mkdir(parents=True, exist_ok=True)
    store.path(jobs[1].legacy_key).write_bytes(b"not a png")
    caplog.set_level(logging.INFO)
    assert store.adopt_legacy(jobs, 32) == 1 and (store.load(jobs[0].key) == image).all()
    assert store.path(jobs[0].legacy_key).exists() and not store.path(jobs[1].key).exists()
    assert store.adopt_legacy(jobs, 32) == 0
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("image store")] == [
        "image store: 1 stored images moved to their content keys (sampler options at their defaults left out), once; none regenerated"
    ]


# ---- end to end: a cache of earlier versions -------------------------------------------------------
def cache_with_models(root: Path, session_cache: Path) -> Path:
    root.mkdir(parents=True)
    (root / "models").symlink_to(session_cache / "models")
    return root


def run_sft(cache: Path, out: Path) -> None:
    assert main(["run", *SFT_ARGS, f"cache_dir={cache}", f"out={out}"]) == 0


def outputs(out: Path) -> dict[str, bytes]:
    return {f"{p.parent.name}/{p.name}": p.read_bytes() for p in sorted(out.glob("*/*")) if p.name in ("scores.parquet", "summary.json", "table.md")}


@pytest.mark.slow  # four `bench run`s from empty caches (about 8 minutes on 2 cores); the keys are checked fast above
def test_a_cache_of_earlier_versions_is_adopted_once_and_serves_the_same_bytes(cache_dir, tmp_path, monkeypatch, caplog):
    assert main(["prefetch", "model=tiny", f"cache_dir={cache_dir}"]) == 0
    old = cache_with_models(tmp_path / "old", cache_dir)
    with monkeypatch.context() as legacy:  # every key by the formula of earlier versions
        legacy.setattr(bench.generate, "sampler_identity", asdict)
        legacy.setattr(bench.runner, "sampler_identity", asdict)
        legacy.setattr(bench.trainer, "sampler_identity", str)
        legacy.setattr(bench.trainer, "recipe_source_hash", legacy_recipe_source_hash)
        run_sft(old, tmp_path / "out-old")
    legacy_pngs = {p.name: p.read_bytes() for p in (old / "images").rglob("*.png")}
    (legacy_ckpt,) = (old / "checkpoints").iterdir()

    def no_training(self):
        raise AssertionError("retrained")

    caplog.set_level(logging.INFO)
    with monkeypatch.context() as patched:
        patched.setattr(Trainer, "_train", no_training)
        run_sft(old, tmp_path / "out-adopted")
    lines = [r.getMessage() for r in caplog.records if "content key" in r.getMessage()]
    assert len(lines) == 3, lines  # base images, the checkpoint, the tuned model's images
    assert lines[0].startswith("image store: 4 stored images") and lines[2].startswith("image store: 4 stored images")
    assert lines[1].startswith(f"checkpoint {legacy_ckpt.name} moved to its content key sft-") and "(final, train.jsonl)" in lines[1]
    for label in ("base", "sft"):
        (run,) = (tmp_path / "out-adopted").glob(f"smoke-tiny-{label}-*")
        assert json.loads((run / "manifest.json").read_text())["timings"]["generated"] == 0
    assert not legacy_ckpt.exists()

    fresh = cache_with_models(tmp_path / "fresh", cache_dir)
    run_sft(fresh, tmp_path / "out-fresh")
    assert outputs(tmp_path / "out-adopted") == outputs(tmp_path / "out-fresh") and len(outputs(tmp_path / "out-fresh")) == 6
    (ckpt,) = (fresh / "checkpoints").iterdir()
    for name in ("weights.safetensors", "train.json"):
        assert (old / "checkpoints" / ckpt.name / "final" / name).read_bytes() == (ckpt / "final" / name).read_bytes()
    fresh_pngs = {p.name: p.read_bytes() for p in (fresh / "images").rglob("*.png")}
    adopted = {p.name: p.read_bytes() for p in (old / "images").rglob("*.png") if p.name in fresh_pngs}
    assert adopted == fresh_pngs and sorted(legacy_pngs.values()) == sorted(fresh_pngs.values())

    caplog.clear()  # once: the next run adopts nothing
    run_sft(old, tmp_path / "out-again")
    assert not [r for r in caplog.records if "content key" in r.getMessage()]
    shutil.rmtree(tmp_path / "out-again")
