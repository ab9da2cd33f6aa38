"""The ``-official`` PSO presets against the authors' released code (ZichenMiao/Pairwise_Sample_Optimization
@ 85e09df): each official loss is written out below as their scripts compute it (sigma-space Euler-ancestral
and renoise log-probabilities meaned over elements, clamped ratios, ``-log(sigmoid(...))``; the DreamBooth
hinge on EDM-style errors) and compared with the preset's loss on the same tensors, values and gradients."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bench.config import compose, to_dict
from bench.method import RoundStore, TrainContext
from bench.metrics.weightfree import Brightness
from bench.models import make_sampler
from test_pso_online import perturbed

PROMPTS = ["a red apple", "a dark forest", "a white boat", "a small bird"]


def preset(name: str, **overrides) -> dict:
    cfg = to_dict(compose([f"method={name}", "model=tiny-sdxl-fewstep"]))
    return {**cfg["method"], **overrides}, cfg


@pytest.fixture(scope="module")
def sdxl_lora(model_cfg, cache_dir):
    """tiny-sdxl-fewstep in float64 with a rank-4 LoRA whose B matrices are non-zero: the model
    differs from its adapter-off reference by log-ratios of both signs, inside and beyond the clip."""
    from bench.models import load_model
    from bench.trainer import add_lora

    model = load_model(model_cfg("tiny-sdxl-fewstep"), cache_dir).to(dtype=torch.float64)
    add_lora(model.unet, 4, 4, seed=0)
    return perturbed(model, 0.2)


# ---- the authors' expressions, written out from their code ----------------------------------------
def official_turbo_log_prob(eps, sample, prev_sample, sigma_from, sigma_to):
    """turbo_inference_with_logprob.turbo_step_with_logprob, in sigma space, meaned over elements."""
    pred_original_sample = sample - sigma_from * eps
    derivative = (sample - pred_original_sample) / sigma_from
    sigma_up = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    mean = sample + derivative * (sigma_down - sigma_from)
    lp = -((prev_sample - mean) ** 2) / (2 * sigma_up**2) - math.log(sigma_up) - math.log(math.sqrt(2 * math.pi))
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def official_renoise_log_prob(eps, sample, prev_sample, a_t, a_prev):
    """distilled_inference_with_logprob.distilled_step_with_logprob (x0, then forward-noise to t - step_ratio)."""
    x0 = (sample - (1 - a_t) ** 0.5 * eps) / a_t**0.5
    mean = a_prev**0.5 * x0
    std = (1 - a_prev) ** 0.5
    lp = -((prev_sample - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))
    return lp.mean(dim=tuple(range(1, lp.ndim)))


def sample_compare(a, b):
    """train_online_pso_sdxl_turbo.py: a <= b makes b the target."""
    c = torch.zeros(a.shape[0], 2, dtype=torch.float64)
    c[a <= b] = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    c[b < a] = torch.tensor([1.0, -1.0], dtype=torch.float64)
    return c


def dominance_compare(a, b):
    """train_online_pso_sdxl_dmd2.py (and D3PO's) compare(): a tie leaves both weights 0."""
    c = torch.zeros(a.shape[0], 2, dtype=torch.float64)
    c[a < b] = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    c[b < a] = torch.tensor([1.0, -1.0], dtype=torch.float64)
    return c


def official_online_loss(lp_0, lp_ref_0, lp_1, lp_ref_1, prefer, beta, eps):
    ratio_0 = torch.clamp(torch.exp(lp_0 - lp_ref_0), 1 - eps, 1 + eps)
    ratio_1 = torch.clamp(torch.exp(lp_1 - lp_ref_1), 1 - eps, 1 + eps)
    return -torch.log(torch.sigmoid(beta * torch.log(ratio_0) * prefer[:, 0] + beta * torch.log(ratio_1) * prefer[:, 1])).mean()


def relative_gap(ours, theirs) -> float:
    """|g_ours - g_theirs| / |g_theirs| over all trained parameters together."""
    diff = torch.sqrt(sum(((a - b) ** 2).sum() for a, b in zip(ours, theirs)))
    return float(diff / torch.sqrt(sum((b**2).sum() for b in theirs)))


def test_preference_rules_equal_the_scripts():
    from bench.methods.online import preference

    a = torch.tensor([0.3, 0.5, 0.5, 0.1, 0.2])
    b = torch.tensor([0.4, 0.5, 0.2, 0.1, 0.9])
    assert torch.equal(preference(a, b, "second"), sample_compare(a, b)[:, 0])
    assert torch.equal(preference(a, b, "skip"), dominance_compare(a, b)[:, 0])


@pytest.mark.parametrize("name", ["pso-online-turbo-official", "pso-online-dmd2-official"])
def test_online_official_loss_equals_the_authors_code(name, sdxl_lora, tmp_path):
    from diffusers import EulerAncestralDiscreteScheduler

    from bench.methods.d3po import D3PO

    method_cfg, cfg = preset(name, prompts_per_round=4)
    assert (method_cfg["beta"], method_cfg["eps"], method_cfg["logprob_reduction"]) == (50, 0.1, "mean")
    model = copy.deepcopy(sdxl_lora)
    turbo = name.startswith("pso-online-turbo")
    if turbo:  # SDXL-Turbo's sampler (the card's Euler-ancestral, trailing) on the SDXL-layout tiny model, at the preset's 4 steps
        turbo_sampler = to_dict(compose(["model=sdxl-turbo"]))["model"]["sampler"]
        model.sampler = make_sampler({**turbo_sampler, "scheduler_config": {"timestep_spacing": "trailing"}, **cfg["train"]["sampler"]})
    else:
        model.sampler = make_sampler({**cfg["model"]["sampler"], **cfg["train"]["sampler"]})
    steps = model.timesteps()
    k = len(steps) - 1
    assert k == (3 if turbo else 7)
    method = D3PO(method_cfg)
    ctx = TrainContext(model, PROMPTS, Brightness(), 0, torch.device("cpu"), 4 * k, progress=False, rounds=RoundStore(tmp_path / "rounds"))
    _, batch, units = method.next_units(ctx)
    assert len(units) == 4 * k and torch.equal((units // k).unique(), torch.arange(4))  # whole pairs at all their steps
    loss, _ = method.loss(ctx, {}, torch.Generator())
    params = [p for p in model.unet.parameters() if p.requires_grad]
    ours = torch.autograd.grad(loss, params)

    # the authors' loop over the same units, in their coordinates
    pair, step = units // k, units % k
    states = batch["states"].double()  # (pairs, 2, N + 1, C, h, w), the harness's (VP) states
    cond = model.encode_prompts([PROMPTS[int(i)] for i in batch["prompt_index"][pair]])
    a = model.alphas_cumprod
    if turbo:
        sched = EulerAncestralDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, timestep_spacing="trailing")
        torch.testing.assert_close(sched.alphas_cumprod.double(), model.alphas_cumprod.cpu(), rtol=1e-6, atol=0)
        sched.set_timesteps(4)
        assert sched.timesteps.tolist() == steps
        sigmas = sched.sigmas.double()

    def log_probs(s):
        x_t, x_prev = states[pair, s, step], states[pair, s, step + 1]
        t = torch.tensor([steps[int(j)] for j in step])
        kwargs = cond.unet_kwargs()
        eps = model.unet(x_t, t, **kwargs).sample
        with torch.no_grad():
            model.unet.disable_adapters()
            eps_ref = model.unet(x_t, t, **kwargs).sample
            model.unet.enable_adapters()
        out = []
        for e in (eps, eps_ref):
            if turbo:  # the script keeps sigma-space latents and feeds the UNet x / sqrt(sigma^2 + 1)
                s_from, s_to = sigmas[step].reshape(-1, 1, 1, 1), sigmas[step + 1].reshape(-1, 1, 1, 1)
                lp = torch.stack([official_turbo_log_prob(e[u : u + 1], (x_t * (s_from**2 + 1).sqrt())[u : u + 1],
                                                          (x_prev * (s_to**2 + 1).sqrt())[u : u + 1], float(s_from[u]), float(s_to[u]))[0]
                                  for u in range(len(units))])
            else:
                lp = torch.stack([official_renoise_log_prob(e[u : u + 1], x_t[u : u + 1], x_prev[u : u + 1],
                                                            float(a[steps[int(step[u])]]), float(a[steps[int(step[u])] - 125]))[0]
                                  for u in range(len(units))])
            out.append(lp)
        return out

    (lp_0, lp_ref_0), (lp_1, lp_ref_1) = log_probs(0), log_probs(1)
    compare = sample_compare if turbo else dominance_compare
    prefer = compare(batch["rewards"][pair, 0], batch["rewards"][pair, 1])
    theirs_loss = official_online_loss(lp_0, lp_ref_0, lp_1, lp_ref_1, prefer, 50.0, 0.1)
    theirs = torch.autograd.grad(theirs_loss, params)
    # the scripts' sigmas are the scheduler's float32 ones: agreement to their precision
    assert loss.item() == pytest.approx(theirs_loss.item(), rel=1e-6)
    assert relative_gap(ours, theirs) < 1e-5
    ratio = torch.exp(torch.cat([lp_0 - lp_ref_0, lp_1 - lp_ref_1]))
    inside = ((ratio > 0.9) & (ratio < 1.1)).float().mean()
    assert inside > 0 and (inside < 1 or not turbo)  # Turbo's case covers units inside the clip (with gradient) and beyond it (without)
    assert sum(float(g.abs().sum()) for g in theirs) > 0


def test_official_presets_walk_each_round_once_per_epoch(sdxl_lora, tmp_path):
    """An optimizer step of the DMD2 preset covers 4 whole pairs at their 7 steps (28 units) in micro-batches of
    2 units, and a round of 128 pairs is 4 such steps per assumed GPU, as the script's accounting gives."""
    from bench.methods.d3po import D3PO

    method_cfg, cfg = preset("pso-online-dmd2-official")
    tc = cfg["train"]
    assert (tc["batch_size"], tc["micro_batch_size"], tc["grad_accum"]) == (28, 2, 8)
    model = copy.deepcopy(sdxl_lora)
    model.sampler = make_sampler({**cfg["model"]["sampler"], **tc["sampler"]})
    method = D3PO({**method_cfg, "prompts_per_round": 8})
    accum = tc["grad_accum"] * tc["batch_size"] // tc["micro_batch_size"]
    ctx = TrainContext(model, PROMPTS, Brightness(), 0, torch.device("cpu"), 2, progress=False, rounds=RoundStore(tmp_path / "rounds"), grad_accum=accum)
    assert method.steps_per_round(ctx) == 1  # 8 pairs x 7 steps = 56 units = 28 micro-batches of 2, under one step's 112
    seen = []
    for micro in range(28):
        ctx.step, ctx.micro = 0, micro
        seen.append(method.next_units(ctx)[2])
    seen = torch.cat(seen)
    assert torch.equal(seen.sort().values, torch.arange(56))  # every unit of the round once
    assert all(set((seen[i : i + 7] // 7).tolist()).__len__() == 1 for i in range(0, 56, 7))  # a pair's 7 steps together


# ---- DreamBooth -----------------------------------------------------------------------------------
def official_dreambooth_errors(model, x0, t, noise, cond):
    """The script's EDM-style error: x_sigma = x0 + sigma noise, the UNet on x_sigma / sqrt(sigma^2 + 1), x0_hat =
    x_sigma - sigma eps, weighted by sigma^-2 and meaned over latent elements."""
    a = model.alphas_cumprod[t].reshape(-1, 1, 1, 1)
    sigma = ((1 - a) / a).sqrt()
    noisy = x0 + sigma * noise
    eps = model.unet(noisy / (sigma**2 + 1).sqrt(), t, **cond.unet_kwargs()).sample
    x0_hat = eps * (-sigma) + noisy
    return (sigma**-2.0 * (x0_hat - x0) ** 2).reshape(x0.shape[0], -1).mean(1)


def test_dreambooth_official_loss_equals_the_authors_code(sdxl_lora):
    import torch.nn.functional as F

    from bench.images import TargetImages
    from bench.methods.preference_data import draw_noise
    from bench.methods.pso_dreambooth import PSODreamBoothOfficial

    method_cfg, _ = preset("pso-dreambooth-official")
    assert (method_cfg["loss_type"], method_cfg["beta"], method_cfg["neg_defactor"], method_cfg["prior_loss_weight"]) == ("pso_db", 5, 0.1, 0.5)
    model = copy.deepcopy(sdxl_lora)
    g = torch.Generator().manual_seed(4)
    photos = TargetImages((torch.rand(3, 3, 32, 32, generator=g) * 255).to(torch.uint8), ["a photo of sks dog"] * 3, "test", "a photo of dog")
    ctx = TrainContext(model, photos.captions, None, 0, torch.device("cpu"), 2, progress=False, images=photos)
    method = PSODreamBoothOfficial({**method_cfg, "num_negatives": 3})
    data = method.prepare(ctx)
    assert data["latents_neg"].shape == data["latents_w"].shape == (3, *model.latent_shape())
    params = [p for p in model.unet.parameters() if p.requires_grad]
    for loss_type in ("pso_db", "pso"):
        method.cfg["loss_type"] = loss_type
        loss, _ = method.loss(ctx, data, torch.Generator().manual_seed(7))
        ours = torch.autograd.grad(loss, params)
        # replay the draws of that micro-batch: photo indices, negatives, timesteps, one shared noise
        gen = torch.Generator().manual_seed(7)
        idx = torch.randint(0, 3, (2,), generator=gen)
        neg = torch.randperm(3, generator=gen)[:2]
        t = torch.tensor([750, 500, 250, 0])[torch.randint(0, 4, (2,), generator=gen)]
        noise = draw_noise((2, *model.latent_shape()), gen, ctx)
        x0 = torch.cat([data["latents_w"][idx], data["latents_neg"][neg]]).double()
        cond = model.encode_prompts(["a photo of sks dog"] * 4)  # the instance prompt for the photo and the negative
        errs = official_dreambooth_errors(model, x0, torch.cat([t, t]), torch.cat([noise, noise]), cond)
        w, l = errs.chunk(2)
        model_diff = w - 0.1 * l
        if loss_type == "pso_db":
            logits = -model_diff
            theirs_loss = torch.relu(1 - 5 * logits).mean() + 0.5 * l.mean()
        else:
            with torch.no_grad():
                model.unet.disable_adapters()
                ref = official_dreambooth_errors(model, x0, torch.cat([t, t]), torch.cat([noise, noise]), cond)
                model.unet.enable_adapters()
            rw, rl = ref.chunk(2)
            logits = (rw - 0.1 * rl) - model_diff
            theirs_loss = -1 * F.logsigmoid(5 * logits).mean() + 0.5 * l.mean()
        theirs = torch.autograd.grad(theirs_loss, params)
        assert loss.item() == pytest.approx(theirs_loss.item(), rel=1e-7)
        assert relative_gap(ours, theirs) < 1e-6
        assert sum(float(x.abs().sum()) for x in theirs) > 0
