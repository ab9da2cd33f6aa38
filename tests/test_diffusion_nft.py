"""DiffusionNFT against the loss of NVlabs/DiffusionNFT's ``scripts/train_nft_sd3.py`` written out
(and the paper's objective), values and gradients, on the embedded tiny FLUX-layout model; its old
policy's soft update; a worked example whose numbers were computed by hand from the official code."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from bench.method import RoundStore, TrainContext
from bench.methods.diffusion_nft import DiffusionNFT, FinalSamples, SlowCopy, branch_loss, implicit_policies, optimality
from bench.methods.flow_grpo import group_advantages
from bench.metrics.weightfree import Brightness
from conftest import interrupt_at, nudge, trained_weights, uninterrupted_weights, with_lora

PROMPTS = ["a photo of a red circle", "two blue squares", "a photo of three green triangles", "a yellow circle above a square"]


@pytest.fixture(scope="module")
def flux(model_cfg, cache_dir):
    from bench.models import load_model

    return load_model(model_cfg("tiny-flux"), cache_dir)


def test_a_worked_example_of_the_official_loss():
    """One sample, four latent elements, beta 0.1 at t = 0.5: the numbers worked out from train_nft_sd3.py."""
    rewards = torch.tensor([0.2, 0.5, 0.8, 0.5], dtype=torch.float64)
    r = optimality(group_advantages(rewards, ["p"] * 4, True, 5.0), 5.0)
    assert r.tolist() == pytest.approx([0.35864528, 0.5, 0.64135472, 0.5], abs=1e-8)
    x0 = torch.tensor([[1.0, -1.0, 0.5, 0.0]], dtype=torch.float64)
    eps = torch.tensor([[0.0, 1.0, -1.0, 2.0]], dtype=torch.float64)
    v_old = torch.tensor([[-0.5, 2.0, -1.0, 1.5]], dtype=torch.float64)
    v_theta = torch.tensor([[-1.0, 1.5, -2.0, 2.5]], dtype=torch.float64, requires_grad=True)
    v_ref = torch.tensor([[-0.8, 1.8, -1.2, 1.9]], dtype=torch.float64)
    t = torch.tensor([0.5], dtype=torch.float64)
    x_t = (1 - t) * x0 + t * eps
    v_plus, v_minus = implicit_policies(v_theta, v_old, 0.1)
    assert v_plus[0].tolist() == pytest.approx([-0.55, 1.95, -1.10, 1.60]) and v_minus[0].tolist() == pytest.approx([-0.45, 2.05, -0.90, 1.40])
    positive = branch_loss(v_plus, x_t, x0, eps, t, adaptive=True)
    negative = branch_loss(v_minus, x_t, x0, eps, t, adaptive=True)
    assert float(positive) == pytest.approx(0.20192308, abs=1e-8) and float(negative) == pytest.approx(0.28472222, abs=1e-8)
    policy = (r[2] * positive / 0.1 + (1 - r[2]) * negative / 0.1) * 5
    kl = ((v_theta - v_ref) ** 2).mean()
    loss = policy + 1e-4 * kl
    assert float(policy) == pytest.approx(11.58092997, abs=1e-7) and float(kl) == pytest.approx(0.2825) and float(loss) == pytest.approx(11.58095822, abs=1e-7)
    (grad,) = torch.autograd.grad(loss.sum(), v_theta)
    assert grad.flatten().tolist() == pytest.approx([0.5621, -0.1732, 0.3889, -0.3889], abs=1e-4)
    # the paper's branch is the velocity error itself; the code's equals t mean((v - u)^2) / mean|v - u|
    u = eps - x0
    assert float(branch_loss(v_plus, x_t, x0, eps, t, adaptive=False)) == pytest.approx(float(((v_plus - u) ** 2).mean()))
    assert float(positive) == pytest.approx(float(0.5 * ((v_plus - u) ** 2).mean() / (v_plus - u).abs().mean()))


def official_loss(method, model, old_model, batch, units, k: int, timesteps, noise, adaptive_code: bool):
    """train_nft_sd3.py's loss written out unit by unit (or the paper's objective, by the spec): r from the
    per-prompt mean over the round's population std, x_t = (1 - t) x0 + t eps, the old, current and base
    velocities, the two implicit policies, and the mean over units."""
    spec = method.spec
    s = spec.samples_per_prompt
    prompts = [PROMPTS[int(i)] for i in batch["prompt_index"] for _ in range(s)]
    flat = batch["rewards"].flatten().numpy()
    adv = np.empty_like(flat)
    for p in set(prompts):
        rows = np.array([q == p for q in prompts])
        adv[rows] = (flat[rows] - flat[rows].mean()) / (np.std(flat) + 1e-4)
    r_all = np.clip(np.clip(adv, -spec.adv_clip_max, spec.adv_clip_max) / spec.adv_clip_max / 2 + 0.5, 0, 1)
    latents = batch["latents"].flatten(0, 1)
    total = 0.0
    for u in range(len(units)):
        j = int(units[u]) // k  # the unit's sample
        x0, eps = latents[j : j + 1].double(), noise[u : u + 1]
        t = float(timesteps[u]) / 1000
        x_t = (1 - t) * x0 + t * eps
        cond = model.encode_prompts([prompts[j]], 1.0)
        ts = torch.tensor([float(timesteps[u])], dtype=torch.float64)
        with torch.no_grad():
            v_old = old_model.denoise(x_t, ts, cond)
        v = model.denoise(x_t, ts, cond)
        beta, r = spec.beta, float(r_all[j])
        v_pos, v_neg = beta * v + (1 - beta) * v_old, (1 + beta) * v_old - beta * v
        if adaptive_code:
            def branch(v_b):
                x0_b = x_t - t * v_b
                weight = torch.abs(x0_b - x0).mean().clamp(min=1e-5).detach()
                return ((x0_b - x0) ** 2 / weight).mean()

            policy = (r * branch(v_pos) / beta + (1 - r) * branch(v_neg) / beta) * spec.adv_clip_max
        else:
            target = eps - x0
            policy = r * ((v_pos - target) ** 2).mean() + (1 - r) * ((v_neg - target) ** 2).mean()
        kl = 0.0
        if spec.kl_weight:
            model.unet.disable_adapters()
            with torch.no_grad():
                v_ref = model.denoise(x_t, ts, cond)
            model.unet.enable_adapters()
            kl = ((v - v_ref) ** 2).mean()
        total = total + policy + spec.kl_weight * kl
    return total / len(units)



@pytest.mark.parametrize("preset", ["diffusion-nft", "diffusion-nft-paper"])
def test_the_loss_is_the_written_out_expression(preset, flux, tmp_path):
    """Values and LoRA gradients of one micro-batch equal the official expression written out unit by
    unit, with the trained weights moved off the old policy's (a noise on the LoRA weights)."""
    from bench.config import compose, to_dict

    spec = to_dict(compose([f"method={preset}"]))["method"]
    keys = ("beta", "adv_clip_max", "adaptive_weight", "policy_scale", "kl_weight", "timestep_fraction", "old_decay_rate", "old_decay_max")
    method = DiffusionNFT({**{k: spec[k] for k in keys}, "samples_per_prompt": 3, "prompts_per_round": 2, "beta": 0.5, "epochs_per_round": 1, "seed": 0, "reward": "brightness"})
    model, params = with_lora(flux, torch.float64)
    nudge(params, 0.1, seed=1)  # LoRA's B starts at zero: give the old policy weights of its own first
    old_model = copy.deepcopy(model)  # the old policy, as the official code's second adapter: the weights at the start
    ctx = TrainContext(model, PROMPTS, Brightness(), 0, torch.device("cpu"), 6, progress=False, rounds=RoundStore(tmp_path / "rounds"))
    data = method.prepare(ctx)
    data.get(ctx, 0)  # the round, sampled by the old policy (here equal to the trained weights)
    nudge(params, 0.1)
    r, batch, units = method.next_units(ctx.at(0), data)
    k = method.trained_steps(ctx)
    timesteps = method.unit_timesteps(ctx, r, units // k, units % k)
    assert len(set(timesteps.tolist())) > 1 and set(timesteps.tolist()) <= set(model.timesteps())
    gen_seed = 7
    ours, logs = method.loss(ctx.at(0), data, torch.Generator().manual_seed(gen_seed))
    ours_grads = torch.autograd.grad(ours, params)
    noise = torch.randn((len(units), *model.latent_shape()), generator=torch.Generator().manual_seed(gen_seed), dtype=torch.float64)
    theirs = official_loss(method, model, old_model, batch, units, k, timesteps, noise, spec["adaptive_weight"])
    their_grads = torch.autograd.grad(theirs, params)
    assert float(ours) == pytest.approx(float(theirs), rel=1e-9)
    for a, b in zip(ours_grads, their_grads):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-12)
    assert ("kl" in logs) == (preset == "diffusion-nft") and 0 < logs["r_mean"] < 1
    assert k == (3 if spec["timestep_fraction"] < 1 else 4)


