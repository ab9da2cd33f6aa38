"""Few-step samplers as MDPs: SDXL-Turbo's Euler-ancestral step against diffusers' own scheduler,
and the sigma_up / sigma_down the PSO paper prints garbled, from the scheduler's definition."""

from __future__ import annotations

import math

import pytest
import torch

from bench.models.diffusion import Sampler

TRAILING = (("timestep_spacing", "trailing"),)  # SDXL-Turbo's scheduler config on tiny's betas (the same as SDXL's)
TURBO = Sampler("euler_ancestral", 4, 1.0, scheduler_config=TRAILING)


def test_euler_ancestral_sigmas_are_the_schedulers(model):
    # the PSO spec's values for the 4-step trailing schedule (SDXL's scaled-linear betas, as the tiny model's)
    x = torch.zeros(1, 4, 2, 2, dtype=torch.float64)
    ups, downs = [], []
    steps = model.timesteps(TURBO)
    for t, t_prev in zip(steps, steps[1:] + [-1]):
        step = model.transition(x, x, torch.ones_like(x), t, t_prev, TURBO)
        a_prev = model.alpha(t_prev)
        ups.append(float(step.std) / math.sqrt(a_prev))
        downs.append(float(step.mean.flatten()[0]) / math.sqrt(a_prev) if t_prev >= 0 else 0.0)  # x0 = 0, eps = 1
    assert ups == pytest.approx([3.9193, 1.4816, 0.6259, 0.0], abs=1e-4)
    assert downs == pytest.approx([1.1400, 0.6373, 0.2979, 0.0], abs=1e-4)


@pytest.mark.parametrize("steps", [4, 1])
def test_euler_ancestral_trajectory_equals_diffusers(model, steps):
    from diffusers import EulerAncestralDiscreteScheduler

    model.to(dtype=torch.float64)
    sampler = Sampler("euler_ancestral", steps, 1.0, scheduler_config=TRAILING)
    sched = EulerAncestralDiscreteScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing"
    )
    sched.set_timesteps(steps)
    assert sched.timesteps.tolist() == model.timesteps(sampler) == ([999, 749, 499, 249] if steps == 4 else [999])

    prompt = ["a red apple on a table"]
    ours = model.sample(prompt, [torch.Generator().manual_seed(7)], sampler)

    g = torch.Generator().manual_seed(7)
    cond = model.encode_prompts(prompt)
    x = torch.randn((1, *model.latent_shape()), generator=g, dtype=torch.float64) * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            eps = model.denoise(sched.scale_model_input(x, t), int(t), cond)
            x = sched.step(eps, t, x, generator=g).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)
    assert float(ours.abs().mean()) > 0.1


def test_guidance_distilled_unet_takes_the_scale_as_an_embedding(model):
    """LCM-distilled UNets (time_cond_proj_dim) get w = guidance - 1 as a sinusoidal embedding, in one pass."""
    import copy

    from diffusers import UNet2DConditionModel

    from bench.config import compose, to_dict

    m = copy.deepcopy(model).to(dtype=torch.float64)
    spec = to_dict(compose(["model=tiny"]))["model"]["build"]["unet"]
    torch.manual_seed(0)
    m.unet = UNet2DConditionModel(**spec, time_cond_proj_dim=16).double().eval()
    assert not m.uses_cfg(8.0) and model.uses_cfg(8.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    cond = m.encode_prompts(["a red cat", "a dog"])
    with torch.no_grad():
        got = m.predict_eps(x, 500, cond, m.unconditional(2), guidance=8.0)
        # w = 7, scaled by 1000, against 8 frequencies 10000^(-k/7): [sin, cos]
        freqs = torch.exp(-torch.arange(8, dtype=torch.float64) * math.log(10000.0) / 7)
        emb = torch.cat([torch.sin(7000.0 * freqs), torch.cos(7000.0 * freqs)]).repeat(2, 1)
        want = m.unet(x, torch.tensor([500, 500]), encoder_hidden_states=cond.hidden, timestep_cond=emb).sample
        plain = m.predict_eps(x, 500, cond, m.unconditional(2), guidance=1.0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)  # diffusers takes log(10000) in float32
    assert float((got - plain).abs().max()) > 1e-4


def test_guidance_distilled_unet_trains_on_the_conditioning_it_samples_with(model):
    """Every forward pass of an LCM-style UNet gets the w embedding of the sampler's guidance: the
    training forward (a method's noised latents, the frozen reference) on x_t equals the sampler's
    forward on the same x_t; without the embedding diffusers would skip ``cond_proj`` silently."""
    import copy
    import dataclasses

    from diffusers import UNet2DConditionModel

    from bench.config import compose, to_dict
    from bench.method import TrainContext
    from bench.methods.preference_data import predict

    m = copy.deepcopy(model).to(dtype=torch.float64)
    spec = to_dict(compose(["model=tiny"]))["model"]["build"]["unet"]
    torch.manual_seed(0)
    m.unet = UNet2DConditionModel(**spec, time_cond_proj_dim=16).double().eval()
    torch.nn.init.normal_(m.unet.time_embedding.cond_proj.weight, std=0.5)  # make w matter visibly
    m.sampler = dataclasses.replace(m.sampler, kind="lcm", guidance=8.0, eta=0.0)
    ctx = TrainContext(m, [], None, 0, torch.device("cpu"), 2, progress=False, frozen_unet=copy.deepcopy(m.unet))
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    noise = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    t = torch.tensor([759, 259])
    prompts = ["a red cat", "a dog"]
    with torch.no_grad():
        trained = predict(ctx, x0, prompts, t, noise)
        x_t = m.add_noise(x0, noise, t)
        cond = m.encode_prompts(prompts)
        sampled = torch.cat([m.predict_eps(x_t[i : i + 1], int(t[i]), m.encode_prompts(prompts[i : i + 1]), None, 8.0) for i in range(2)])
        bare = m.unet(x_t, t, encoder_hidden_states=cond.hidden).sample  # what the training forward used to be
    torch.testing.assert_close(trained.pred, sampled, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(trained.ref, sampled, rtol=1e-10, atol=1e-12)
    assert float((bare - sampled).abs().max()) > 1e-3
    # a conditioning made without the model (as a method might) still gets the sampler's w
    bare_cond = dataclasses.replace(cond, guidance_embedding=None)
    torch.testing.assert_close(m.denoise(x_t, t, bare_cond).detach(), sampled, rtol=1e-10, atol=1e-12)
