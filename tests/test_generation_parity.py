"""Generation parity: for every model config, ``DiffusionModel.sample`` equals the diffusers pipeline
its model card calls, on random weights in the config's layout.

Each hub config gets a tiny pipeline with the hub's component classes, config keys and scheduler
config (the hub files below, written verbatim over the saved ones), built offline with fixed seeds
and saved with ``save_pretrained``; the model config itself is loaded through ``load_model`` with
only its repositories pointed at the folders (DMD2's UNet as a state-dict file through the real
``unet: {repo, file}`` path, the LCM UNets as folders) and the resolution at tiny size. The
reference is the card's recipe run on the same folders (``output_type="latent"``), given the same
initial latents and, by patching ``randn_tensor`` in the scheduler modules, the same per-step
noise our sampler draws. Both run in float64; diffusers' schedulers keep sigmas and alphas in
float32, so agreement is to float32 rounding (about 1e-6), checked at 1e-4 relative.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from bench.models import load_model, make_sampler, pipeline_location
from bench.models.diffusion import SCHEDULERS, build_schedule

PROMPTS = ["a red cat on a chair", "an old boat on the river"]
SEEDS = (3, 4)
RTOL = 1e-4

# ---- the hub's scheduler configs (scheduler/scheduler_config.json), as data -------------------------------------
# stable-diffusion-v1-5/stable-diffusion-v1-5: the repository's file as mirrored on GitHub (HDRJ-One/
# runwayml-stable-diffusion-v1-5, scheduler/scheduler_config.json, saved by diffusers 0.17): PNDM, PLMS only.
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.17.0.dev0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995,
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "thresholding": False, "trained_betas": None,
}
# stabilityai/stable-diffusion-xl-base-1.0: EulerDiscreteScheduler, leading spacing, steps_offset 1 (the hub file;
# diffusers' single_file_utils loads SDXL base with "euler" on these values, SCHEDULER_DEFAULT_CONFIG).
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True,
    "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
# stabilityai/sdxl-turbo: the same keys on EulerAncestralDiscreteScheduler with trailing spacing (diffusers PR #6121;
# docs api/pipelines/stable_diffusion/sdxl_turbo.md: "timestep_spacing='trailing'").
TURBO_SCHEDULER = {**SDXL_SCHEDULER, "_class_name": "EulerAncestralDiscreteScheduler", "_diffusers_version": "0.24.0.dev0", "timestep_spacing": "trailing"}
# segmind/SSD-1B: taken to be SDXL base's file (SSD-1B is an SDXL distillate loaded by StableDiffusionXLPipeline);
# LCMScheduler.from_config reads only its beta schedule, num_train_timesteps and set_alpha_to_one.
SSD1B_SCHEDULER = dict(SDXL_SCHEDULER)


@dataclass
class Card:
    """A model card's recipe: the pipeline's scheduler class (after the card's swap), its config overrides, the
    __call__ arguments, and the resolution the pipeline defaults to on the hub's layout (UNet sample_size x 8)."""

    scheduler: str
    call: dict
    resolution: int
    overrides: dict = field(default_factory=dict)
    alt_steps: int | None = None  # a second step count the card's scheduler takes (None: none tested)


CARDS = {
    "sd15": Card("PNDMScheduler", dict(num_inference_steps=50, guidance_scale=7.5), 512, alt_steps=4),
    "sdxl": Card("EulerDiscreteScheduler", dict(num_inference_steps=50, guidance_scale=5.0), 1024, alt_steps=4),
    "sdxl-turbo": Card("EulerAncestralDiscreteScheduler", dict(num_inference_steps=1, guidance_scale=0.0), 512, alt_steps=4),
    "sdxl-dmd2": Card("LCMScheduler", dict(num_inference_steps=4, guidance_scale=0.0, timesteps=[999, 749, 499, 249]), 1024, alt_steps=2),
    "sdxl-lcm": Card("LCMScheduler", dict(num_inference_steps=4, guidance_scale=8.0), 1024, alt_steps=2),
    "ssd-1b-lcm": Card("LCMScheduler", dict(num_inference_steps=4, guidance_scale=8.0), 1024, alt_steps=2),
    # the embedded models: their configs are their cards
    "tiny": Card("DDIMScheduler", dict(num_inference_steps=4, guidance_scale=3.0, eta=1.0), 32, alt_steps=2),
    "tiny-fewstep": Card("LCMScheduler", dict(num_inference_steps=4, guidance_scale=1.0, timesteps=[999, 749, 499, 249]), 32, alt_steps=2),
    "tiny-sdxl-fewstep": Card("LCMScheduler", dict(num_inference_steps=4, guidance_scale=1.0, timesteps=[999, 749, 499, 249]), 32),
    "tiny-onestep": Card("EulerDiscreteScheduler", dict(guidance_scale=1.0, timesteps=[625]), 32, {"timestep_spacing": "trailing"}, alt_steps=2),
    # the Diff-Instruct++ teachers' one-step generators: the teacher's weights, one Euler step at t = 625 (trailing), no CFG
    "sd15-onestep": Card("EulerDiscreteScheduler", dict(guidance_scale=1.0, timesteps=[625]), 512, {"timestep_spacing": "trailing"}),
    "sdxl-onestep": Card("EulerDiscreteScheduler", dict(guidance_scale=1.0, timesteps=[625]), 1024, {"timestep_spacing": "trailing"}),
}
TINY = ("tiny", "tiny-fewstep", "tiny-sdxl-fewstep", "tiny-onestep")
CASES = [(name, None) for name in CARDS] + [(name, card.alt_steps) for name, card in CARDS.items() if card.alt_steps]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tensors of 8 x 8 latents: one intra-op thread does the work of two, without the two spin-waiting
    on each other (on a shared 2-core machine the 50-step runs took 30x longer with two)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- tiny pipelines in the hub layouts -----------------------------------------------------------------------------
UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
)
SDXL_UNET = dict(  # SDXL: pooled text + size ids (addition_embed_type text_time), linear projections in the transformers
    UNET, cross_attention_dim=64, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=80, use_linear_projection=True, transformer_layers_per_block=[1, 2],
)
SSD1B_UNET = dict(SDXL_UNET, transformer_layers_per_block=[2, 1])  # SSD-1B: SDXL's UNet with transformer layers removed
VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8, block_out_channels=[16, 32, 32],
    down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
)
TEXT = dict(  # the byte-level tokenizer's 514 ids: <|startoftext|> 512, <|endoftext|> 513 (the pooled token)
    vocab_size=514, bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_size=32, intermediate_size=64,
    num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
)


