"""Online PSO (Eq. 7): the loss and the trajectory log-likelihood ratio by hand, rounds sampled
from the current model and kept for resume, and one optimizer step raising the margin."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from bench.method import RoundStore, TrainContext
from bench.methods.pso_online import OnlinePSO, pso_online_loss, trajectory_logratio
from bench.metrics.weightfree import Brightness

PROMPTS = ["a red apple", "a dark forest", "a white boat", "a small bird"]
CFG = {"beta": 5.0, "prompts_per_round": 4, "epochs_per_round": 1, "reward": "brightness", "seed": 0}


def test_loss_equals_eq7_by_hand():
    tau = torch.tensor([0.3, -0.2], dtype=torch.float64)
    rho = torch.tensor([0.1, 0.4], dtype=torch.float64)
    losses, margin = pso_online_loss(tau, rho, 5.0)
    for i in range(2):
        m = tau[i].item() - rho[i].item()
        assert margin[i].item() == pytest.approx(m)
        assert losses[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-5.0 * m))), rel=1e-12)


def perturbed(model, scale: float = 0.05):
    """A copy whose LoRA B matrices are non-zero, so the model differs from its reference."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def test_trajectory_logratio_equals_the_gaussian_closed_form(fewstep_lora):
    model = perturbed(fewstep_lora)
    ctx = TrainContext(model, PROMPTS, None, 0, torch.device("cpu"), 2, progress=False)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    with torch.no_grad():
        _, states, _ = model.sample(PROMPTS[:2], gens, trajectory=True)
        got = trajectory_logratio(ctx, torch.stack(states, 1), PROMPTS[:2])
    steps = model.timesteps()  # 999, 749, 499, 249: the transitions out of 999, 749 and 499 are trained
    cond = model.encode_prompts(PROMPTS[:2])
    want = torch.zeros(2, dtype=torch.float64)
    with torch.no_grad():
        for i in range(3):
            x_t, x_prev, t, a_prev = states[i], states[i + 1], steps[i], model.alpha(steps[i + 1])
            mu = {}
            for which in ("theta", "pre"):
                if which == "pre":
                    model.unet.disable_adapters()
                eps = model.unet(x_t, torch.tensor([t, t]), encoder_hidden_states=cond.hidden).sample
                model.unet.enable_adapters()
                x0 = (x_t - math.sqrt(1 - model.alpha(t)) * eps) / math.sqrt(model.alpha(t))
                # LCMScheduler: N(sqrt(a_prev) (c_out x0_hat + c_skip x_t), (1 - a_prev) I), sigma_data 0.5, timestep scaling 10
                c_skip, c_out = 0.25 / ((10 * t) ** 2 + 0.25), 10 * t / math.sqrt((10 * t) ** 2 + 0.25)
                mu[which] = math.sqrt(a_prev) * (c_out * x0 + c_skip * x_t)
            sq = lambda m: ((x_prev - m) ** 2).flatten(1).sum(1)
            want += -(sq(mu["theta"]) - sq(mu["pre"])) / (2 * (1 - a_prev))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert float(want.abs().min()) > 1e-3


def test_round_pairs_are_reward_ordered_and_kept(fewstep_lora, tmp_path):
    model = copy.deepcopy(fewstep_lora)
    ctx = TrainContext(model, PROMPTS, Brightness(), 0, torch.device("cpu"), 2, progress=False, rounds=RoundStore(tmp_path / "rounds"))
    method = OnlinePSO(CFG)
    pairs = method.round_pairs(ctx, 0)
    assert pairs["states_tau"].shape == (4, 5, 4, 8, 8) and (pairs["reward_tau"] >= pairs["reward_rho"]).all()
    assert (pairs["reward_tau"] > pairs["reward_rho"]).any()
    # the stored target's final state decodes to the reward recorded for it
    with torch.no_grad():
        again = ctx.rewards(pairs["states_tau"][:, -1].double(), [PROMPTS[int(i)] for i in pairs["prompt_index"]])
    torch.testing.assert_close(again, pairs["reward_tau"], rtol=0, atol=1e-6)
    # the recorded sampler log-probabilities are the model's own, and the states follow the sampler
    from bench.methods.online import transition_log_probs

    raw = method.rounds(ctx).get(ctx, 0)
    prompts = [PROMPTS[int(i)] for i in raw["prompt_index"] for _ in range(2)]
    states = raw["states"].flatten(0, 1).double()
    with torch.no_grad():
        lp = transition_log_probs(ctx, states[:, 1], states[:, 2], 1, prompts)
    torch.testing.assert_close(lp, raw["log_probs"].flatten(0, 1)[:, 1], rtol=1e-6, atol=1e-6)
    assert (tmp_path / "rounds" / "round-000000.safetensors").exists()
    # read back, not resampled, even after the weights change
    perturbed_ctx = TrainContext(perturbed(fewstep_lora), PROMPTS, Brightness(), 0, torch.device("cpu"), 2, progress=False, rounds=RoundStore(tmp_path / "rounds"))
    assert all(torch.equal(pairs[k], v) for k, v in method.round_pairs(perturbed_ctx, 0).items())
    other = method.round_pairs(perturbed_ctx, 1)
    assert not torch.equal(other["states_tau"], pairs["states_tau"])


