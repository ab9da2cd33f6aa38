"""The diffusion model as an MDP: schedules, Gaussian transitions against hand-written DDIM
formulas, seeded sampling, the offline CLIP tokenizer, and loading through ``from_pretrained``."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch

from bench.config import compose, to_dict
from bench.models import load_model, make_sampler, pipeline_location
from bench.models.diffusion import Sampler, Transition, gaussian_log_prob, to_uint8

PROMPTS = ["a red cat on a chair", "a dark mountain", "an old boat on the river"]





def hand_alphas_cumprod(n=1000, beta_start=0.00085, beta_end=0.012) -> torch.Tensor:
    """Stable Diffusion's "scaled_linear" schedule, written out: betas linear in sqrt space."""
    b0, b1 = math.sqrt(beta_start), math.sqrt(beta_end)
    out, prod = [], 1.0
    for i in range(n):
        beta = (b0 + (b1 - b0) * i / (n - 1)) ** 2
        prod *= 1.0 - beta
        out.append(prod)
    return torch.tensor(out, dtype=torch.float64)


def seeded(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ---- schedules -------------------------------------------------------------------------------
def test_tiny_ddim_schedule_is_diffusers_leading_spacing(tiny_cfg, model):
    sampler = make_sampler(tiny_cfg["sampler"])
    assert (sampler.kind, sampler.steps, sampler.eta, sampler.guidance) == ("ddim", 4, 1.0, 3.0)
    # DDIMScheduler on tiny's config: leading spacing plus steps_offset 1, as on SD1.5's and SDXL's configs
    assert model.timesteps(sampler) == [751, 501, 251, 1]
    assert model.timesteps(Sampler("ddim", 2, 1.0)) == [501, 1]
    assert model.timesteps(Sampler("ddim", 10, 1.0)) == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]
    assert model.timesteps(Sampler("ddim", 3, 1.0, scheduler_config=(("timestep_spacing", "trailing"),))) == [999, 666, 332]


def test_explicit_timesteps_hold_at_their_length_and_the_scheduler_gives_the_rest(model):
    listed = [999, 749, 499, 249]
    s = lambda steps: model.timesteps(make_sampler({"kind": "lcm", "steps": 4, "guidance": 1.0, "timesteps": listed}, steps))  # noqa: E731
    assert s(4) == listed
    # another step count: LCMScheduler's own pick from its 50 original steps, floor(linspace(0, 50, N))
    assert s(2) == [999, 499]
    assert s(1) == [999]
    assert s(3) == [999, 679, 339]
    assert s(5) == [999, 799, 599, 399, 199]
    assert make_sampler({"kind": "lcm", "steps": 4, "guidance": 1.0, "timesteps": listed}, 2).timesteps is None


def test_few_step_model_uses_its_listed_timesteps(model):
    cfg = to_dict(compose(["model=tiny-fewstep"]))["model"]
    sampler = make_sampler(cfg["sampler"])
    assert sampler.kind == "lcm" and sampler.timesteps == (999, 749, 499, 249)
    assert model.timesteps(sampler) == [999, 749, 499, 249]
    assert model.timesteps(make_sampler(cfg["sampler"], steps=2)) == [999, 499]


# ---- transitions -----------------------------------------------------------------------------
def test_alphas_cumprod_is_the_scaled_linear_schedule(model):
    a = hand_alphas_cumprod()
    assert model.num_train_timesteps == 1000
    torch.testing.assert_close(model.alphas_cumprod, a, rtol=1e-6, atol=0)
    assert model.alpha(-1) == 1.0
    assert model.alpha(500) == pytest.approx(float(a[500]), rel=1e-6)


