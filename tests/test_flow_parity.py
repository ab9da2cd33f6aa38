"""Generation parity of the flow models: ``FlowModel.sample`` equals ``FluxPipeline`` and
``StableDiffusion3Pipeline`` on random weights in each model config's layout, given the same noise.

Each hub config (FLUX.1-schnell, FLUX.1-dev, SD3.5 medium and large) gets a tiny pipeline of the
real classes with the hub's scheduler config and the transformer keys that set its architecture
(dev's guidance embedding, medium's dual attention and q/k norm, large's q/k norm), built from the
embedded tiny spec of its layout and saved with ``save_pretrained``; the model config is loaded
through ``load_model`` with only its source pointed at the folder and the resolution at tiny size.
The reference is the pipeline's own ``__call__`` at the card's steps and guidance, given the same
initial latents (packed for FLUX), in float64. FlowMatchEulerDiscreteScheduler keeps sigmas in
float32 and upcasts the sample to float32 in its step, so agreement is to float32 rounding,
checked at 1e-4 relative.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from bench.models import embedded_builder, load_model, make_sampler

PROMPTS = ["a photo of a red circle", "two blue squares left of a triangle"]
SEEDS = (3, 4)
RTOL = 1e-4

# The hub's scheduler_config.json of each repository (FlowMatchEulerDiscreteScheduler).
SCHNELL_SCHEDULER = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                     "num_train_timesteps": 1000, "shift": 1.0, "use_dynamic_shifting": False}
DEV_SCHEDULER = {**SCHNELL_SCHEDULER, "shift": 3.0, "use_dynamic_shifting": True}
SD35_SCHEDULER = {"num_train_timesteps": 1000, "shift": 3.0}

# model config -> (tiny spec it is built from, transformer keys of the hub's architecture, its scheduler config, the card's call)
HUB = {
    "flux-schnell": ("tiny-flux", {"guidance_embeds": False}, SCHNELL_SCHEDULER, dict(num_inference_steps=4, guidance_scale=0.0, max_sequence_length=256)),
    "flux-dev": ("tiny-flux", {"guidance_embeds": True}, DEV_SCHEDULER, dict(num_inference_steps=50, guidance_scale=3.5, max_sequence_length=512)),
    "sd35-medium": ("tiny-sd3", {"dual_attention_layers": [0, 1], "qk_norm": "rms_norm"}, SD35_SCHEDULER, dict(num_inference_steps=40, guidance_scale=4.5)),
    "sd35-large": ("tiny-sd3", {"dual_attention_layers": [], "qk_norm": "rms_norm"}, SD35_SCHEDULER, dict(num_inference_steps=28, guidance_scale=3.5)),
}
EMBEDDED = {"tiny-flux": dict(num_inference_steps=4, guidance_scale=0.0), "tiny-sd3": dict(num_inference_steps=10, guidance_scale=4.5)}
NAMES = list(HUB) + list(EMBEDDED)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folders(tmp_path_factory, model_cfg) -> dict[str, Path]:
    """Each hub config's tiny pipeline, its scheduler config the hub's verbatim."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    tmp = tmp_path_factory.mktemp("flow-parity")
    out = {}
    for name, (tiny, transformer, scheduler, _) in HUB.items():
        spec = {k: v for k, v in model_cfg(tiny)["build"].items() if k not in ("data", "scenes", "pretrain_vae", "pretrain")}  # random weights
        spec = {**spec, "transformer": {**spec["transformer"], **transformer}, "scheduler": scheduler}
        embedded_builder(spec)[0](spec, tmp / name)
        out[name] = tmp / name
    return out


@pytest.fixture(scope="module")
def pair(model_cfg, folders, cache_dir):
    """(config, our model, the pipeline) per model config, loaded once, both in float64."""
    from diffusers import DiffusionPipeline

    from bench.models import pipeline_location

    loaded = {}

    def get(name):
        if name not in loaded:
            cfg = model_cfg(name)
            if name in HUB:
                cfg = {**cfg, "source": str(folders[name]), "revision": None, "resolution": 64, "max_sequence_length": 32}
            pipe = DiffusionPipeline.from_pretrained(pipeline_location(cfg, cache_dir)[0])
            pipe.set_progress_bar_config(disable=True)
            loaded[name] = (cfg, load_model(cfg, cache_dir).to(dtype=torch.float64), pipe.to(torch.float64))
        return loaded[name]

    return get


def card_call(name: str) -> dict:
    return dict(HUB[name][3]) if name in HUB else dict(EMBEDDED[name])


