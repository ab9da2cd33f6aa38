"""Online baselines on the same MDP: D3PO's clipped-ratio DPO and DDPO's PPO loss by hand, one
optimizer step moving each objective the right way, and short runs end to end."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bench.method import RoundStore, TrainContext
from bench.methods.d3po import D3PO, d3po_loss
from bench.methods.ddpo import DDPO, advantages, ppo_loss
from bench.methods.online import transition_log_probs
from bench.metrics.weightfree import Brightness

PROMPTS = ["a red apple", "a dark forest", "a white boat", "a small bird"]
sig = lambda x: 1 / (1 + math.exp(-x))


def test_d3po_loss_by_hand():
    lr0 = torch.tensor([0.05, -0.3, 0.01, 0.02], dtype=torch.float64)
    lr1 = torch.tensor([-0.02, 0.02, 0.5, 0.04], dtype=torch.float64)
    prefer = torch.tensor([1.0, -1.0, 1.0, 0.0])  # the last pair is a reward tie: weight 0
    beta, eps = 2.0, 0.1
    got = d3po_loss(lr0, lr1, prefer, beta, eps)
    for i in range(4):
        clip = lambda v: math.log(min(max(math.exp(v), 1 - eps), 1 + eps))
        h = prefer[i].item()
        want = -math.log(sig(beta * (h * clip(lr0[i].item()) - h * clip(lr1[i].item()))))
        assert got[i].item() == pytest.approx(want, rel=1e-12)
    assert got[3].item() == pytest.approx(math.log(2))
    # a ratio beyond the clip carries no gradient; without a clip (eps None) it does
    x = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)
    d3po_loss(x, torch.zeros(1, dtype=torch.float64), torch.tensor([1.0]), beta, eps).sum().backward()
    assert x.grad.item() == 0
    d3po_loss(x, torch.zeros(1, dtype=torch.float64), torch.tensor([1.0]), beta, None).sum().backward()
    assert x.grad.item() == pytest.approx(-beta * (1 - sig(beta * 0.5)))


def test_ppo_loss_and_advantages_by_hand():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 8.0]], dtype=torch.float64)
    a = advantages(rewards, 5.0)
    assert a[0].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-7)
    m, sd = 6.0, math.sqrt(((5 - 6) ** 2 * 2 + (8 - 6) ** 2) / 2)
    assert a[1].tolist() == pytest.approx([(5 - m) / sd, (5 - m) / sd, (8 - m) / sd], abs=1e-7)
    assert advantages(torch.tensor([[0.0], [100.0]]), 0.5).tolist() == [[-0.5], [0.5]]
    lp = torch.tensor([0.0, 0.3, -0.3], dtype=torch.float64)
    old = torch.zeros(3, dtype=torch.float64)
    adv = torch.tensor([2.0, 1.0, -1.0], dtype=torch.float64)
    got = ppo_loss(lp, old, adv, 0.2)
    want = [max(-A * math.exp(l), -A * min(max(math.exp(l), 0.8), 1.2)) for l, A in zip(lp.tolist(), adv.tolist())]
    assert got.tolist() == pytest.approx(want, rel=1e-12)


def unit_logratios(ctx, batch, ref: bool):
    """log p_theta (minus log p_ref, or log p_old when ref is False) of every (trajectory, step)."""
    states = batch["states"].flatten(0, 1)
    prompts = [PROMPTS[int(i)] for i in batch["prompt_index"] for _ in range(batch["states"].shape[1])]
    out = []
    with torch.no_grad():
        for i in range(states.shape[1] - 2):
            lp = transition_log_probs(ctx, states[:, i], states[:, i + 1], i, prompts)
            if ref:
                with ctx.reference():
                    lp = lp - transition_log_probs(ctx, states[:, i], states[:, i + 1], i, prompts)
            else:
                lp = lp - batch["log_probs"].flatten(0, 1)[:, i]
            out.append(lp)
    return torch.stack(out, 1).reshape(*batch["rewards"].shape, -1)


@pytest.mark.parametrize("name", ["d3po", "ddpo"])
def test_one_step_moves_the_objective(name, fewstep_lora, tmp_path):
    model = copy.deepcopy(fewstep_lora).to(dtype=torch.float32)
    cfg = {"prompts_per_round": 4, "epochs_per_round": 1, "seed": 0, "reward": "brightness"}
    method = D3PO({**cfg, "beta": 1.0, "eps": 0.5}) if name == "d3po" else DDPO({**cfg, "samples_per_prompt": 4, "clip_range": 0.5, "adv_clip_max": 5.0})
    ctx = TrainContext(model, PROMPTS, Brightness(), 0, torch.device("cpu"), 64, progress=False, rounds=RoundStore(tmp_path / "rounds"))
    spr = method.steps_per_round(ctx)
    assert spr == 1  # batch 64 holds the whole round: 4 pairs x 3 steps, or 16 trajectories x 3 steps
    batch = method.rounds(ctx).get(ctx, 0)

    def objective():
        if name == "d3po":  # preferred minus dispreferred log-ratio against the reference
            lr = unit_logratios(ctx, batch, ref=True)
            first = (batch["rewards"][:, 0] > batch["rewards"][:, 1]).double() * 2 - 1
            return (first[:, None] * (lr[:, 0] - lr[:, 1])).mean()
        lr = unit_logratios(ctx, batch, ref=False)  # advantage-weighted log-likelihood over the sampling policy
        return (advantages(batch["rewards"], 5.0)[..., None] * lr).mean()

    assert abs(float(objective())) < 1e-9  # the model is still the reference / sampling policy
    params = [p for p in model.unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    loss, _ = method.loss(ctx, {}, torch.Generator())
    loss.backward()
    opt.step()
    assert objective() > 0


@pytest.mark.parametrize("method", ["d3po", "ddpo"])
def test_online_baselines_end_to_end(cli, method):
    code, out, err = cli("run", "suite=smoke", "model=tiny-fewstep", f"method={method}", "suite.limit=2", "train.steps=3",
                         "train.batch_size=4", "method.prompts_per_round=2")
    assert code == 0, err
    assert f"smoke / tiny-fewstep / {method} vs" in out


def test_micro_batches_accumulate_to_the_batch_they_cut(cli, cache_dir):
    """train.micro_batch_size is memory only: a d3po step over 6 units in two micro-batches of 3 lands where
    one batch of 6 does (to float32 summation), and a size that does not divide the batch is one line."""
    from safetensors.torch import load_file

    args = ["suite=smoke", "model=tiny-fewstep", "method=d3po", "suite.limit=2", "train.steps=2", "train.batch_size=6", "method.prompts_per_round=2"]
    finals = []
    for extra in ([], ["train.micro_batch_size=3"]):
        code, out, err = cli("train", *args, *extra)
        assert code == 0, err
        finals.append(load_file(out.split("checkpoint: ")[1].strip() + "/weights.safetensors"))
    assert finals[0].keys() == finals[1].keys()
    moved = 0.0
    for name, w in finals[0].items():
        torch.testing.assert_close(finals[1][name], w, rtol=0, atol=1e-5)  # 1% of an Adam step (lr 1e-3): a near-zero gradient's sign may flip
        moved = max(moved, float(w.abs().max()))
    assert moved > 0  # the LoRA B matrices left zero: the step did something
    code, out, err = cli("train", *args, "train.micro_batch_size=4")
    assert code != 0 and out == "" and len(err.strip().splitlines()) == 1
    assert "train.batch_size=6 is not a multiple of train.micro_batch_size=4" in err
