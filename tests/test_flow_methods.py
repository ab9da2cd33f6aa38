"""The flow models' MDP and Flow-GRPO against the written-out expressions of yifan123/flow_grpo
(``sde_step_with_logprob``, ``PerPromptStatTracker``, the loss of ``scripts/train_sd3.py``) and of
the paper, values and gradients, on the embedded tiny FLUX-layout model."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from bench.method import RoundStore, TrainContext
from bench.methods.flow_grpo import FlowGRPO, group_advantages
from bench.metrics.weightfree import Brightness
from bench.models.diffusion import gaussian_log_prob
from conftest import nudge, with_lora

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

    spec = to_dict(compose([f"method={preset}"]))["method"]
    cfg = {k: spec[k] for k in ("samples_per_prompt", "beta", "clip_range", "adv_clip_max", "global_std", "logprob_reduction", "kl_variance", "detach_uncond", "timestep_fraction")}
    method = FlowGRPO({**cfg, "samples_per_prompt": 3, "prompts_per_round": 2, "beta": 0.5, "clip_range": 0.05, "epochs_per_round": 1, "seed": 0, "reward": "brightness"})
    model, params = with_lora(flux, torch.float64)
    ctx = TrainContext(model, PROMPTS, Brightness(), 0, torch.device("cpu"), 6, progress=False, rounds=RoundStore(tmp_path / "rounds"))
    data = method.prepare(ctx)
    data.get(ctx, 0)  # the round, sampled by the model as it is
    nudge(params, 0.15 if cfg["logprob_reduction"] == "mean" else 0.003)
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
    model, params = with_lora(flux)
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


def pairs_with_fixed_noise(model, n: int, rows: int, monkeypatch) -> tuple[dict, torch.Tensor]:
    """``n`` random (preferred, dispreferred) latent pairs in the form of self-generated pair data, and
    ``rows`` noise draws that the pair recipes' ``draw_noise`` then returns, so a test can use the same."""
    from bench.methods import preference_data

    g = torch.Generator().manual_seed(0)
    shape = model.latent_shape()
    data = {"latents_w": torch.randn(n, *shape, generator=g, dtype=torch.float64), "latents_l": torch.randn(n, *shape, generator=g, dtype=torch.float64),
            "prompt_index": torch.arange(n), "ties_dropped": torch.tensor(0)}
    noise = torch.randn(rows, *shape, generator=g, dtype=torch.float64)
    monkeypatch.setattr(preference_data, "draw_noise", lambda shape, generator, ctx: noise[: shape[0]])
    return data, noise


def test_offline_pso_on_a_flow_model_is_eq6_with_velocity_errors(flux, monkeypatch):
    """Offline PSO's Eq. 6 written out with a flow model's velocity errors at the few-step sampler's sigmas but
    the last (1, 0.75, 0.5 on tiny-flux), one noise a pair and step: values and LoRA gradients."""
    import torch.nn.functional as F

    from bench.methods import preference_data
    from bench.methods.pso_offline import OfflinePSO, pso_timesteps

    model, params = with_lora(flux, torch.float64, noise=0.1)
    assert pso_timesteps(model) == model.timesteps()[:-1] and [model.sigma(t) for t in pso_timesteps(model)] == [1.0, 0.75, 0.5]
    n = 2
    data, noise = pairs_with_fixed_noise(model, n, n * 3, monkeypatch)
    method = OfflinePSO({"beta": 50.0, "reduction": "mean", "share_noise": True, "samples_per_prompt": 2, "reward": None, "seed": 0, "drop_ties": True, "prompt_dropout": 0.0})
    ctx = TrainContext(model, PROMPTS[:n], None, 0, torch.device("cpu"), n, progress=False)
    pairs = preference_data.MemoryPairs(data, PROMPTS[:n]).sample(ctx, torch.Generator().manual_seed(1))
    ours, _ = method.loss(ctx, data, torch.Generator().manual_seed(1))
    ours_grads = torch.autograd.grad(ours, params)

    total = 0.0
    for i in range(n):
        cond = model.encode_prompts([pairs.prompts[i]])
        m = 0.0
        for k, t in enumerate(pso_timesteps(model)):
            eps, sigma = noise[i * 3 + k : i * 3 + k + 1], t / 1000
            for x, sign in ((pairs.x_w[i : i + 1], 1), (pairs.x_l[i : i + 1], -1)):
                x_t = (1 - sigma) * x + sigma * eps
                v = model.denoise(x_t, t, cond)
                model.unet.disable_adapters()
                with torch.no_grad():
                    v_pre = model.denoise(x_t, t, cond)
                model.unet.enable_adapters()
                target = eps - x
                m = m + sign * (((target - v) ** 2).mean() - ((target - v_pre) ** 2).mean())
        total = total - F.logsigmoid(-50.0 * m)
    theirs = total / n
    assert float(ours) == pytest.approx(float(theirs), rel=1e-9)
    for a, b in zip(ours_grads, torch.autograd.grad(theirs, params)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-12)