def test_one_step_raises_the_trajectory_margin(fewstep_lora, tmp_path):
    model = copy.deepcopy(fewstep_lora).to(dtype=torch.float32)
    ctx = TrainContext(model, PROMPTS, Brightness(), 0, torch.device("cpu"), 4, progress=False, rounds=RoundStore(tmp_path / "rounds"))
    method = OnlinePSO(CFG)
    pairs = method.round_pairs(ctx, 0)
    prompts = [PROMPTS[int(i)] for i in pairs["prompt_index"]]

    def margin():
        with torch.no_grad():
            states = torch.cat([pairs["states_tau"], pairs["states_rho"]]).float()
            tau, rho = trajectory_logratio(ctx, states, prompts * 2).chunk(2)
            return (tau - rho).mean()

    assert margin() == 0
    params = [p for p in model.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    loss, logs = method.loss(ctx, {}, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6) and logs["round"] == 0
    loss.backward()
    opt.step()
    assert margin() > 0


def test_bench_run_pso_online_end_to_end(cli):
    args = ["suite=smoke", "model=tiny-fewstep", "method=pso-online", "train.steps=6", "train.batch_size=2", "method.prompts_per_round=4",
            "train.save_every=4", "suite.limit=2"]
    code, out, err = cli("train", *args)
    assert code == 0, err
    ckpt = Path(out.split("checkpoint: ")[1].strip())
    meta = json.loads((ckpt / "train.json").read_text())
    assert meta["data"] == {"source": "online", "rounds": 3, "prompts_per_round": 4, "samples_per_prompt": 2}  # 2 steps per round
    # rounds before the last checkpoint's (step 4: round 2) are deleted as soon as they cannot be needed
    assert sorted(p.name for p in (ckpt.parent / "rounds").iterdir()) == ["round-000002.safetensors"]
    code, out1, err = cli("train", *args, "gen.steps=1")
    assert code == 0 and out1 == out, err  # training uses the model's own 4 steps: gen.steps=1 reuses the checkpoint


# ---- generic PSO (Eq. 5): forward-noised target, reference sampled from the tuned model ----------
def test_generic_pso_loss_by_hand():
    from bench.methods.pso import pso_loss

    gap = torch.tensor([0.02, -0.01], dtype=torch.float64)  # target: model error minus pre-trained error
    lr_rho = torch.tensor([0.03, -0.05], dtype=torch.float64)  # reference: log p_theta - log p_pre
    losses, margin = pso_loss(gap, lr_rho, 5.0)
    for i in range(2):
        m = gap[i].item() + lr_rho[i].item()
        assert losses[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(5.0 * m))), rel=1e-12)
        assert margin[i].item() == pytest.approx(-m)


def test_generic_pso_step_raises_its_margin(fewstep_lora):
    from bench.methods.preference_data import MemoryPairs, draw_noise, predict
    from bench.methods.pso import PSO

    model = copy.deepcopy(fewstep_lora).to(dtype=torch.float32)
    ctx = TrainContext(model, PROMPTS, None, 0, torch.device("cpu"), 4, progress=False)
    g = torch.Generator().manual_seed(3)
    pattern = torch.randn(1, 4, 8, 8, generator=g)
    data = {"latents_w": pattern + 0.3 * torch.randn(4, 4, 8, 8, generator=g), "latents_l": torch.zeros(4, 4, 8, 8),
            "prompt_index": torch.arange(4), "ties_dropped": torch.tensor(0)}
    method = PSO({"beta": 5.0, "reduction": "sum", "samples_per_prompt": 2, "reward": None, "seed": 0, "drop_ties": True, "prompt_dropout": 0.0})
    with torch.no_grad():  # a fixed reference trajectory and fixed target noise to measure -M on
        _, states, _ = model.sample(PROMPTS, [torch.Generator().manual_seed(i) for i in range(4)], trajectory=True)
    states = torch.stack(states, 1)
    steps = model.timesteps()[:3]
    x0 = data["latents_w"].repeat_interleave(3, 0)
    noise = draw_noise(x0.shape, torch.Generator().manual_seed(9), ctx)

    def margin():
        with torch.no_grad():
            out = predict(ctx, x0, [p for p in PROMPTS for _ in range(3)], torch.tensor(steps).repeat(4), noise)
            err, pre = out.errors("sum")
            return (-((err - pre).reshape(4, 3).sum(1) + trajectory_logratio(ctx, states, PROMPTS))).mean()

    assert margin() == 0
    opt = torch.optim.AdamW([p for p in model.unet.parameters() if p.requires_grad], lr=1e-3)
    loss, _ = method.loss(ctx, data, torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6)
    loss.backward()
    opt.step()
    assert margin() > 0
    assert MemoryPairs(data, PROMPTS).manifest()["pairs"] == 4
