"""Diffusion-DPO: the loss against the paper's equation by hand, the beta conventions of the two
public codebases, and self-generated pairs (one optimizer step of every pair method: test_preference_methods)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bench.method import TrainContext
from bench.methods.diffusion_dpo import DiffusionDPO, dpo_loss, from_diffusers_beta, to_diffusers_beta
from bench.methods.preference_data import best_worst_pairs
from bench.metrics.weightfree import Brightness

# Per-sample squared errors for two pairs: model (w, l) and reference (w, l).
MW, ML, RW, RL = [0.30, 0.50], [0.40, 0.45], [0.35, 0.45], [0.40, 0.40]


def test_loss_equals_the_equation_by_hand():
    beta = 5000.0
    losses, margin = dpo_loss(*(torch.tensor(v, dtype=torch.float64) for v in (MW, ML, RW, RL)), beta)
    for i in range(2):
        d_theta, d_ref = MW[i] - ML[i], RW[i] - RL[i]
        inside = -0.5 * beta * (d_theta - d_ref)
        assert losses[i].item() == pytest.approx(-math.log(1 / (1 + math.exp(-inside))), rel=1e-12)
        assert margin[i].item() == pytest.approx(-(d_theta - d_ref), abs=1e-15)
    # pair 0: d_theta = -0.10, d_ref = -0.05 -> the model prefers the winner more than the reference
    assert margin[0].item() == pytest.approx(0.05) and losses[0].item() < math.log(2)
    assert margin[1].item() == pytest.approx(0.0) and losses[1].item() == pytest.approx(math.log(2))


def test_salesforce_and_diffusers_conventions_agree():
    model_w, model_l, ref_w, ref_l = (torch.tensor(v, dtype=torch.float64) / 1000 for v in (MW, ML, RW, RL))
    ours, _ = dpo_loss(model_w, model_l, ref_w, ref_l, beta=5000)
    # diffusers train_diffusion_dpo.py: logits = ref_diff - model_diff; loss = -logsigmoid(beta_dpo * logits), beta_dpo 2500
    diffusers = -torch.nn.functional.logsigmoid(2500 * ((ref_w - ref_l) - (model_w - model_l)))
    assert torch.allclose(ours, diffusers, rtol=0, atol=1e-15)
    assert from_diffusers_beta(2500) == 5000 and to_diffusers_beta(5000) == 2500
    assert DiffusionDPO({"beta": 2500, "beta_convention": "diffusers"}).beta() == 5000
    assert DiffusionDPO({"beta": 5000, "beta_convention": "salesforce"}).beta() == 5000
    with pytest.raises(ValueError, match="beta_convention"):
        DiffusionDPO({"beta": 1, "beta_convention": "paper"}).beta()


def test_pairs_are_best_and_worst_of_k(loaded):
    model = copy.deepcopy(loaded).to(dtype=torch.float32)
    prompts = ["a red apple", "a dark forest"]
    ctx = TrainContext(model, prompts, Brightness(), 0, torch.device("cpu"), 2, progress=False)
    pairs = best_worst_pairs(ctx, k=4, seed=0)
    assert pairs["latents_w"].shape == pairs["latents_l"].shape == (2, 4, 8, 8)
    assert (pairs["reward_w"] > pairs["reward_l"]).all() and int(pairs["ties_dropped"]) == 0
    # The winner's reward is the best of the K rewards computed again here.
    from bench.generate import image_seed

    for p, prompt in enumerate(prompts):
        gens = [torch.Generator().manual_seed(image_seed("train-candidates", p, i, 0)) for i in range(4)]
        with torch.no_grad():
            rewards = ctx.rewards(model.sample([prompt] * 4, gens), [prompt] * 4)
        assert pairs["reward_w"][p] == rewards.max() and pairs["reward_l"][p] == rewards.min()


@pytest.mark.slow  # a full run (about 25 s); tests/test_preference_training.py trains diffusion-dpo through the CLI by default
def test_bench_run_diffusion_dpo_end_to_end(cli, tmp_path):
    code, out, err = cli("run", "suite=smoke", "method=diffusion-dpo", "suite.limit=4", "train.steps=6", "method.samples_per_prompt=3")
    assert code == 0, err
    assert "smoke / tiny / diffusion-dpo vs smoke-tiny-base-" in out
    (run,) = (tmp_path / "runs").glob("smoke-tiny-diffusion-dpo-*")
    import json

    summary = json.loads((run / "summary.json").read_text())
    assert set(summary["winrate"]) == {"brightness", "colorfulness", "jpeg_compressibility", "contrast"}
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["config"]["method"]["beta"] == 5000 and manifest["config"]["method"]["reward"] == "brightness"
