"""Direct reward back-propagation (DRaFT-K, ReFL): the loss and its gradient against a hand-written
rollout, the reward's differentiability checked up front, and training raising the reward."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bench.errors import UsageError
from bench.method import RoundStore, TrainContext
from bench.methods.reward_backprop import RewardBackprop
from bench.metrics.weightfree import Brightness, JpegCompressibility

from test_pso_online import PROMPTS, perturbed

CFG = {"name": "draft", "mode": "draft", "k": 1, "refl_last_steps": None, "margin": None, "grad_scale": 1.0}


def context(model, reward=None):
    return TrainContext(model, PROMPTS, reward or Brightness(), 0, torch.device("cpu"), 2, progress=False)


def draws(seed: int):
    """The prompts and per-image generators the method draws from a generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    prompts = [PROMPTS[int(i)] for i in torch.randint(0, len(PROMPTS), (2,), generator=g)]
    gens = [torch.Generator().manual_seed(int(s)) for s in torch.randint(0, 2**62, (2,), generator=g)]
    return prompts, gens, g


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.unet.named_parameters() if p.requires_grad and p.grad is not None}


def x0_by_hand(model, x, t, prompts):
    """The LCM sampler's clean estimate at t: c_out x0 + c_skip x_t with x0 = (x_t - sqrt(1 - a_t) eps_theta(x_t, t, c)) / sqrt(a_t),
    c_skip = 0.25 / ((10 t)^2 + 0.25), c_out = 10 t / sqrt((10 t)^2 + 0.25) (LCMScheduler's boundary condition)."""
    eps = model.unet(x, torch.tensor([t] * x.shape[0]), encoder_hidden_states=model.encode_prompts(prompts).hidden).sample
    a = model.alpha(t)
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    return 10 * t / math.sqrt((10 * t) ** 2 + 0.25) * x0 + 0.25 / ((10 * t) ** 2 + 0.25) * x


def test_draft_1_differentiates_only_the_last_step(fewstep_lora):
    model = perturbed(fewstep_lora)
    method = RewardBackprop(CFG)
    method.prepare(context(model))
    loss, logs = method.loss(context(model), {}, torch.Generator().manual_seed(5))
    loss.backward()
    got = lora_grads(model)
    model.unet.zero_grad()

    prompts, gens, _ = draws(5)
    with torch.no_grad():
        _, states, _ = model.sample(prompts, gens, trajectory=True)
    x0 = x0_by_hand(model, states[-2], model.timesteps()[-1], prompts)  # the last (deterministic) step, with gradient
    want = -Brightness().score(model.decode(x0).float(), prompts).mean()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-9) and logs["reward"] == pytest.approx(-want.item(), rel=1e-9)
    want_grads = lora_grads(model)
    model.unet.zero_grad()
    assert set(got) == set(want_grads) and len(got) > 0
    assert all(torch.allclose(got[n], want_grads[n], rtol=1e-6, atol=1e-12) for n in got)


def test_refl_scores_the_x0_predicted_at_a_random_step_with_a_margin(fewstep_lora):
    model = copy.deepcopy(perturbed(fewstep_lora))
    method = RewardBackprop({**CFG, "mode": "refl", "margin": 2.0, "grad_scale": 1e-3})
    with torch.no_grad():
        loss, _ = method.loss(context(model), {}, torch.Generator().manual_seed(9))
        prompts, gens, g = draws(9)
        stop = int(torch.randint(0, 4, (), generator=g))  # any of the 4 sampler steps
        _, states, _ = model.sample(prompts, gens, trajectory=True)
        x0 = x0_by_hand(model, states[stop], model.timesteps()[stop], prompts)
        reward = Brightness().score(model.decode(x0).float(), prompts)
    assert loss.item() == pytest.approx(1e-3 * torch.relu(2.0 - reward).mean().item(), rel=1e-9)


def test_a_non_differentiable_reward_is_refused_before_training(fewstep_lora):
    with pytest.raises(UsageError, match="'jpeg_compressibility' is not differentiable"):
        RewardBackprop(CFG).prepare(context(fewstep_lora, JpegCompressibility()))
    with pytest.raises(UsageError, match="unknown method.mode 'ddpo'"):
        RewardBackprop({**CFG, "mode": "ddpo"}).prepare(context(fewstep_lora))


@pytest.mark.parametrize("mode", ["draft", "refl"])
def test_training_raises_the_reward_of_fixed_seed_samples(fewstep_lora, mode):
    model = copy.deepcopy(fewstep_lora)
    method = RewardBackprop({**CFG, "mode": mode})
    ctx = context(model)
    gens = lambda: [torch.Generator().manual_seed(100 + i) for i in range(4)]
    with torch.no_grad():
        before = Brightness().score(model.decode(model.sample(PROMPTS, gens())), PROMPTS).mean().item()
    params = [p for p in model.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3)
    for step in range(10):
        loss, _ = method.loss(ctx, {}, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = Brightness().score(model.decode(model.sample(PROMPTS, gens())), PROMPTS).mean().item()
    assert after > before + 0.01, (before, after)


def test_gors_fits_the_best_sample_of_each_prompt_by_hand(fewstep_lora, tmp_path):
    from bench.methods.gors import GORS

    model = copy.deepcopy(fewstep_lora)
    method = GORS({"prompts_per_round": 4, "samples_per_prompt": 3, "epochs_per_round": 1, "seed": 0, "timesteps": "sampler"})
    ctx = TrainContext(model, PROMPTS, Brightness(), 0, torch.device("cpu"), 2, progress=False, rounds=RoundStore(tmp_path / "rounds"))
    with torch.no_grad():
        loss, logs = method.loss(ctx, {}, torch.Generator().manual_seed(4))
        _, batch, units = method.next_units(ctx)
        best = batch["rewards"][units].argmax(1)
        assert logs["kept_reward"] == pytest.approx(batch["rewards"][units].max(1).values.mean().item())
        x0 = batch["states"][units, best, -1].double()
        prompts = [PROMPTS[int(batch["prompt_index"][int(u)])] for u in units]
        g = torch.Generator().manual_seed(4)
        t = torch.tensor(model.timesteps())[torch.randint(0, 4, (2,), generator=g)]
        eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
        pred = model.unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=model.encode_prompts(prompts).hidden).sample
    assert loss.item() == pytest.approx(((pred.float() - eps.float()) ** 2).mean().item(), rel=1e-6)


@pytest.mark.parametrize("method", ["draft", "refl", "gors"])
def test_reward_methods_end_to_end(cli, method):
    code, out, err = cli("run", "suite=smoke", "model=tiny-fewstep", f"method={method}", "suite.limit=2", "train.steps=2", "train.batch_size=2",
                         *(["method.prompts_per_round=2"] if method == "gors" else []))
    assert code == 0, err
    assert f"smoke / tiny-fewstep / {method} vs" in out