@pytest.mark.parametrize("name", list(HUB))
def test_the_hub_configs_are_the_model_cards(name, model_cfg):
    cfg, call = model_cfg(name), card_call(name)
    sampler = make_sampler(cfg["sampler"])
    assert (sampler.kind, sampler.steps, sampler.guidance) == ("flow_euler", call["num_inference_steps"], call["guidance_scale"])
    assert cfg["max_sequence_length"] == call.get("max_sequence_length", 256) and cfg["resolution"] == 1024
    assert len(cfg["revision"]) == 40 and cfg["source"].split("/")[0] in ("black-forest-labs", "stabilityai")
    assert cfg["train_sampler"] == {"kind": "flow_sde", "eta": 0.7}


@pytest.mark.parametrize("name", NAMES)
def test_sample_equals_the_pipeline(name, pair):
    cfg, model, pipe = pair(name)
    call = card_call(name)
    call["max_sequence_length"] = model.max_sequence_length
    latents = torch.stack([torch.randn(model.latent_shape(), generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in SEEDS])
    side = latents.shape[-1]
    given = pipe._pack_latents(latents, len(SEEDS), latents.shape[1], side, side) if model.layout == "flux" else latents
    with torch.no_grad():
        ours = model.sample(PROMPTS, [torch.Generator().manual_seed(s) for s in SEEDS])
        theirs = pipe(PROMPTS, latents=given, output_type="latent", height=model.resolution, width=model.resolution, **call).images
    if model.layout == "flux":
        theirs = pipe._unpack_latents(theirs, model.resolution, model.resolution, model.latent_scale)
    assert [float(t) for t in pipe.scheduler.timesteps] == model.timesteps()
    rel = float((ours - theirs).abs().max() / theirs.abs().max())
    assert rel < RTOL, f"{name}: relative difference {rel:.2e}"
    if name in EMBEDDED:  # the pixels too: the pipeline's own decode of the same latents
        with torch.no_grad():
            images = pipe.vae.decode(ours / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor).sample
        assert torch.allclose(model.decode(ours), (images / 2 + 0.5).clamp(0, 1), atol=1e-6)


def test_the_schedules_are_the_pipelines(model_cfg, pair):
    """FLUX.1-schnell: sigmas 1, 0.75, 0.5, 0.25 unshifted; dev: the resolution's dynamic shift; SD3.5: shift 3."""
    schnell, dev, medium = pair("flux-schnell")[1], pair("flux-dev")[1], pair("sd35-medium")[1]
    assert schnell.schedule().sigmas == (1.0, 0.75, 0.5, 0.25, 0.0)
    mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (16 - 256)  # calculate_shift at 16 tokens
    sigma = 1 - 1 / 50
    shifted = math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))
    assert dev.schedule().sigmas[1] == pytest.approx(shifted, rel=1e-6)
    s = medium.schedule().sigmas
    assert s[0] == 1.0 and s[-1] == 0.0 and len(s) == 41
    t = medium.timesteps()[5] / 1000
    raw = t / (3 - 2 * t)  # the unshifted sigma under shift 3: sigma = 3 s / (1 + 2 s)
    assert 3 * raw / (1 + 2 * raw) == pytest.approx(s[5], rel=1e-6)


def test_a_flow_model_refuses_deterministic_training_and_epsilon_methods(pair):
    from bench.models.diffusion import SamplerError

    model = pair("tiny-flux")[1]
    with pytest.raises(SamplerError, match="flow_sde"):
        model.stochastic_timesteps()
    with pytest.raises(SamplerError, match="velocity"):
        model.predict_eps(None, 0, None)


def test_flux_dev_embeds_its_guidance(pair):
    """dev's transformer takes the scale as an input (no second pass); the scale changes its output."""
    model = pair("flux-dev")[1]
    x = torch.randn(1, *model.latent_shape(), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = model.predict(x, 500.0, model.encode_prompts(PROMPTS[:1], 3.5), None, 3.5)
        b = model.predict(x, 500.0, model.encode_prompts(PROMPTS[:1], 1.0), None, 1.0)
    assert not model.uses_cfg(3.5) and not torch.allclose(a, b)


def test_the_saved_layout_is_the_hubs(folders):
    index = json.loads((folders["flux-dev"] / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline" and index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"] and index["scheduler"][1] == "FlowMatchEulerDiscreteScheduler"
    index = json.loads((folders["sd35-medium"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModelWithProjection"]
