"""The flow models' MDP and Flow-GRPO against the written-out expressions of yifan123/flow_grpo
(``sde_step_with_logprob``, ``PerPromptStatTracker``, the loss of ``scripts/train_sd3.py``) and of
the paper, values and gradients, on the embedded tiny FLUX-layout model."""

from __future__ import annotations

import copy
import dataclasses
import math

import numpy as np
import pytest
import torch

from bench.method import RoundStore, TrainContext
from bench.methods.flow_grpo import FlowGRPO, group_advantages
from bench.metrics.weightfree import Brightness
from bench.models.diffusion import gaussian_log_prob

PROMPTS = ["a photo of a red circle", "two blue squares", "a photo of three green triangles", "a yellow circle above a square"]


@pytest.fixture(scope="module")
def flux(model_cfg, cache_dir):
    from bench.models import load_model

    cfg = model_cfg("tiny-flux")
    sde = {**cfg["sampler"], **cfg["train_sampler"]}
    from bench.models import make_sampler

    return load_model(cfg, cache_dir, make_sampler(sde))


def official_sde_step(v, x, sigmas: list[float], i: int, a: float, prev=None):
    """sde_step_with_logprob written out: sigma_max is the schedule's second sigma, used in the
    denominator where sigma is 1; the log-probability is meaned over elements."""
    sigma, sigma_prev = sigmas[i], sigmas[i + 1]
    dt = sigma_prev - sigma
    std_dev_t = math.sqrt(sigma / (1 - (sigmas[1] if sigma == 1 else sigma))) * a
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_dev_t * math.sqrt(-dt)
    log_prob = None
    if prev is not None:
        log_prob = (-((prev - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))).mean(dim=(1, 2, 3))
    return mean, std, std_dev_t, log_prob


def test_the_sde_step_is_flow_grpos(flux):
    """Every step of the SDE, the first (sigma 1) and the last (onto sigma 0) included, equals the official step."""
    sigmas = list(flux.schedule().sigmas)
    steps = flux.timesteps()
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(steps):
        x, v, prev = (torch.randn(2, *flux.latent_shape(), generator=g, dtype=torch.float64) for _ in range(3))
        t_prev = steps[i + 1] if i + 1 < len(steps) else -1
        ours = flux.transition(x, flux.x0_from_prediction(x, v, t), v, t, t_prev)
        mean, std, _, log_prob = official_sde_step(v, x, sigmas, i, 0.7, prev)
        assert torch.allclose(ours.mean, mean, rtol=1e-6, atol=1e-7) and float(ours.std) == pytest.approx(std, rel=1e-6)
        ours_lp = gaussian_log_prob(prev, ours.mean, ours.std.double()) / prev[0].numel()
        assert torch.allclose(ours_lp, log_prob, rtol=1e-5)
    assert len(flux.stochastic_timesteps()) == len(steps)  # the last step draws noise too


def test_the_sde_keeps_the_odes_marginal_on_average(flux):
    """With a = 0 the SDE is the Euler ODE; with noise its mean step matches the ODE to first order in dt."""
    x, v = torch.randn(1, *flux.latent_shape(), dtype=torch.float64), torch.randn(1, *flux.latent_shape(), dtype=torch.float64)
    t, t_prev = flux.timesteps()[1], flux.timesteps()[2]
    ode = flux.transition(x, None, v, t, t_prev, dataclasses.replace(flux.sampler, kind="flow_euler"))
    quiet = flux.transition(x, None, v, t, t_prev, dataclasses.replace(flux.sampler, eta=0.0))
    assert torch.allclose(ode.mean, quiet.mean) and float(quiet.std) == 0.0


