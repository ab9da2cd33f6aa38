"""Offline preference methods: every loss against its paper's equation computed by hand on small
tensors, and one optimizer step of each method raising the implicit reward margin on the tiny model."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bench.method import TrainContext
from bench.methods.diffusion_dpo import DiffusionDPO, implicit_margin
from bench.methods.diffusion_kto import DiffusionKTO, kto_loss
from bench.methods.dspo import DSPO, dspo_sd15_loss, dspo_sdxl_loss
from bench.methods.mapo import MaPO, mapo_loss
from bench.methods.preference_data import MemoryPairs, Pairs, Predictions, drop_prompts, predict_pairs
from bench.methods.pso_offline import OfflinePSO, pso_offline_loss
from bench.models.diffusion import trained_timesteps
from bench.methods.sft import SFT

sig = lambda x: 1 / (1 + math.exp(-x))


def fixed_predictions():
    """Two pairs of 2-element 'latents' with known noise, model and reference predictions."""
    noise = torch.tensor([[0.5, -1.0], [1.0, 0.0]], dtype=torch.float64)
    win = Predictions(noise, torch.tensor([[0.7, -0.6], [0.8, 0.3]], dtype=torch.float64), torch.tensor([[0.4, -0.9], [1.1, 0.1]], dtype=torch.float64), torch.zeros(2))
    lose = Predictions(noise, torch.tensor([[0.1, -1.2], [1.5, -0.5]], dtype=torch.float64), torch.tensor([[0.3, -1.4], [1.2, -0.2]], dtype=torch.float64), torch.zeros(2))
    return win, lose


def mse(a, b):
    return sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)


# ---- DSPO --------------------------------------------------------------------------------------
def test_dspo_sd15_equals_eq13_by_hand():
    win, lose = fixed_predictions()
    lam = 0.7
    losses, gap = dspo_sd15_loss(win, lose, lam)
    for i in range(2):
        eps, pw, rw, pl, rl = (x[i].tolist() for x in (win.target, win.pred, win.ref, lose.pred, lose.ref))
        r_gap = -(lam / 2) * ((mse(pw, eps) - mse(pl, eps)) - (mse(rw, eps) - mse(rl, eps)))
        w = 1 - sig(r_gap)
        residual = [(p - e) - lam * w * (p - r) for p, e, r in zip(pw, eps, rw)]
        assert gap[i].item() == pytest.approx(r_gap, rel=1e-12)
        assert losses[i].item() == pytest.approx(sum(v * v for v in residual) / 2, rel=1e-12)


def test_dspo_sd15_limits():
    win, lose = fixed_predictions()
    # lambda -> 0: the epsilon loss on the preferred image alone (SFT on winners)
    losses, _ = dspo_sd15_loss(win, lose, 0.0)
    assert losses.tolist() == pytest.approx(((win.pred - win.target) ** 2).mean(1).tolist(), rel=1e-12)
    # theta = theta_ref (start of training): no shift, whatever lambda
    at_init = Predictions(win.target, win.ref, win.ref, win.t)
    losses, _ = dspo_sd15_loss(at_init, Predictions(lose.target, lose.ref, lose.ref, lose.t), 5.0)
    assert losses.tolist() == pytest.approx(((win.ref - win.target) ** 2).mean(1).tolist(), rel=1e-12)


def test_dspo_sdxl_eq47_and_the_code_gate():
    win, lose = fixed_predictions()
    lam = 3.0
    losses, gap = dspo_sdxl_loss(win, lose, lam, gate=None)
    assert losses.tolist() == pytest.approx([(1 - sig(g)) ** 2 for g in gap.tolist()], rel=1e-12)
    # mean((pred_w - ref_w)^2) = (0.09 + 0.09 + 0.09 + 0.04) / 4 = 0.0775: under a 0.1 gate, Eq. 47 still
    assert torch.equal(dspo_sdxl_loss(win, lose, lam, gate=0.1)[0], losses)
    # above the gate the official code trains ((1 - sigmoid) * (pred_w - ref_w))^2 instead
    gated, _ = dspo_sdxl_loss(win, lose, lam, gate=0.05)
    shift = (win.pred - win.ref).tolist()
    want = [sum(((1 - sig(g)) * s) ** 2 for s in row) / 2 for g, row in zip(gap.tolist(), shift)]
    assert gated.tolist() == pytest.approx(want, rel=1e-12)


# ---- offline PSO -------------------------------------------------------------------------------
def test_pso_offline_equals_eq6_by_hand():
    # (pairs, trained steps): errors of the model and the pre-trained model on target and reference
    err_tau = torch.tensor([[0.30, 0.20, 0.10], [0.50, 0.40, 0.30]], dtype=torch.float64)
    pre_tau = torch.tensor([[0.31, 0.22, 0.10], [0.45, 0.40, 0.30]], dtype=torch.float64)
    err_rho = torch.tensor([[0.40, 0.30, 0.20], [0.20, 0.20, 0.20]], dtype=torch.float64)
    pre_rho = torch.tensor([[0.38, 0.30, 0.19], [0.20, 0.25, 0.20]], dtype=torch.float64)
    beta = 50.0
    losses, margin = pso_offline_loss(err_tau, pre_tau, err_rho, pre_rho, beta)
    for i in range(2):
        m = sum((err_tau[i, n] - pre_tau[i, n]) - (err_rho[i, n] - pre_rho[i, n]) for n in range(3)).item()
        assert losses[i].item() == pytest.approx(-math.log(sig(-beta * m)), rel=1e-12)
        assert margin[i].item() == pytest.approx(-m, rel=1e-12)
    assert margin[0].item() == pytest.approx(0.06) and margin[1].item() == pytest.approx(-0.10)


def test_pso_trains_only_the_stochastic_steps():
    assert trained_timesteps([999, 749, 499, 249]) == [999, 749, 499]
    assert trained_timesteps([999, 499]) == [999]
    with pytest.raises(ValueError, match="gen.steps=1"):
        trained_timesteps([999])


# ---- Diffusion-KTO -----------------------------------------------------------------------------
def test_kto_equals_the_official_formula_by_hand():
    model_err = torch.tensor([0.20, 0.35, 0.50, 0.10], dtype=torch.float64)
    ref_err = torch.tensor([0.21, 0.30, 0.52, 0.10], dtype=torch.float64)
    desirable = torch.tensor([True, False, True, False])
    beta, lam_d, lam_u = 100.0, 1.0, 2.0
    losses, g = kto_loss(model_err, ref_err, desirable, beta, lam_d, lam_u)
    gs = [-(m - r) for m, r in zip(model_err.tolist(), ref_err.tolist())]  # 0.01, -0.05, 0.02, 0
    z = max(0.0, sum(gs) / 4)  # mean is -0.005 -> clamped to 0
    assert z == 0.0
    for i in range(4):
        y = desirable[i].item()
        h = sig((1 if y else -1) * beta * (gs[i] - z))
        assert losses[i].item() == pytest.approx((lam_d if y else lam_u) * (1 - h), rel=1e-12)
    # a positive batch mean becomes the reference point
    losses2, _ = kto_loss(model_err - 0.1, ref_err, desirable, beta)
    z2 = sum(g + 0.1 for g in gs) / 4
    assert losses2[0].item() == pytest.approx(1 - sig(beta * (gs[0] + 0.1 - z2)), rel=1e-12)


# ---- MaPO --------------------------------------------------------------------------------------
def test_mapo_equals_the_official_formula_by_hand():
    err_w = torch.tensor([0.20, 0.60], dtype=torch.float64)
    err_l = torch.tensor([0.25, 0.50], dtype=torch.float64)
    beta, s, T = 0.1, 0.5, 1000
    losses, log_odds = mapo_loss(err_w, err_l, beta, s, T)
    for i in range(2):
        lw, ll = err_w[i].item(), err_l[i].item()
        lo = s * lw / (math.exp(s * lw) - 1) - s * ll / (math.exp(s * ll) - 1)
        assert log_odds[i].item() == pytest.approx(lo, rel=1e-10)
        assert losses[i].item() == pytest.approx(lw - beta * math.log(sig(T * lo)), rel=1e-10)
    assert log_odds[0] > 0 > log_odds[1]  # lower error on the preferred image -> positive margin


def test_prompt_dropout_rate_and_determinism():
    prompts = [f"p{i}" for i in range(2000)]
    dropped = drop_prompts(prompts, 0.2, torch.Generator().manual_seed(0))
    assert dropped == drop_prompts(prompts, 0.2, torch.Generator().manual_seed(0))
    assert 0.17 < sum(p == "" for p in dropped) / 2000 < 0.23
    assert all(d in ("", p) for d, p in zip(dropped, prompts))
    assert drop_prompts(prompts[:5], 0.0, torch.Generator()) == prompts[:5]


# ---- one optimizer step on the tiny model ------------------------------------------------------
BASE = {"samples_per_prompt": 2, "reward": None, "seed": 0, "drop_ties": True, "prompt_dropout": 0.0}
METHODS = {
    "diffusion-dpo": (DiffusionDPO, {"beta": 5000}),
    "dspo-sd15": (DSPO, {"form": "sd15", "lam": 0.001, "share_noise": True}),
    "dspo-sdxl": (DSPO, {"form": "sdxl", "lam": 5000, "sdxl_gate": 0.1, "share_noise": True}),
    "pso-offline": (OfflinePSO, {"beta": 50, "reduction": "mean", "share_noise": True}),
    "diffusion-kto": (DiffusionKTO, {"beta": 1000, "lambda_d": 1.0, "lambda_u": 1.0, "positive_ratio": 0.5}),
    "mapo": (MaPO, {"beta": 0.1, "snr_value": 0.5}),
    "sft": (SFT, {"timesteps": "uniform"}),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_training_raises_the_implicit_reward_margin(name, fewstep_lora):
    model = copy.deepcopy(fewstep_lora).to(dtype=torch.float32)
    cls, cfg = METHODS[name]
    method = cls({**BASE, **cfg})
    g = torch.Generator().manual_seed(3)
    n = 8
    # Preferred latents share a structure (a fixed pattern) that dispreferred ones lack, so what the
    # model learns about the preferred images carries over to fresh noise draws, as with real data.
    pattern = torch.randn(1, 4, 8, 8, generator=g)
    data = {
        "latents_w": pattern + 0.3 * torch.randn(n, 4, 8, 8, generator=g),
        "latents_l": torch.randn(n, 4, 8, 8, generator=g),
        "prompt_index": torch.arange(n),
        "ties_dropped": torch.tensor(0),
    }
    prompts = ["a red apple", "a boat", "a dog", "a city", "a tree", "a cup", "a car", "a bird"]
    ctx = TrainContext(model, prompts, None, 0, torch.device("cpu"), n, progress=False)
    pairs = MemoryPairs(data, prompts).sample(ctx, torch.Generator().manual_seed(0))
    # the margin at the timesteps the method trains on: the sampler's stochastic steps for PSO
    steps = trained_timesteps(model.timesteps()) if name == "pso-offline" else [100, 300, 500, 700, 900]
    batch = Pairs(pairs.x_w.repeat(len(steps), 1, 1, 1), pairs.x_l.repeat(len(steps), 1, 1, 1), pairs.prompts * len(steps))
    t = torch.tensor(steps).repeat_interleave(n)

    def margin():
        with torch.no_grad():
            win, lose = predict_pairs(ctx, batch, torch.Generator().manual_seed(11), t=t)
            (mw, rw), (ml, rl) = win.errors(), lose.errors()
            return implicit_margin(mw, ml, rw, rl).mean()

    assert margin() == 0  # LoRA B starts at zero: the model is its reference
    params = [p for p in model.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    for step in range(5):  # KTO's batch reference point makes its first steps move the pair margin least
        loss, _ = method.loss(ctx, data, torch.Generator().manual_seed(5 + step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = margin()
    assert after > 0, (name, float(after))
