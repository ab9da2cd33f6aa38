"""SDXL-layout models: two text encoders, pooled-text and size conditioning, built offline as a
tiny pipeline and loaded through the same path a hub id takes; distilled UNets loaded on top."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from bench.config import compose, to_dict
from bench.errors import UsageError, WeightsMissingError
from bench.models import load_model, pipeline_location
from bench.models.diffusion import Conditioning


@pytest.fixture(scope="module")
def sdxl_cfg(model_cfg) -> dict:
    return model_cfg("tiny-sdxl-fewstep")


@pytest.fixture(scope="module")
def sdxl(sdxl_cfg, cache_dir):
    return load_model(sdxl_cfg, cache_dir)


def test_builds_and_loads_as_an_sdxl_pipeline(sdxl, sdxl_cfg, cache_dir):
    folder = Path(pipeline_location(sdxl_cfg, cache_dir)[0])
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline" and index["force_zeros_for_empty_prompt"] is True
    assert type(sdxl.text_encoder_2).__name__ == "CLIPTextModelWithProjection" and sdxl.zero_uncond
    assert sdxl.unet.config.addition_embed_type == "text_time"


def test_conditioning_is_sdxls(sdxl):
    prompts = ["a red cat", "a small boat on a river"]
    cond = sdxl.encode_prompts(prompts)
    with torch.no_grad():
        ids = sdxl.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out1 = sdxl.text_encoder(ids, output_hidden_states=True)
        out2 = sdxl.text_encoder_2(ids, output_hidden_states=True)
    # penultimate hidden states of both encoders side by side, the second encoder's projected pooled output
    assert torch.equal(cond.hidden, torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1))
    assert torch.equal(cond.pooled, out2.text_embeds) and cond.pooled.shape == (2, 32)
    assert cond.time_ids.tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2
    uncond = sdxl.unconditional(2)
    assert float(uncond.hidden.abs().sum()) == 0 and float(uncond.pooled.abs().sum()) == 0


def test_denoise_uses_pooled_text_and_size_ids(sdxl):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = sdxl.encode_prompts(["a red cat", "a dog"])
    with torch.no_grad():
        base = sdxl.denoise(x, 500, cond)
        other_pooled = sdxl.denoise(x, 500, Conditioning(cond.hidden, cond.pooled.flip(0), cond.time_ids))
        other_size = sdxl.denoise(x, 500, Conditioning(cond.hidden, cond.pooled, cond.time_ids * 2))
        both = sdxl.denoise(torch.cat([x, x]), 500, Conditioning.cat([cond, cond]))
    assert float((base - other_pooled).abs().max()) > 1e-4 and float((base - other_size).abs().max()) > 1e-4
    torch.testing.assert_close(both, torch.cat([base, base]), rtol=1e-5, atol=1e-5)


def test_a_distilled_unet_file_loads_on_top(sdxl, sdxl_cfg, cache_dir, tmp_path):
    state = {k: v + 0.01 for k, v in sdxl.unet.state_dict().items()}
    save_file(state, tmp_path / "distilled_unet.safetensors")
    cfg = {**sdxl_cfg, "unet": {"repo": str(tmp_path), "file": "distilled_unet.safetensors", "revision": None}}
    model = load_model(cfg, cache_dir)
    loaded = model.unet.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    assert model.identity["unet"] == {"repo": str(tmp_path), "file": "distilled_unet.safetensors", "revision": None}
    # a diffusers folder in place of a file
    sdxl.unet.save_pretrained(tmp_path / "unet_folder")
    cfg["unet"] = {"repo": str(tmp_path / "unet_folder"), "file": None}
    folder_model = load_model(cfg, cache_dir)
    assert all(torch.equal(v, sdxl.unet.state_dict()[k]) for k, v in folder_model.unet.state_dict().items())


def test_missing_distilled_unet_offline_is_one_line(sdxl_cfg, cache_dir):
    cfg = {**sdxl_cfg, "unet": {"repo": "tianweiy/DMD2", "file": "dmd2_sdxl_4step_unet_fp16.bin"}}
    with pytest.raises(WeightsMissingError, match="tianweiy/DMD2/dmd2_sdxl_4step_unet_fp16.bin") as err:
        load_model(cfg, cache_dir)
    assert "\n" not in str(err.value) and "bench prefetch" in str(err.value)


def test_unknown_sampler_kind_is_refused_before_loading(cache_dir):
    with pytest.raises(UsageError, match="model.sampler.kind=heun: not allowed; use one of .*euler_ancestral"):  # at composition
        compose(["model=sdxl-turbo", "model.sampler.kind=heun"])
    cfg = {**to_dict(compose(["model=sdxl-turbo"]))["model"]}
    cfg["sampler"] = {**cfg["sampler"], "kind": "heun"}  # a config built past the schema: load_model still refuses it
    with pytest.raises(UsageError, match="sampler kind 'heun'.*euler_ancestral"):
        load_model(cfg, cache_dir)
    turbo = to_dict(compose(["model=sdxl-turbo"]))["model"]
    with pytest.raises(WeightsMissingError, match="stabilityai/sdxl-turbo"):
        load_model(turbo, cache_dir)


def test_offline_pso_runs_on_the_sdxl_layout(cli):
    code, out, err = cli(
        "run", "suite=smoke", "model=tiny-sdxl-fewstep", "method=pso-offline", "suite.limit=4",
        "train.steps=4", "method.samples_per_prompt=2", "train.batch_size=2",
    )
    assert code == 0, err
    assert "smoke / tiny-sdxl-fewstep / pso-offline vs smoke-tiny-sdxl-fewstep-base-" in out
