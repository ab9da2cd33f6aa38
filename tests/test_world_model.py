"""The world model (issue 21, item 3): a tiny Stable-Diffusion-layout pipeline pre-trained on the micro
world, shipped as float16 weights, whose samples the world's exact evaluator recognizes."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch


def _digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(model_cfg, cache_dir):
    """``model=world`` loaded from its shipped pre-training (seconds)."""
    from bench.models import load_model

    return load_model(model_cfg("world"), cache_dir)


def test_a_cut_world_build_restores_from_its_shipped_file_in_float16(model_cfg, tmp_path, monkeypatch):
    """The world pre-training, cut to 3 steps a stage on 60 scenes, trains the VAE, the UNet and the text
    encoder's layers; its weights end rounded to float16, so the shipped file holds them as float16
    (every tensor, the token embedding not at all: it is drawn from the seed) and a build from that file
    and the seed has every file's bytes of the full build."""
    from safetensors import safe_open

    from bench.models import prebuilt
    from bench.models.tiny import build_tiny_pipeline, initial_pipeline, pretrained_weights

    spec = copy.deepcopy(model_cfg("world")["build"])
    spec["scenes"]["count"] = 60
    spec["pretrain_vae"]["steps"] = spec["pretrain"]["steps"] = 3
    build_tiny_pipeline(spec, tmp_path / "full")
    weights = pretrained_weights(tmp_path / "full", spec)
    assert {k.split(".")[0] for k in weights["tensors"]} == {"unet", "vae", "text_encoder"}
    assert not any("token_embedding" in k for k in weights["tensors"])
    drawn = initial_pipeline(spec, tmp_path / "tok").text_encoder.state_dict()
    trained = {k.removeprefix("text_encoder."): v for k, v in weights["tensors"].items() if k.startswith("text_encoder.")}
    assert sum(not torch.equal(v, drawn[k]) for k, v in trained.items()) >= 20  # its layers moved

    monkeypatch.setattr(prebuilt, "SHIPPED", tmp_path / "shipped")
    (tmp_path / "shipped").mkdir()
    prebuilt.save_shipped("world-cut", weights)
    with safe_open(tmp_path / "shipped" / "world-cut.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys() if "position_ids" not in k} == {"F16"}
    build_tiny_pipeline(spec, tmp_path / "restored", prebuilt.shipped_weights("world-cut"))
    full = _digests(tmp_path / "full")
    assert len(full) >= 10 and _digests(tmp_path / "restored") == full


def test_the_world_model_is_in_tiny_layout_and_pads_captions_to_16_tokens(world):
    """Every method runs on it unchanged: a Stable-Diffusion pipeline, 64 px from 16x16x4 latents, its
    tokenizer padding to 16 (the longest world caption has 14 tokens with its start and end tokens)."""
    from bench.world.scene import every_spec, caption_of

    assert world.resolution == 64 and tuple(world.latent_shape()) == (4, 16, 16)
    assert world.tokenizer.model_max_length == 16
    longest = max(len(world.tokenizer(caption_of(s)).input_ids) for s in every_spec())
    assert longest == 14


def test_bench_build_refuses_what_it_cannot_build(cli, tmp_path):
    code, out, err = cli("build")
    assert code != 0 and "usage: bench build MODEL" in err
    code, out, err = cli("build", "sd15")
    assert code != 0 and "model 'sd15' is not embedded" in err and "bench ls models" in err
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "model_index.json").write_text("{}")
    code, out, err = cli("build", "world", f"out={tmp_path / 'taken'}")
    assert code != 0 and "already holds a build" in err and (tmp_path / "taken" / "model_index.json").read_text() == "{}"
    code, out, err = cli("build", "tiny", "parts=scorers", f"out={tmp_path / 'tiny'}")
    assert code == 2 and "parts= takes model alone (scorers: the world model only); got scorers" in err
    code, out, err = cli("build", "world", "parts=model,vae", f"out={tmp_path / 'world'}")
    assert code == 2 and "parts= takes model, scorers or model,scorers; got model,vae" in err
    assert not (tmp_path / "tiny").exists() and not (tmp_path / "world").exists()