def _tokenizer(folder: Path, pad: str):
    """A CLIPTokenizer at tiny size: CLIP's byte-level BPE alphabet (256 byte symbols and their end-of-word
    forms) and its two special tokens, no merges: the real class and files, loaded in milliseconds."""
    import open_clip.tokenizer as oct
    from transformers import CLIPTokenizer

    symbols = list(oct.bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    specials = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    return CLIPTokenizer.from_pretrained(folder, model_max_length=77, pad_token=pad, **specials)  # SDXL's tokenizer_2 pads with "!"


def _sd15_pipeline(tmp: Path, seed: int):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8)
    return StableDiffusionPipeline(
        unet=UNet2DConditionModel(**UNET), vae=AutoencoderKL(**VAE, scaling_factor=0.18215),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)), tokenizer=_tokenizer(tmp / "tok-sd15", "<|endoftext|>"),
        scheduler=PNDMScheduler.from_config(SD15_SCHEDULER),
        safety_checker=StableDiffusionSafetyChecker(CLIPConfig(text_config=TEXT, vision_config=vision, projection_dim=32)),
        feature_extractor=CLIPImageProcessor(crop_size=32, size=32),
    )


def _sdxl_pipeline(tmp: Path, seed: int, unet: dict, scheduler: dict):
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    return StableDiffusionXLPipeline(
        unet=UNet2DConditionModel(**unet), vae=AutoencoderKL(**VAE, scaling_factor=0.13025),
        text_encoder=CLIPTextModel(CLIPTextConfig(**TEXT)), text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**TEXT)),
        tokenizer=_tokenizer(tmp / f"tok-{seed}", "<|endoftext|>"), tokenizer_2=_tokenizer(tmp / f"tok-{seed}-2", "!"),
        scheduler=getattr(diffusers, scheduler["_class_name"]).from_config(scheduler), force_zeros_for_empty_prompt=True,
    )