def test_group_advantages_are_the_stat_trackers():
    """PerPromptStatTracker.update: the prompt's mean, np.std (population) of the group or of the whole batch, + 1e-4."""
    prompts = ["a", "b", "a", "c", "b", "a", "c", "c"]
    rewards = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 4.0, 7.0], dtype=torch.float64)
    r = rewards.numpy()
    for global_std in (False, True):
        want = np.empty_like(r)
        for p in set(prompts):
            rows = np.array([q == p for q in prompts])
            std = (np.std(r) if global_std else np.std(r[rows])) + 1e-4
            want[rows] = (r[rows] - np.mean(r[rows])) / std
        got = group_advantages(rewards, prompts, global_std, clip_max=5.0)
        assert got.tolist() == pytest.approx(np.clip(want, -5, 5).tolist(), rel=1e-12)
    assert group_advantages(torch.tensor([0.0, 10.0]), ["a", "a"], False, 0.5).tolist() == [-0.5, 0.5]


def official_loss(ctx, method, batch, units, sigmas):
    """scripts/train_sd3.py's loss written out on the same units (or the paper's, by the spec): per unit the
    transition of the current and the reference model, ratio against the recorded log-probability, the
    clipped surrogate, and beta x KL, meaned over units."""
    spec, model = method.spec, ctx.model
    s, k = spec.samples_per_prompt, method.trained_steps(ctx)
    traj, step = units // k, units % k
    prompts = [PROMPTS[int(i)] for i in batch["prompt_index"] for _ in range(s)]
    flat = batch["rewards"].flatten().numpy()
    adv_all = np.empty_like(flat)
    for p in set(prompts):
        rows = np.array([q == p for q in prompts])
        std = (np.std(flat) if spec.global_std else np.std(flat[rows])) + 1e-4
        adv_all[rows] = (flat[rows] - flat[rows].mean()) / std
    states = batch["states"].flatten(0, 1)
    total = 0.0
    for u in range(len(units)):
        j, i = int(traj[u]), int(step[u])
        x, prev = states[j : j + 1, i].double(), states[j : j + 1, i + 1].double()
        t = model.timesteps()[i]
        cond = model.encode_prompts([prompts[j]])
        v = model.predict(x, t, cond)
        mean, std, std_dev_t, lp_mean = official_sde_step(v.double(), x.double(), sigmas, i, 0.7, prev.double())
        with torch.no_grad(), ctx.reference():
            v_ref = model.predict(x, t, cond)
        mean_ref = official_sde_step(v_ref.double(), x.double(), sigmas, i, 0.7)[0]
        n = x[0].numel()
        old = batch["log_probs"].flatten(0, 1)[j, i]
        if spec.logprob_reduction == "mean":
            lp, old = lp_mean, old / n
            kl = ((mean - mean_ref) ** 2).mean() / (2 * std_dev_t**2)
        else:
            lp = lp_mean * n
            kl = ((mean - mean_ref) ** 2).sum() / (2 * std**2)
        a = float(np.clip(adv_all[j], -spec.adv_clip_max, spec.adv_clip_max))
        ratio = torch.exp(lp - old)
        policy = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - spec.clip_range, 1 + spec.clip_range))
        total = total + (policy.sum() + spec.beta * kl)
    return total / len(units)