def test_bench_build_trains_the_world_scorers_again_and_judges_them_beside_the_shipped_ones(cli, world, cache_dir, tmp_path, monkeypatch):
    """``bench build world parts=scorers``, its training cut to 3 steps a stage: the file under the shipped
    name in out=, then the shipped and the rebuilt scorers on the same held-out data, where the cut build
    is nearer chance; a second build into the same folder is refused, the first file kept."""
    from safetensors.torch import load_file

    from bench.world import rebuild, scorers

    cut = copy.deepcopy(scorers.SPEC)
    cut["clip"].update(steps=3, batch_size=16, scenes={"seed": 300, "count": 24})
    cut["preference"].update(steps=3, batch_size=8, scenes={"seed": 400, "count": 6})
    full = scorers.build_scorers
    monkeypatch.setattr(scorers, "build_scorers", lambda world, spec: full(world, cut))
    code, out, err = cli("build", "world", "parts=scorers", f"out={tmp_path}", "prompts=4", f"cache_dir={cache_dir}")
    assert code == 0, err
    path = tmp_path / f"{scorers.build_name(scorers.world_build())}.safetensors"
    assert path.exists() and not (tmp_path / "model_index.json").exists() and "pre-training" not in out
    weights = load_file(path)
    assert {k.split(".", 1)[0] for k in weights} == {"clip", "pick"} and all(v.dtype == torch.float16 for v in weights.values())
    assert "on the shipped model's samples" in out and "4 renders and 4 held-out captions a tag" in out
    shipped, rebuilt = _row(out, "shipped"), _row(out, "rebuilt")
    assert shipped[0] >= 0.8 and shipped[0] > rebuilt[0] and shipped[1] > 0.6, out
    assert shipped == [round(v, 3) for v in rebuild.scorer_quality(scorers.scorer_weights(), rebuild.held_out_pairs(world, 4), 4).values()]
    stamp = path.stat().st_mtime_ns
    code, out, err = cli("build", "world", "parts=scorers", f"out={tmp_path}", f"cache_dir={cache_dir}")
    assert code == 2 and "already holds a scorers build" in err and path.stat().st_mtime_ns == stamp


def test_training_on_a_loaded_world_model_equals_training_on_one_just_built(model_cfg, world, cache_dir, tmp_path):
    """A process that has just built a model has called ``torch.set_num_threads``, which turns MKL's dynamic
    threading off; one that loads the model from its cache had not, and ReFL's losses parted at its second
    step in the last bits. Every run now sets the thread count first (``bench.runner.fix_cpu_threads``)."""
    from bench.models import pipeline_location

    folder = Path(pipeline_location(model_cfg("world"), cache_dir)[0])
    as_a_build = "n = torch.get_num_threads(); torch.set_num_threads(1); torch.set_num_threads(n)"
    histories = {}
    for name, preamble in (("built", as_a_build), ("loaded", "")):
        home = tmp_path / name
        shutil.copytree(folder, home / "models" / folder.name)
        script = f"import sys, torch\n{preamble}\nfrom bench.cli import main\nsys.exit(main(sys.argv[1:]))"
        done = subprocess.run([sys.executable, "-c", script, "train", "method=refl", "suite=micro", "train.steps=2", f"cache_dir={home}"],
                              env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        histories[name] = json.loads(next(home.glob("checkpoints/refl-*/final/train.json")).read_text())["history"]
    assert len(histories["built"]) == 2 and histories["built"] == histories["loaded"]


@pytest.mark.slow  # the full world pre-training and the scorers': 14 to 41 minutes on 2 cores
def test_a_world_rebuild_from_its_seed_scores_within_tolerance_of_the_shipped_weights(cli, cache_dir, tmp_path):
    """``bench build world`` pre-trains from the seed on every thread (other bits than the shipped build's
    on another CPU) and scores both on 50 captions a tag: overall within 0.1, each tag within 0.2; then
    trains the scorers again on the rebuild's samples: the CLIP's caption ranking and the preference's
    agreement with the gold label each within 0.05 of the shipped scorers'."""
    code, out, err = cli("build", "world", f"out={tmp_path / 'world'}", "prompts=50", f"cache_dir={cache_dir}")
    assert code == 0, err
    models, scorers = out.split("the world's scorers, ")
    shipped, rebuilt = (_row(models, name) for name in ("shipped", "rebuilt"))
    assert abs(shipped[-1] - rebuilt[-1]) <= 0.1 and all(abs(a - b) <= 0.2 for a, b in zip(shipped, rebuilt)), out
    shipped, rebuilt = (_row(scorers, name) for name in ("shipped", "rebuilt"))
    assert all(abs(a - b) <= 0.05 for a, b in zip(shipped[:2], rebuilt[:2])), out


def _row(table: str, name: str) -> list[float]:
    """The numbers of the markdown row that starts with ``| name``."""
    (line,) = [line for line in table.splitlines() if line.startswith(f"| {name} ")]
    return [float(x) for x in line.split("|")[2:-1]]