@pytest.mark.parametrize("eta", [1.0, 0.0, 0.5])
@pytest.mark.parametrize("t,t_prev", [(750, 500), (999, 749), (250, 0)])
def test_ddim_transition_matches_hand_formula(model, eta, t, t_prev):
    g = torch.Generator().manual_seed(1)
    x_t, x0, eps = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    a_t, a_prev = float(model.alphas_cumprod[t]), float(model.alphas_cumprod[t_prev])
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))
    want_mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps

    step = model.transition(x_t, x0, eps, t, t_prev, Sampler("ddim", 4, 1.0, eta=eta))
    assert isinstance(step, Transition)
    assert step.std.dim() == 0 and float(step.std) == pytest.approx(sigma, rel=1e-12, abs=1e-15)
    torch.testing.assert_close(step.mean, want_mean, rtol=1e-12, atol=1e-12)
    if eta == 0.0:
        assert float(step.std) == 0.0
        # deterministic DDIM: sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
        torch.testing.assert_close(step.mean, math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_ddim_transition_agrees_with_diffusers_ddim_scheduler(model, tiny_cfg, eta):
    """An independent check: diffusers' DDIMScheduler.step from the same x_t and eps."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(**tiny_cfg["build"]["scheduler"])
    sched.set_timesteps(4)  # so its prev timestep is t - 250, as in [750, 500, 250, 0]
    g = torch.Generator().manual_seed(2)
    x_t, eps, z = (torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    t, t_prev = 750, 500
    x0 = model.x0_from_eps(x_t, eps, t)
    step = model.transition(x_t, x0, eps, t, t_prev, Sampler("ddim", 4, 1.0, eta=eta))
    ours = step.mean + step.std * z
    theirs = sched.step(eps, t, x_t, eta=eta, variance_noise=z).prev_sample
    torch.testing.assert_close(ours, theirs.to(torch.float64), rtol=1e-5, atol=1e-5)


def test_lcm_transition_and_final_step(model):
    g = torch.Generator().manual_seed(3)
    x_t, x0, eps = (torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    lcm = Sampler("lcm", 4, 1.0, timesteps=(999, 749, 499, 249))
    a_prev = float(model.alphas_cumprod[499])
    # LCMScheduler's boundary condition at t: c_skip = 0.25 / ((10 t)^2 + 0.25), c_out = 10 t / sqrt((10 t)^2 + 0.25)
    denoised = lambda t: (10 * t / math.sqrt((10 * t) ** 2 + 0.25)) * x0 + 0.25 / ((10 * t) ** 2 + 0.25) * x_t  # noqa: E731
    step = model.transition(x_t, x0, eps, 749, 499, lcm)
    torch.testing.assert_close(step.mean, math.sqrt(a_prev) * denoised(749), rtol=1e-12, atol=1e-12)
    assert float(step.std) == pytest.approx(math.sqrt(1 - a_prev), rel=1e-12)
    last = model.transition(x_t, x0, eps, 249, -1, lcm)
    torch.testing.assert_close(last.mean, denoised(249), rtol=1e-12, atol=1e-12)
    assert float(last.std) == 0.0 and float((last.mean - x0).abs().max()) < 1e-6  # within 1e-7 of x0 this late
    last = model.transition(x_t, x0, eps, 1, -1, Sampler("ddim", 4, 1.0, eta=1.0))  # set_alpha_to_one (DDIM's default): x0
    assert torch.equal(last.mean, x0) and float(last.std) == 0.0
    with pytest.raises(ValueError, match="unknown sampler kind"):
        model.transition(x_t, x0, eps, 749, 499, Sampler("heun", 4, 1.0))


def test_gaussian_log_prob_matches_torch_normal():
    g = torch.Generator().manual_seed(4)
    x, mean = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64), torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64)
    for std in (torch.tensor(0.37, dtype=torch.float64), 0.1 + torch.rand(3, 4, 5, 6, generator=g, dtype=torch.float64)):
        got = gaussian_log_prob(x, mean, std)
        want = torch.distributions.Normal(mean, std.expand_as(mean)).log_prob(x).flatten(1).sum(1)
        assert got.shape == (3,)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-9)
    # one number by hand: a single standard-normal coordinate at 0 has log-density -log(2 pi) / 2
    z = torch.zeros(1, 1, dtype=torch.float64)
    assert float(gaussian_log_prob(z, z, torch.tensor(1.0, dtype=torch.float64))) == pytest.approx(-0.5 * math.log(2 * math.pi))


# ---- sampling --------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sample_trajectory_is_the_mdp(model, dtype):
    model.to(dtype=dtype)
    steps = model.timesteps()
    final, states, transitions = model.sample(PROMPTS[:2], seeded(11, 12), trajectory=True)
    assert len(states) == len(steps) + 1 == 5 and len(transitions) == len(steps)
    assert torch.equal(states[-1], final) and final.shape == (2, 4, 8, 8) and final.dtype == dtype

    # Replay each image's own noise stream: x_T, then one draw per stochastic step.
    gens = seeded(11, 12)
    draw = lambda: torch.stack([torch.randn(4, 8, 8, generator=g, dtype=torch.float64) for g in gens]).to(dtype)  # noqa: E731
    assert torch.equal(states[0], draw())
    for i, (t, step) in enumerate(zip(steps, transitions)):
        if i + 1 < len(steps):
            a_t, a_prev = model.alpha(t), model.alpha(steps[i + 1])
            sigma = math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))  # eta = 1
            assert float(step.std) == pytest.approx(sigma, rel=1e-12 if dtype == torch.float64 else 1e-6) and sigma > 0.02
            assert torch.equal(states[i + 1], step.mean + step.std * draw())
        else:
            assert float(step.std) == 0.0 and torch.equal(states[i + 1], step.mean)
    assert not torch.equal(states[-1][0], states[-1][1])


def test_sample_is_reproducible_and_batch_invariant(model):
    model.to(dtype=torch.float64)
    seeds = (101, 102, 103)
    batch = model.sample(PROMPTS, seeded(*seeds))
    again = model.sample(PROMPTS, seeded(*seeds))
    assert torch.equal(batch, again)
    alone = model.sample([PROMPTS[1]], seeded(seeds[1]))
    # Exact where it counts: the 8-bit image. The float64 latents agree to rounding only, because
    # MKL's dgemm computes the rows of a partial 4-row block with another kernel (a plain X @ W.T
    # differs in its last M % 4 rows), and M = 77 * batch rows in the text encoder and cross-attention.
    assert float((batch[1:2] - alone).abs().max()) < 1e-12
    with torch.no_grad():
        assert torch.equal(to_uint8(model.decode(batch))[1:2], to_uint8(model.decode(alone)))
    other = model.sample([PROMPTS[1]], seeded(999))
    assert (other - alone).abs().max() > 1e-2


def test_decode_gives_images_in_unit_range(model):
    g = torch.Generator().manual_seed(5)
    latents = model.sample(PROMPTS[:2], seeded(1, 2))
    with torch.no_grad():
        images = model.decode(latents)
        wild = model.decode(10 * torch.randn(2, 4, 8, 8, generator=g))
    for im in (images, wild):
        assert im.shape == (2, 3, 32, 32)
        assert float(im.min()) >= 0.0 and float(im.max()) <= 1.0
    assert 0.0 < float(images.mean()) < 1.0 and float(images.std()) > 0
    model.to(dtype=torch.float64)
    with torch.no_grad():
        both, alone = model.decode(latents.double()), model.decode(latents[1:].double())
    assert float((both[1:] - alone).abs().max()) < 1e-12 and torch.equal(to_uint8(both)[1:], to_uint8(alone))


# ---- tokenizer -------------------------------------------------------------------------------
def test_tokenizer_matches_open_clip(model):
    import open_clip

    tok = model.tokenizer
    assert len(tok) == 49408 and tok.vocab_size == 49408 and tok.model_max_length == 77
    prompts = [
        "a photo of a cat",
        "Hello, world! It's 3:45pm... (really?)",
        "don't stop-believing; x=y+z",
        "café naïve — 東京 🚀 Ünïcödé",
        "  multiple   spaces\tand\nnewlines ",
        "",
        " ".join(["a very long prompt"] * 30),  # truncated to 77 tokens, ending in eot
    ]
    theirs = open_clip.tokenize(prompts)
    ours = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ours.shape == theirs.shape == (len(prompts), 77)
    eot = 49407
    for a, b in zip(theirs.tolist(), ours.tolist()):
        a, b = a[: a.index(eot) + 1], b[: b.index(eot) + 1]  # open_clip pads with 0, the HF tokenizer with eot
        assert a == b
        assert a[0] == 49406
    assert theirs[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]  # "a photo of a cat"
    assert ours[-1, -1] == eot and len(set(ours[-1].tolist())) > 3


# ---- loading ---------------------------------------------------------------------------------
def test_built_folder_loads_identically_twice(tiny_cfg, cache_dir):
    location, revision, identity = pipeline_location(tiny_cfg, cache_dir)
    folder = Path(location)
    assert revision is None and identity["source"] == "tiny" and folder.name == f"tiny-{identity['build_hash']}"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    m1, m2 = load_model(tiny_cfg, cache_dir), load_model(tiny_cfg, cache_dir)
    assert m1.identity == m2.identity == identity
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        out1, out2 = m1.unet(x, t, encoder_hidden_states=cond).sample, m2.unet(x, t, encoder_hidden_states=cond).sample
    assert torch.equal(out1, out2) and float(out1.abs().mean()) > 0


def test_build_seed_changes_folder_and_weights(cache_dir):
    # Pre-training off for both builds keeps this cheap; only build.seed differs between them.
    cfgs = [to_dict(compose(["model=tiny", "model.build.pretrain=null", f"model.build.seed={s}"]))["model"] for s in (0, 1)]
    folders = [pipeline_location(c, cache_dir)[0] for c in cfgs]
    assert folders[0] != folders[1]
    m0, m1 = (load_model(c, cache_dir) for c in cfgs)
    w0, w1 = m0.unet.state_dict(), m1.unet.state_dict()
    assert w0.keys() == w1.keys()
    assert not torch.equal(w0["conv_in.weight"], w1["conv_in.weight"])
    assert not torch.equal(
        m0.text_encoder.get_input_embeddings().weight, m1.text_encoder.get_input_embeddings().weight
    )
    # the same seed rebuilt into the same folder gives the same weights
    again = load_model(cfgs[0], cache_dir)
    assert torch.equal(again.unet.state_dict()["conv_in.weight"], w0["conv_in.weight"])


def test_x0_from_eps_inverts_add_noise(model):
    g = torch.Generator().manual_seed(7)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64), torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    a = hand_alphas_cumprod()
    ts = torch.tensor([0, 480, 999])
    x_t = model.add_noise(x0, noise, ts)
    for i, t in enumerate(ts.tolist()):
        want = math.sqrt(float(a[t])) * x0[i] + math.sqrt(1 - float(a[t])) * noise[i]
        torch.testing.assert_close(x_t[i], want, rtol=1e-6, atol=1e-6)
        back = model.x0_from_eps(x_t[i : i + 1], noise[i : i + 1], t)
        assert float((back - x0[i : i + 1]).abs().max()) < 1e-6
    # a scalar timestep applies to the whole batch
    same = model.add_noise(x0, noise, 480)
    torch.testing.assert_close(same[1], x_t[1], rtol=0, atol=1e-12)
    assert float((model.x0_from_eps(same, noise, 480) - x0).abs().max()) < 1e-6


def _builds_under(threads: tuple[int, ...], spec: dict, root) -> list[dict]:
    """The safetensors bytes of one spec built from processes set to each thread count."""
    from bench.models.tiny import build_tiny_pipeline

    before = torch.get_num_threads()
    files = []
    for n in threads:
        torch.set_num_threads(n)
        try:
            build_tiny_pipeline(spec, root / str(n))
        finally:
            torch.set_num_threads(before)
        files.append({p.relative_to(root / str(n)): p.read_bytes() for p in sorted((root / str(n)).rglob("*.safetensors"))})
    assert torch.get_num_threads() == before
    return files


def _file_digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_build_is_the_same_on_any_thread_count_and_from_shipped_weights(tmp_path, monkeypatch):
    """Builds of one spec (the SDXL layout, both text encoders; the UNet's pre-training cut to 3 steps)
    from processes set to 16 threads and to 1 give the same bytes: the builder runs on one thread
    (float32 CPU reductions otherwise depend on how many threads split them). A pre-training result,
    written to and read back from the shipped file format, and the seed then give every file of its
    build: the UNet's, and the VAE's with its scaling factor (each pre-training alone, 3 steps: with
    both, the UNet's encodes a 4,096-image pool, 15 s a build; the slow test builds them in full)."""
    from bench.models import prebuilt
    from bench.models.tiny import build_tiny_pipeline, pretrained_weights

    spec = to_dict(compose(["model=tiny-sdxl-fewstep"]))["model"]["build"]
    unet_only = {**spec, "pretrain": {**spec["pretrain"], "steps": 3}, "pretrain_vae": None}
    files = _builds_under((16, 1), unet_only, tmp_path)
    assert len(files[0]) == 4 and files[0] == files[1]  # unet, vae, two text encoders
    vae_only = {**spec, "pretrain": None, "pretrain_vae": {**spec["pretrain_vae"], "steps": 3}}
    build_tiny_pipeline(vae_only, tmp_path / "vae")
    monkeypatch.setattr(prebuilt, "SHIPPED", tmp_path / "shipped")
    (tmp_path / "shipped").mkdir()
    for name, built, build_spec, parts in (("unet", tmp_path / "1", unet_only, {"unet"}), ("vae", tmp_path / "vae", vae_only, {"vae"})):
        prebuilt.save_shipped(f"tiny-{name}", pretrained_weights(built, build_spec))
        shipped = prebuilt.shipped_weights(f"tiny-{name}")
        assert {k.split(".")[0] for k in shipped["tensors"]} == parts and (shipped["vae_scaling_factor"] is None) == (name == "unet")
        build_tiny_pipeline(build_spec, tmp_path / f"restored-{name}", shipped)
        full = _file_digests(built)
        assert len(full) == 14 and _file_digests(tmp_path / f"restored-{name}") == full
    assert prebuilt.shipped_weights("tiny-elsewhere") is None


def test_every_embedded_model_has_its_shipped_weights():
    """A spec or builder edit changes a build hash: the shipped files must be written again, or every
    fresh cache would pre-train for minutes (the world's scorers, ``bench.world.scorers``, included)."""
    from bench.models.prebuilt import SHIPPED, embedded_builds, world_scorers_build

    shipped = {p.stem for p in SHIPPED.glob("*.safetensors")}
    assert shipped == set(embedded_builds()) | {world_scorers_build()}, "stale shipped weights: run `python -m bench.models.prebuilt`"


@pytest.mark.slow  # three full builds of every tiny model at 16, 2 and 1 threads: about 15 minutes on 2 cores
@pytest.mark.parametrize("name", ["tiny", "tiny-fewstep", "tiny-sdxl-fewstep"])
def test_a_full_build_is_the_same_on_any_thread_count_and_equals_the_shipped_one(name, model_cfg, cache_dir, tmp_path):
    from bench.models.tiny import build_tiny_pipeline

    cfg = model_cfg(name)
    for threads in (16, 2, 1):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            build_tiny_pipeline(cfg["build"], tmp_path / str(threads))
        finally:
            torch.set_num_threads(before)
    shipped = _file_digests(Path(pipeline_location(cfg, cache_dir)[0]))
    assert all(_file_digests(tmp_path / str(n)) == shipped for n in (16, 2, 1))