def test_velocity_dpo_draws_flow_grpos_logit_normal_timesteps(flux):
    """The timesteps of ``timesteps: logit_normal`` are diffusers' compute_density_for_timestep_sampling
    read into the scheduler's training timesteps, as train_sd3_dpo.py reads them (SD3.5's shift 3 included)."""
    import diffusers
    from diffusers.training_utils import compute_density_for_timestep_sampling

    from bench.methods.preference_data import logit_normal_timesteps

    ctx = TrainContext(flux, PROMPTS, None, 0, torch.device("cpu"), 4, progress=False)
    ours = logit_normal_timesteps(ctx, 64, torch.Generator().manual_seed(3))
    u = compute_density_for_timestep_sampling(weighting_scheme="logit_normal", batch_size=64, logit_mean=0, logit_std=1, mode_scale=1.29, generator=torch.Generator().manual_seed(3))
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(flux.scheduler_config)
    assert torch.equal(ours, scheduler.timesteps[(u * scheduler.config.num_train_timesteps).long()].double())
    shifted = diffusers.FlowMatchEulerDiscreteScheduler.from_config({**flux.scheduler_config, "shift": 3.0})
    assert shifted.timesteps[500] > scheduler.timesteps[500]  # SD3.5's shift moves the draws toward noise


def test_velocity_dpo_is_train_sd3_dpos_loss(flux, monkeypatch):
    """diffusion-dpo-flow's loss on tiny-flux equals train_sd3_dpo.py's written out: shared noise, one
    logit-normal timestep a pair, mean velocity errors of the learner and the reference, -logsigmoid(-0.5
    beta (w_diff - l_diff)); values and LoRA gradients."""
    import torch.nn.functional as F

    from bench.config import compose, to_dict
    from bench.methods import preference_data
    from bench.methods.diffusion_dpo import DiffusionDPO

    spec = to_dict(compose(["method=diffusion-dpo-flow"]))["method"]
    assert spec["timesteps"] == "logit_normal" and spec["beta"] == 100
    method = DiffusionDPO({k: spec[k] for k in ("beta", "beta_convention", "timesteps", "samples_per_prompt", "reward", "seed", "drop_ties", "prompt_dropout")})
    model, params = with_lora(flux, torch.float64, noise=0.1)
    n = 3
    data, noise = pairs_with_fixed_noise(model, n, n, monkeypatch)
    ctx = TrainContext(model, PROMPTS[:n], None, 0, torch.device("cpu"), n, progress=False)
    ours, _ = method.loss(ctx, data, torch.Generator().manual_seed(1))
    ours_grads = torch.autograd.grad(ours, params)
    g = torch.Generator().manual_seed(1)
    pairs = preference_data.MemoryPairs(data, PROMPTS[:n]).sample(ctx, g)
    timesteps = preference_data.logit_normal_timesteps(ctx, n, g)
    cond = model.encode_prompts(pairs.prompts * 2)
    x = torch.cat([pairs.x_w, pairs.x_l])
    eps, t = torch.cat([noise, noise]), torch.cat([timesteps, timesteps])
    sigmas = (t / 1000).reshape(-1, 1, 1, 1)
    x_t = (1 - sigmas) * x + sigmas * eps
    pred = model.denoise(x_t, t, cond)
    model.unet.disable_adapters()
    with torch.no_grad():
        pred_ref = model.denoise(x_t, t, cond)
    model.unet.enable_adapters()
    target = eps - x
    theta_mse = ((pred - target) ** 2).reshape(2 * n, -1).mean(dim=1)
    ref_mse = ((pred_ref - target) ** 2).reshape(2 * n, -1).mean(dim=1)
    w_l_diff = (theta_mse[:n] - ref_mse[:n]) - (theta_mse[n:] - ref_mse[n:])
    theirs = torch.mean(-F.logsigmoid(-0.5 * 100 * w_l_diff))
    assert float(ours) == pytest.approx(float(theirs), rel=1e-9)
    for a, b in zip(ours_grads, torch.autograd.grad(theirs, params)):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-12)