@pytest.mark.parametrize("preset", ["flow-grpo", "flow-grpo-paper"])
def test_the_loss_is_the_written_out_expression(preset, flux, tmp_path):
    """Values and LoRA gradients of one micro-batch equal the expression written out unit by unit; the
    ratios are moved off 1 first (a noise on the LoRA weights), so the clip is exercised."""
    from bench.config import compose, to_dict
    from bench.trainer import add_lora

    spec = to_dict(compose([f"method={preset}"]))["method"]
    cfg = {k: spec[k] for k in ("samples_per_prompt", "beta", "clip_range", "adv_clip_max", "global_std", "logprob_reduction", "kl_variance", "detach_uncond", "timestep_fraction")}
    method = FlowGRPO({**cfg, "samples_per_prompt": 3, "prompts_per_round": 2, "beta": 0.5, "clip_range": 0.05, "epochs_per_round": 1, "seed": 0, "reward": "brightness"})
    model = copy.deepcopy(flux).to(dtype=torch.float64)
    add_lora(model.unet, 4, 4.0, 0, model.lora_targets)
    params = [p for n, p in model.unet.named_parameters() if "lora" in n]
    for p in params:
        p.requires_grad_(True)
    ctx = TrainContext(model, PROMPTS, Brightness(), 0, torch.device("cpu"), 6, progress=False, rounds=RoundStore(tmp_path / "rounds"))
    data = method.prepare(ctx)
    data.get(ctx, 0)  # the round, sampled by the model as it is
    with torch.no_grad():
        for p in params:
            p.add_((0.15 if cfg["logprob_reduction"] == "mean" else 0.003) * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    r, batch, units = method.next_units(ctx.at(0), data)
    ours, logs = method.loss(ctx.at(0), data, torch.Generator())
    ours_grads = torch.autograd.grad(ours, params)
    theirs = official_loss(ctx, method, batch, units, list(model.schedule().sigmas))
    their_grads = torch.autograd.grad(theirs, params)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    for a, b in zip(ours_grads, their_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-10)
    assert logs["kl"] > 0 and 0 < logs["clipfrac"] < 1, logs
    assert method.trained_steps(ctx) == (3 if preset == "flow-grpo" else 4)


def test_one_step_moves_the_advantage_weighted_likelihood(flux, tmp_path):
    """On a fresh round the policy is the sampling policy (every ratio 1); one optimizer step of the official
    preset raises sum A log p over the round's trained transitions."""
    from bench.trainer import add_lora

    model = copy.deepcopy(flux)
    add_lora(model.unet, 4, 4.0, 0, model.lora_targets)
    params = [p for n, p in model.unet.named_parameters() if "lora" in n]
    for p in params:
        p.requires_grad_(True)
    method = FlowGRPO({"samples_per_prompt": 4, "prompts_per_round": 2, "beta": 0.0, "clip_range": 0.5, "global_std": True,
                       "logprob_reduction": "mean", "timestep_fraction": 0.99, "epochs_per_round": 1, "seed": 0, "reward": "brightness"})
    ctx = TrainContext(model, PROMPTS, Brightness(), 0, torch.device("cpu"), 64, progress=False, rounds=RoundStore(tmp_path / "rounds"))
    assert method.steps_per_round(ctx) == 1 and not method.uses_reference  # 8 trajectories x 3 steps in one batch; beta 0: no reference
    data = method.prepare(ctx)
    batch = method.rounds(ctx).get(ctx, 0)
    prompts = [PROMPTS[int(i)] for i in batch["prompt_index"] for _ in range(4)]
    adv = group_advantages(batch["rewards"].flatten(), prompts, True, 5.0)
    units = torch.arange(8 * 3)

    def objective():
        with torch.no_grad():
            states = batch["states"].flatten(0, 1)
            lp, _ = method.unit_terms(ctx, states[units // 3, units % 3], states[units // 3, units % 3 + 1], units % 3, [prompts[int(i)] for i in units // 3])
        old = batch["log_probs"].flatten(0, 1)[units // 3, units % 3] / states[0, 0].numel()
        return float((adv[units // 3] * (lp - old)).sum())

    assert abs(objective()) < 1e-6
    opt = torch.optim.AdamW(params, lr=1e-3)
    loss, _ = method.loss(ctx.at(0), data, torch.Generator())
    loss.backward()
    opt.step()
    assert objective() > 0


@pytest.mark.parametrize("method", ["flow-grpo", "pso-online"])
def test_flow_methods_run_on_micro(cli, method):
    code, out, err = cli("run", "suite=micro", "model=tiny-flux", f"method={method}", "suite.limit=1", "train.steps=2", "train.batch_size=4",
                         "method.prompts_per_round=2", *(["method.samples_per_prompt=2"] if method == "flow-grpo" else []))
    assert code == 0, err
    assert f"micro / tiny-flux / {method} vs" in out and "world-pick" in out


def test_plan_refuses_a_flow_model_in_one_line(cli):
    code, out, err = cli("plan", "method=flow-grpo", "suite=micro")
    assert code != 0 and out == "" and len(err.strip().splitlines()) == 1
    assert "no memory model of the flow transformers" in err