def test_the_old_policy_is_a_slow_copy_updated_once_a_round(flux, tmp_path, monkeypatch):
    """theta_old <- eta theta_old + (1 - eta) theta with eta = min(0.001 x optimizer steps, 0.5), once per
    round reached; checkpointed with the method and restored."""
    model, params = with_lora(flux)
    method = DiffusionNFT({"samples_per_prompt": 2, "prompts_per_round": 2, "epochs_per_round": 1, "seed": 0, "reward": "brightness", "old_decay_rate": 0.2, "old_decay_max": 0.5})
    ctx = TrainContext(model, PROMPTS, Brightness(), 0, torch.device("cpu"), 3, progress=False, rounds=RoundStore(tmp_path / "rounds"))
    method.prepare(ctx)
    assert method.steps_per_round(ctx) == 4  # 2 prompts x 2 samples x 3 timesteps in micro-batches of 3
    start = [w.clone() for w in method.old.weights.values()]
    with torch.no_grad():
        for p in params:
            p.add_(1.0)
    method.follow(ctx, 1)  # eta = min(0.2 x 4, 0.5) = 0.5
    assert all(torch.allclose(w, 0.5 * s + 0.5 * p) for w, s, p in zip(method.old.weights.values(), start, params))
    old = [w.clone() for w in method.old.weights.values()]
    with method.old.swapped_in():
        assert all(torch.equal(p, w) for p, w in zip(params, old))
    assert all(torch.allclose(p, s + 1) for p, s in zip(params, start))  # swapped back
    sampled_by = []
    real = FinalSamples.sample_chunk
    monkeypatch.setattr(FinalSamples, "sample_chunk", lambda self, *a: (sampled_by.append(method.old.round), real(self, *a))[1])
    method.loss(ctx.at(8), method.rounds(ctx), torch.Generator())  # step 8 is round 2's first: the old policy moves on, then samples it
    assert sampled_by == [2] and method.old.round == 2
    saved = method.extra_state()
    again = DiffusionNFT({"samples_per_prompt": 2, "prompts_per_round": 2, "epochs_per_round": 1, "seed": 0, "reward": "brightness"})
    again.old = SlowCopy(model.unet)
    again.load_extra_state(saved)
    assert again.old.round == 2 and all(torch.equal(a, b) for a, b in zip(again.old.weights.values(), method.old.weights.values()))