def _save(pipe, folder: Path, scheduler: dict) -> Path:
    pipe.save_pretrained(folder)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))  # the hub's keys, verbatim
    return folder


@pytest.fixture(scope="module")
def layouts(tmp_path_factory) -> dict[str, Path]:
    """The hub layouts at tiny size, built once: pipelines, the replacement VAE, DMD2's UNet file, the LCM UNets."""
    import transformers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    transformers.utils.logging.disable_progress_bar()
    tmp = tmp_path_factory.mktemp("parity")
    out = {
        "sd15": _save(_sd15_pipeline(tmp, 0), tmp / "sd15", SD15_SCHEDULER),
        "sdxl": _save(_sdxl_pipeline(tmp, 1, SDXL_UNET, SDXL_SCHEDULER), tmp / "sdxl", SDXL_SCHEDULER),
        "sdxl-turbo": _save(_sdxl_pipeline(tmp, 2, SDXL_UNET, TURBO_SCHEDULER), tmp / "sdxl-turbo", TURBO_SCHEDULER),
        "ssd-1b": _save(_sdxl_pipeline(tmp, 3, SSD1B_UNET, SSD1B_SCHEDULER), tmp / "ssd-1b", SSD1B_SCHEDULER),
    }
    torch.manual_seed(4)
    out["vae"] = tmp / "sdxl-vae-fp16-fix"
    AutoencoderKL(**VAE, scaling_factor=0.13025).save_pretrained(out["vae"])
    torch.manual_seed(5)  # DMD2 ships a float16 state dict of the SDXL UNet
    out["dmd2"] = tmp / "DMD2"
    out["dmd2"].mkdir()
    torch.save({k: v.half() for k, v in UNet2DConditionModel(**SDXL_UNET).state_dict().items()}, out["dmd2"] / "dmd2_sdxl_4step_unet_fp16.bin")
    for name, spec, seed in (("lcm-sdxl", SDXL_UNET, 6), ("lcm-ssd-1b", SSD1B_UNET, 7)):  # LCM: the guidance embedding's cond_proj
        torch.manual_seed(seed)
        out[name] = tmp / name
        UNet2DConditionModel(**spec, time_cond_proj_dim=32).save_pretrained(out[name])
    return out


def config_for(name: str, model_cfg, layouts) -> dict:
    """The model config with its repositories pointed at the tiny folders and the resolution at tiny
    size; the embedded models as they are."""
    cfg = model_cfg(name)
    if name in TINY:  # built (and pre-trained) into the session cache, shared with the other tests
        return cfg
    source = {"sd15": "sd15", "sdxl": "sdxl", "sdxl-turbo": "sdxl-turbo", "sdxl-dmd2": "sdxl", "sdxl-lcm": "sdxl", "ssd-1b-lcm": "ssd-1b",
              "sd15-onestep": "sd15", "sdxl-onestep": "sdxl"}[name]
    cfg = {**cfg, "source": str(layouts[source]), "revision": None, "resolution": 32}
    if cfg.get("vae"):
        cfg["vae"] = {**cfg["vae"], "repo": str(layouts["vae"])}
    if cfg.get("unet"):
        cfg["unet"] = {**cfg["unet"], "repo": str(layouts[{"sdxl-dmd2": "dmd2", "sdxl-lcm": "lcm-sdxl", "ssd-1b-lcm": "lcm-ssd-1b"}[name]])}
    return cfg


