"""DanceGRPO against XueZeyue/DanceGRPO's ``flux_step`` and the loss of ``fastvideo/train_grpo_flux.py``
written out (and the paper's objective), values and gradients, on the embedded tiny FLUX-layout model;
its schedule, its group advantages, its shared initial noise and its per-trajectory steps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bench.method import RoundStore, TrainContext
from bench.methods.dance_grpo import DanceGRPO
from bench.methods.ddpo import advantages
from bench.metrics.weightfree import Brightness
from bench.models.diffusion import gaussian_log_prob
from conftest import nudge, with_lora

PROMPTS = ["a photo of a red circle", "two blue squares", "a photo of three green triangles", "a yellow circle above a square"]
DANCE = {"kind": "dance_sde", "eta": 0.3, "steps": 8, "scheduler_config": {"shift": 3.0, "use_dynamic_shifting": False}}


@pytest.fixture(scope="module")
def flux(model_cfg, cache_dir):
    from bench.models import load_model, make_sampler

    cfg = model_cfg("tiny-flux")
    return load_model(cfg, cache_dir, make_sampler({**cfg["sampler"], **DANCE}))


def official_sigmas(n: int, shift: float = 3.0) -> list[float]:
    """train_grpo_flux.py: sd3_time_shift(shift, linspace(1, 0, n + 1))."""
    t = np.linspace(1, 0, n + 1, dtype=np.float32)
    return (shift * t / (1 + (shift - 1) * t)).tolist()


def flux_step(v, x, sigmas, i: int, eta: float, prev=None):
    """flux_step written out: the Euler mean, the score correction with constant eta, std eta sqrt(delta_t),
    the Gaussian log-density with its constants meaned over elements."""
    sigma, sigma_next = sigmas[i], sigmas[i + 1]
    dsigma = sigma_next - sigma
    mean = x + dsigma * v
    x0_hat = x - sigma * v
    std = eta * math.sqrt(sigma - sigma_next)
    score = -(x - x0_hat * (1 - sigma)) / sigma**2
    mean = mean + (-0.5 * eta**2 * score) * dsigma
    log_prob = None
    if prev is not None:
        log_prob = (-((prev.detach() - mean) ** 2) / (2 * std**2) - math.log(std) - math.log(math.sqrt(2 * math.pi))).mean(dim=(1, 2, 3))
    return mean, std, log_prob


def test_the_schedule_and_the_sde_step_are_dancegrpos(flux):
    assert list(flux.schedule().sigmas) == pytest.approx(official_sigmas(8), abs=1e-6)
    sigmas, steps = list(flux.schedule().sigmas), flux.timesteps()
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(steps):
        x, v, prev = (torch.randn(2, *flux.latent_shape(), generator=g, dtype=torch.float64) for _ in range(3))
        ours = flux.transition(x, flux.x0_from_prediction(x, v, t), v, t, steps[i + 1] if i + 1 < len(steps) else -1)
        mean, std, log_prob = flux_step(v, x, sigmas, i, 0.3, prev)
        assert torch.allclose(ours.mean, mean, rtol=1e-6, atol=1e-7) and float(ours.std) == pytest.approx(std, rel=1e-6)
        assert torch.allclose(gaussian_log_prob(prev, ours.mean, ours.std.double()) / prev[0].numel(), log_prob, rtol=1e-5)


def test_group_advantages_use_the_unbiased_std():
    rewards = torch.tensor([[1.0, 2.0, 4.0], [3.0, 3.0, 3.0]], dtype=torch.float64)
    a = advantages(rewards, 5.0)
    first = np.array([1.0, 2.0, 4.0])
    assert a[0].tolist() == pytest.approx(((first - first.mean()) / (first.std(ddof=1) + 1e-8)).tolist()) and a[1].tolist() == [0, 0, 0]


def method_and_context(preset, flux, tmp_path, **extra):
    from bench.config import compose, to_dict

    spec = to_dict(compose([f"method={preset}"]))["method"]
    keys = ("clip_range", "adv_clip_max", "logprob_reduction", "timestep_fraction", "train_last_step", "init_same_noise", "reward_on_estimate")
    method = DanceGRPO({**{k: spec[k] for k in keys}, "samples_per_prompt": 3, "prompts_per_round": 2, "epochs_per_round": 1, "seed": 0, "reward": "brightness", **extra})
    model, params = with_lora(flux, torch.float64)
    ctx = TrainContext(model, PROMPTS, Brightness(), 0, torch.device("cpu"), 6, progress=False, rounds=RoundStore(tmp_path / "rounds"))
    return method, ctx, params, spec


@pytest.mark.parametrize("preset", ["dance-grpo", "dance-grpo-paper"])
def test_the_loss_is_the_written_out_expression(preset, flux, tmp_path):
    """Values and LoRA gradients of one micro-batch equal train_grpo_flux.py's loss written out unit by unit
    (the paper's: densities summed), with the ratios moved off 1 so that the clip is exercised."""
    method, ctx, params, spec = method_and_context(preset, flux, tmp_path, clip_range=0.05)
    data = method.prepare(ctx)
    data.get(ctx, 0)
    nudge(params, 0.15 if spec["logprob_reduction"] == "mean" else 0.003)
    r, batch, units = method.next_units(ctx.at(0), data)
    k = method.trained_steps(ctx)
    ours, _ = method.loss(ctx.at(0), data, torch.Generator())
    ours_grads = torch.autograd.grad(ours, params)

    model, sigmas = ctx.model, list(ctx.model.schedule().sigmas)
    rewards = batch["rewards"].numpy()
    adv = np.clip((rewards - rewards.mean(1, keepdims=True)) / (rewards.std(1, ddof=1, keepdims=True) + 1e-8), -5, 5).flatten()
    states, old_all = batch["states"].flatten(0, 1), batch["log_probs"].flatten(0, 1)
    prompts = [PROMPTS[int(i)] for i in batch["prompt_index"] for _ in range(3)]
    n = states[0, 0].numel()
    total = 0.0
    for u in units.tolist():
        j = u // k
        i = int(method.unit_steps(ctx, r, torch.tensor([j]), torch.tensor([u % k]))[0])
        x, prev = states[j : j + 1, i].double(), states[j : j + 1, i + 1].double()
        v = model.predict(x, model.timesteps()[i], model.encode_prompts([prompts[j]]))
        lp = flux_step(v, x, sigmas, i, 0.3, prev)[2]
        old = old_all[j, i] / n
        if spec["logprob_reduction"] == "sum":
            lp, old = lp * n, old * n
        ratio = torch.exp(lp - old)
        total = total + torch.maximum(-adv[j] * ratio, -adv[j] * torch.clamp(ratio, 1 - 0.05, 1 + 0.05)).sum()
    theirs = total / len(units)
    their_grads = torch.autograd.grad(theirs, params)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    for a, b in zip(ours_grads, their_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-10)
    assert k == (4 if preset == "dance-grpo" else 8)


def test_a_group_shares_its_initial_noise_and_each_trajectory_trains_its_own_steps(flux, tmp_path):
    method, ctx, _, _ = method_and_context("dance-grpo", flux, tmp_path)
    batch = method.prepare(ctx).get(ctx, 0)
    start = batch["states"][:, :, 0]  # (prompts, samples, C, h, w)
    assert torch.equal(start[0, 0], start[0, 1]) and torch.equal(start[0, 0], start[0, 2]) and not torch.equal(start[0, 0], start[1, 0])
    assert not torch.equal(batch["states"][0, 0, -1], batch["states"][0, 1, -1])  # the SDE's noise sets them apart
    k = method.trained_steps(ctx)
    slots = torch.arange(k).repeat(6)
    traj = torch.arange(6).repeat_interleave(k)
    steps = method.unit_steps(ctx, 0, traj, slots).reshape(6, k)
    assert all(len(set(row.tolist())) == k and max(row.tolist()) < 7 for row in steps)  # distinct, never the last transition (7)
    assert len({tuple(row.tolist()) for row in steps}) > 1 and torch.equal(steps, method.unit_steps(ctx, 0, traj, slots).reshape(6, k))
    fresh, ctx2, _, _ = method_and_context("dance-grpo", flux, tmp_path / "b", init_same_noise=False)
    alone = fresh.prepare(ctx2).get(ctx2, 0)["states"][:, :, 0]
    assert not torch.equal(alone[0, 0], alone[0, 1])


def test_the_reward_scores_the_last_steps_clean_estimate(flux, tmp_path):
    """As train_grpo_flux.py decodes pred_original of the last step: x_{N-1} - sigma_{N-1} v(x_{N-1}); the
    paper preset scores the final sample."""
    from bench.models.diffusion import from_uint8, to_uint8

    method, ctx, _, _ = method_and_context("dance-grpo", flux, tmp_path)
    batch = method.prepare(ctx).get(ctx, 0)
    model, states = ctx.model, batch["states"].flatten(0, 1)
    prompts = [PROMPTS[int(i)] for i in batch["prompt_index"] for _ in range(3)]
    x, t = states[:, -2].double(), model.timesteps()[-1]
    with torch.no_grad():
        estimate = x - model.sigma(t) * model.denoise(x, t, model.encode_prompts(prompts))
        want = Brightness().score(from_uint8(to_uint8(model.decode(estimate))), prompts)
    assert torch.allclose(batch["rewards"].flatten(), want.double(), atol=1e-12)
    paper, ctx2, _, _ = method_and_context("dance-grpo-paper", flux, tmp_path / "paper")
    final = paper.prepare(ctx2).get(ctx2, 0)
    with torch.no_grad():
        want = Brightness().score(from_uint8(to_uint8(model.decode(final["states"].flatten(0, 1)[:, -1].double()))), prompts)
    assert torch.allclose(final["rewards"].flatten(), want.double(), atol=1e-12)


def test_dance_grpo_runs_on_micro(cli):
    code, out, err = cli("run", "suite=micro", "model=tiny-flux", "method=dance-grpo", "suite.limit=1", "train.steps=2", "train.batch_size=4",
                         "train.grad_accum=1", "method.prompts_per_round=1", "method.samples_per_prompt=2", "train.sampler.steps=4")
    assert code == 0, err
    assert "micro / tiny-flux / dance-grpo vs" in out and "world-pick" in out