def test_one_step_lowers_the_contrastive_loss(flux, tmp_path):
    model, params = with_lora(flux)
    method = DiffusionNFT({"samples_per_prompt": 4, "prompts_per_round": 2, "epochs_per_round": 1, "seed": 0, "reward": "brightness", "kl_weight": 0.0})
    ctx = TrainContext(model, PROMPTS, Brightness(), 0, torch.device("cpu"), 24, progress=False, rounds=RoundStore(tmp_path / "rounds"))
    data = method.prepare(ctx)
    before, _ = method.loss(ctx.at(0), data, torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(params, lr=1e-3)
    before.backward()
    opt.step()
    with torch.no_grad():
        after, _ = method.loss(ctx.at(0), data, torch.Generator().manual_seed(0))
    assert float(after) < float(before)


def test_diffusion_nft_runs_on_micro_and_refuses_an_epsilon_model(cli):
    code, out, err = cli("run", "suite=micro", "model=tiny-flux", "method=diffusion-nft", "suite.limit=1", "train.steps=2", "train.batch_size=4",
                         "train.grad_accum=1", "method.prompts_per_round=2", "method.samples_per_prompt=2")
    assert code == 0, err
    assert "micro / tiny-flux / diffusion-nft vs" in out and "world-pick" in out
    code, out, err = cli("run", "suite=micro", "model=tiny", "method=diffusion-nft", "suite.limit=1", "train.steps=1")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "needs a flow model" in err


def test_a_killed_run_resumes_with_its_old_policy_to_the_same_weights(cli, cache_dir, tmp_path, monkeypatch):
    """Killed after its checkpoint at step 2, a run resumes with the old policy it had (checkpointed with
    the method) and ends with the weights of an uninterrupted run."""
    from pathlib import Path

    args = ["suite=micro", "model=tiny-flux", "method=diffusion-nft", "train.steps=4", "train.batch_size=6", "train.grad_accum=1", "train.save_every=2",
            "method.prompts_per_round=1", "method.samples_per_prompt=2", "method.old_decay_rate=0.2"]
    want = uninterrupted_weights(cli, cache_dir, tmp_path, args)
    undo = interrupt_at(monkeypatch, DiffusionNFT, 3)
    code, _, err = cli("train", *args)
    assert code == 130, err
    assert len(list((Path(cache_dir) / "checkpoints").glob("diffusion-nft-*/step-0000002/method.safetensors"))) == 1
    undo()
    code, out, err = cli("train", *args)
    assert code == 0, err
    got = trained_weights(out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