def card_pipeline(name: str, cfg: dict, layouts, cache_dir):
    """The reference: the card's own recipe on the same folders."""
    import diffusers
    from diffusers import AutoPipelineForText2Image, DiffusionPipeline, LCMScheduler, UNet2DConditionModel

    if name in TINY:
        pipe = DiffusionPipeline.from_pretrained(pipeline_location(cfg, cache_dir)[0])
    elif name == "sdxl-turbo":
        pipe = AutoPipelineForText2Image.from_pretrained(layouts["sdxl-turbo"])
    elif name == "sdxl-dmd2":  # tianweiy/DMD2 README: the base UNet's config, the state dict loaded into it
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(layouts["sdxl"], subfolder="unet"))
        unet.load_state_dict(torch.load(layouts["dmd2"] / "dmd2_sdxl_4step_unet_fp16.bin", weights_only=True))
        pipe = DiffusionPipeline.from_pretrained(layouts["sdxl"], unet=unet)
    elif name in ("sdxl-lcm", "ssd-1b-lcm"):
        unet = UNet2DConditionModel.from_pretrained(layouts["lcm-sdxl" if name == "sdxl-lcm" else "lcm-ssd-1b"])
        pipe = DiffusionPipeline.from_pretrained(layouts["sdxl" if name == "sdxl-lcm" else "ssd-1b"], unet=unet)
    else:
        pipe = DiffusionPipeline.from_pretrained(layouts[name.removesuffix("-onestep")])
    card = CARDS[name]
    if type(pipe.scheduler).__name__ != card.scheduler or card.overrides:  # the card swaps the scheduler
        pipe.scheduler = getattr(diffusers, card.scheduler).from_config(pipe.scheduler.config, **card.overrides)
    assert not isinstance(pipe.scheduler, LCMScheduler) or card.scheduler == "LCMScheduler"
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(torch.float64)


@contextlib.contextmanager
def scheduler_noise(draws: list[torch.Tensor]):
    """Hand the schedulers' k-th randn_tensor call the k-th per-step draw (zeros past the last one:
    Euler-ancestral draws on its last step and multiplies by sigma_up = 0)."""
    from diffusers.schedulers import scheduling_ddim, scheduling_euler_ancestral_discrete, scheduling_euler_discrete, scheduling_lcm

    counter = itertools.count()

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        k = next(counter)
        z = draws[k] if k < len(draws) else torch.zeros(shape, dtype=torch.float64)
        assert tuple(z.shape) == tuple(shape)
        return z.to(device=device, dtype=dtype)

    modules = (scheduling_ddim, scheduling_euler_ancestral_discrete, scheduling_euler_discrete, scheduling_lcm)
    saved = [m.randn_tensor for m in modules]
    for m in modules:
        m.randn_tensor = randn_tensor
    try:
        yield
    finally:
        for m, f in zip(modules, saved):
            m.randn_tensor = f


@pytest.fixture(scope="module")
def pair(model_cfg, layouts, cache_dir):
    """(config, our model, the card's pipeline) per model config, loaded once, both in float64."""
    loaded = {}

    def get(name):
        if name not in loaded:
            cfg = config_for(name, model_cfg, layouts)
            loaded[name] = (cfg, load_model(cfg, cache_dir).to(dtype=torch.float64), card_pipeline(name, cfg, layouts, cache_dir))
        return loaded[name]

    return get


# ---- the tests -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CARDS))
def test_defaults_are_the_model_cards(name, model_cfg):
    cfg, card = model_cfg(name), CARDS[name]
    sampler = make_sampler(cfg["sampler"])
    assert sampler.scheduler_class == card.scheduler and dict(sampler.scheduler_config) == card.overrides
    assert sampler.steps == card.call.get("num_inference_steps", len(card.call.get("timesteps") or ()))
    assert sampler.guidance == card.call["guidance_scale"] and sampler.eta == card.call.get("eta", 0.0)
    assert list(sampler.timesteps or ()) == list(card.call.get("timesteps") or ())
    assert cfg["resolution"] == card.resolution
    assert set(SCHEDULERS.values()) >= {c.scheduler for c in CARDS.values()}


def test_default_timesteps_are_diffusers(model_cfg):
    """The schedules the gaps were about: leading spacing with steps_offset, trailing, LCM's pick, PNDM's repeat."""
    from diffusers import DDPMScheduler

    hub = {"sd15": SD15_SCHEDULER, "sdxl": SDXL_SCHEDULER, "sdxl-turbo": TURBO_SCHEDULER, "sdxl-dmd2": SDXL_SCHEDULER, "sdxl-lcm": SDXL_SCHEDULER}
    a = DDPMScheduler.from_config(SDXL_SCHEDULER).alphas_cumprod.double()
    sched = lambda name, steps=None: build_schedule(make_sampler(model_cfg(name)["sampler"], steps), hub[name], a)  # noqa: E731
    assert sched("sdxl").timesteps == tuple(range(981, 0, -20)) and sched("sdxl").final_alpha == 1.0
    sd15 = sched("sd15")
    assert sd15.timesteps == tuple(range(981, 0, -20)) and sd15.evaluations[:4] == (981, 961, 961, 941) and len(sd15.evaluations) == 51
    assert sd15.final_alpha == pytest.approx(float(a[0]))  # set_alpha_to_one false: SD1.5 ends on alphas_cumprod[0], not x0
    assert sched("sdxl-turbo").timesteps == (999,) and sched("sdxl-turbo", 3).timesteps == (999, 666, 332)
    assert sched("sdxl-turbo").initial_scale == pytest.approx(math.sqrt(1 - float(a[999])))  # trailing: sigma_max, not sqrt(sigma_max^2 + 1)
    assert sched("sdxl-lcm").timesteps == (999, 759, 499, 259) and sched("sdxl-lcm", 2).timesteps == (999, 499)
    assert sched("sdxl-dmd2").timesteps == (999, 749, 499, 249) and sched("sdxl-dmd2", 1).timesteps == (999,)


@pytest.mark.parametrize("name,steps", CASES, ids=[f"{n}-{s or 'card'}" for n, s in CASES])
def test_sample_equals_the_card_pipeline(name, steps, pair):
    cfg, model, pipe = pair(name)
    sampler = make_sampler(cfg["sampler"], steps)
    call = dict(CARDS[name].call)
    if steps is not None:  # another step count: the scheduler's own schedule for it
        call = {**{k: v for k, v in call.items() if k != "timesteps"}, "num_inference_steps": steps}
    n = len(model.timesteps(sampler))
    streams = [torch.Generator().manual_seed(s) for s in SEEDS]  # each image's stream: x_T, then one draw per step
    per_image = [[torch.randn(model.latent_shape(), generator=g, dtype=torch.float64) for _ in range(1 + n)] for g in streams]
    latents = torch.stack([draws[0] for draws in per_image])
    step_noise = [torch.stack([draws[1 + k] for draws in per_image]) for k in range(n)]

    with torch.no_grad():
        ours = model.sample(PROMPTS, [torch.Generator().manual_seed(s) for s in SEEDS], sampler)
        with scheduler_noise(step_noise):
            theirs = pipe(PROMPTS, latents=latents, output_type="latent", height=model.resolution, width=model.resolution, **call).images
    assert [int(t) for t in pipe.scheduler.timesteps] == list(model.schedule(sampler).evaluations)
    rel = float((ours - theirs).abs().max() / theirs.abs().max())
    print(f"{name} {n} steps: max relative difference {rel:.2e}")
    assert rel < RTOL
    assert float((ours[0] - ours[1]).abs().max()) > 1e-2  # the two images differ: the check is not vacuous


def test_ddpo_sampler_on_sd15_equals_the_ddim_pipeline(pair):
    """DDPO's MDP on SD1.5 (train.sampler: {kind: ddim, eta: 1.0}) is DDIMScheduler with eta 1 on the card's
    config, whose set_alpha_to_one: false makes the last step land on alphas_cumprod[0] and draw noise too:
    every step is stochastic and trained."""
    from diffusers import DDIMScheduler

    cfg, model, pipe = pair("sd15")
    sampler = make_sampler({**cfg["sampler"], "kind": "ddim", "eta": 1.0}, 4)
    assert model.stochastic_timesteps(sampler) == model.timesteps(sampler) == [751, 501, 251, 1]
    assert model.transition_std(1, -1, sampler) > 0.01
    streams = [torch.Generator().manual_seed(s) for s in SEEDS]
    per_image = [[torch.randn(model.latent_shape(), generator=g, dtype=torch.float64) for _ in range(5)] for g in streams]
    card_scheduler = pipe.scheduler
    pipe.scheduler = DDIMScheduler.from_config(card_scheduler.config)
    try:
        with torch.no_grad():
            final, states, steps = model.sample(PROMPTS, [torch.Generator().manual_seed(s) for s in SEEDS], sampler, trajectory=True)
            with scheduler_noise([torch.stack([d[k] for d in per_image]) for k in range(1, 5)]):
                theirs = pipe(PROMPTS, latents=torch.stack([d[0] for d in per_image]), output_type="latent", height=32, width=32,
                              num_inference_steps=4, guidance_scale=7.5, eta=1.0).images
    finally:
        pipe.scheduler = card_scheduler
    assert float((final - theirs).abs().max() / theirs.abs().max()) < RTOL
    assert float(steps[-1].std) > 0 and not torch.equal(states[-1], steps[-1].mean)


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_trajectory_methods_refuse_deterministic_samplers(name, pair):
    from bench.models.diffusion import SamplerError

    cfg, model, _ = pair(name)
    with pytest.raises(SamplerError, match=r"train.sampler: \{kind: ddim, eta: 1.0\}") as err:
        model.stochastic_timesteps()
    assert "\n" not in str(err.value) and model.sampler.scheduler_class in str(err.value)
    if name == "sd15":  # PLMS samples, but has no trajectory of Gaussian transitions
        with pytest.raises(SamplerError, match="epsilon history"):
            model.sample(PROMPTS[:1], [torch.Generator().manual_seed(0)], make_sampler(cfg["sampler"], 2), trajectory=True)


def test_trajectory_presets_train_through_a_stochastic_multistep_sampler():
    """A preset whose method trains through the sampler's transitions, on a base whose card samples in
    one step or deterministically, names the sampler it trains through (train.sampler)."""
    from bench.config import compose, to_dict
    from bench.registry import METHODS

    trajectory = ("bench.methods.pso:", "bench.methods.pso_offline:", "bench.methods.pso_online:", "bench.methods.d3po:", "bench.methods.ddpo:")
    checked = []
    for name in METHODS.names():
        cfg = to_dict(compose([f"method={name}"]))
        if not cfg["method"].get("base_model"):
            continue
        train = make_sampler({**cfg["model"]["sampler"], **(cfg["train"].get("sampler") or {})})
        if str(cfg["method"].get("recipe", "")).startswith(trajectory):
            assert train.steps >= 2 and (train.kind in ("euler_ancestral", "lcm") or (train.kind == "ddim" and train.eta > 0)), name
            checked.append(name)
        if cfg["method"]["name"].startswith("lasro-ssd1b"):  # LaSRO trains and evaluates SSD-1B-LCM at 2 steps
            assert train.steps == 2 and cfg["gen"]["steps"] == 2, name
    assert {"pso-offline-turbo", "pso-online-turbo", "pso-dreambooth-turbo", "pso-style-turbo", "pso-online-dmd2"} <= set(checked)
