"""Rejection-sampling fine-tuning: the diffusion loss by hand, best-of-K selection against
independently computed rewards, and a short training run that lowers its loss and moves the model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.config import compose
from bench.generate import image_seed
from bench.method import TrainContext
from bench.metrics.weightfree import Brightness
from bench.models import pipeline_location
from bench.models.diffusion import to_uint8
from bench.methods.sft import SFT

TRAIN_PROMPTS = ["a red apple on a table", "a dark forest at night", "a white boat on a bright sea", "a small yellow bird"]




def luma_by_hand(latents, model) -> list[float]:
    """Brightness of the stored uint8 pixels: mean of 0.299 R + 0.587 G + 0.114 B over k / 255."""
    with torch.no_grad():
        pixels = to_uint8(model.decode(latents)).double() / 255.0  # (N, H, W, 3)
    return [float((0.299 * p[..., 0] + 0.587 * p[..., 1] + 0.114 * p[..., 2]).mean()) for p in pixels]


# ---- the loss --------------------------------------------------------------------------------
@pytest.mark.parametrize("timesteps", [None, [750, 500, 250, 0]])
def test_diffusion_loss_matches_hand_computation(model, timesteps):
    model.to(dtype=torch.float64)
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    cond = model.encode_prompts(["a red cat", "", "a boat"])
    got = model.diffusion_loss(x0, cond, torch.Generator().manual_seed(42), timesteps=timesteps)

    # The same draws in the same order: t first, then float64 noise.
    h = torch.Generator().manual_seed(42)
    if timesteps:
        t = torch.tensor(timesteps)[torch.randint(0, len(timesteps), (3,), generator=h)]
        assert set(t.tolist()) <= set(timesteps)
    else:
        t = torch.randint(0, 1000, (3,), generator=h)
    noise = torch.randn(x0.shape, generator=h, dtype=torch.float64)
    a = model.alphas_cumprod[t].view(3, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    with torch.no_grad():
        pred = model.unet(x_t, t, encoder_hidden_states=cond.hidden).sample
    want = [float(((pred[i] - noise[i]) ** 2).mean()) for i in range(3)]

    assert got.shape == (3,)
    assert got.tolist() == pytest.approx(want, rel=1e-5)
    assert all(0.0 < w < 10.0 for w in want) and len({round(w, 6) for w in want}) == 3
    # a different generator draws different t and noise, hence a different loss
    other = model.diffusion_loss(x0, cond, torch.Generator().manual_seed(43), timesteps=timesteps)
    assert not torch.equal(other, got)


# ---- best-of-K -------------------------------------------------------------------------------
def test_prepare_keeps_the_best_of_k(model):
    model.to(dtype=torch.float64)  # batch-invariant to rounding, so one-at-a-time resampling below matches
    k, seed = 3, 5
    prompts = TRAIN_PROMPTS[:2]
    method = SFT({"samples_per_prompt": k, "reward": "brightness", "seed": seed, "timesteps": "uniform", "drop_ties": True})
    ctx = TrainContext(model, prompts, Brightness(), seed=0, device=torch.device("cpu"), batch_size=2, progress=False)
    data = method.prepare(ctx)
    assert data["latents_w"].shape == (2, 4, 8, 8) and data["latents_w"].dtype == torch.float32
    assert data["prompt_index"].tolist() == [0, 1]

    for p, prompt in enumerate(prompts):
        latents = [model.sample([prompt], [torch.Generator().manual_seed(image_seed("train-candidates", p, i, seed))]) for i in range(k)]
        rewards = [luma_by_hand(x, model)[0] for x in latents]
        assert len(set(rewards)) == k  # the choice is not a tie
        best = max(range(k), key=rewards.__getitem__)
        assert float(data["reward_w"][p]) == pytest.approx(rewards[best], abs=1e-7)
        assert float(data["reward_l"][p]) == pytest.approx(min(rewards), abs=1e-7)
        torch.testing.assert_close(data["latents_w"][p], latents[best][0].float(), rtol=0, atol=1e-6)
        others = [i for i in range(k) if i != best]
        assert all(float((data["latents_w"][p] - latents[i][0].float()).abs().max()) > 1e-2 for i in others)
    assert (data["reward_w"] > data["reward_l"]).all()


# ---- training end to end ---------------------------------------------------------------------
@pytest.fixture
def trained(tmp_path, cache_dir, tiny_cfg):
    """A 40-step SFT run on 4 training prompts, in a fresh cache that reuses the session's model build."""
    from bench.runner import Session

    built = Path(pipeline_location(tiny_cfg, cache_dir)[0])
    cache = tmp_path / "cache"
    (cache / "models").mkdir(parents=True)
    os.symlink(built, cache / "models" / built.name)
    (tmp_path / "train.txt").write_text("\n".join(TRAIN_PROMPTS) + "\n")
    cfg = compose(
        [
            "suite=smoke",
            "method=sft",
            "suite.limit=2",
            f"suite.train_prompts={tmp_path / 'train.txt'}",
            "train.steps=40",
            "train.save_every=1000",
            "method.samples_per_prompt=4",
            f"cache_dir={cache}",
            f"out={tmp_path / 'runs'}",
            "device=cpu",
        ]
    )
    session = Session(cfg, progress=False)
    assert session.suite.train_prompts == TRAIN_PROMPTS and len(session.suite.prompts) == 2
    return session, session.train()


def test_training_lowers_the_loss_and_moves_the_model(trained):
    session, ckpt = trained
    meta = json.loads((ckpt.path / "train.json").read_text())
    history = meta["history"]
    assert meta["method"] == "sft" and meta["steps"] == 40 and len(history) == 40
    assert all(math.isfinite(h) and h > 0 for h in history)
    # The per-step loss is dominated by which timesteps each batch drew, so this comparison of
    # means over 10 steps is a weak signal; the paired comparison below is the tight one.
    first, last = sum(history[:10]) / 10, sum(history[-10:]) / 10
    assert last < first, (first, last)

    weights = load_file(ckpt.path / "weights.safetensors")
    lora_b = {n: w for n, w in weights.items() if "lora_B" in n}
    assert lora_b and meta["lora_rank"] == 8
    assert all(float(w.norm()) > 0 for w in lora_b.values()), [n for n, w in lora_b.items() if float(w.norm()) == 0]

    base, tuned = session.model(), session.model(ckpt)
    assert sum("lora_B" in n for n, _ in tuned.unet.named_parameters()) == len(lora_b)
    assert not any("lora" in n for n, _ in base.unet.named_parameters())

    # Paired: the SFT objective on the kept samples, at the very same (t, noise) draws, before and after.
    (data_file,) = (session.cache / "data").glob("preference_data-*.safetensors")
    data = load_file(data_file)
    assert data["latents_w"].shape == (len(TRAIN_PROMPTS), 4, 8, 8)
    x0 = data["latents_w"].repeat(32, 1, 1, 1)
    prompts = [TRAIN_PROMPTS[int(i)] for i in data["prompt_index"]] * 32
    with torch.no_grad():
        loss_base = base.diffusion_loss(x0, base.encode_prompts(prompts), torch.Generator().manual_seed(0)).mean()
        loss_tuned = tuned.diffusion_loss(x0, tuned.encode_prompts(prompts), torch.Generator().manual_seed(0)).mean()
    assert float(loss_tuned) < 0.99 * float(loss_base), (float(loss_base), float(loss_tuned))

    for m in (base, tuned):
        m.to(dtype=torch.float64)
    seeds = [image_seed("smoke", p, 0, 0) for p in range(2)]
    with torch.no_grad():
        x_base = base.sample(session.suite.prompts, [torch.Generator().manual_seed(s) for s in seeds])
        x_tuned = tuned.sample(session.suite.prompts, [torch.Generator().manual_seed(s) for s in seeds])
        x_base_again = base.sample(session.suite.prompts, [torch.Generator().manual_seed(s) for s in seeds])
    assert torch.equal(x_base, x_base_again)
    assert float((x_tuned - x_base).abs().max()) > 1e-2, float((x_tuned - x_base).abs().max())


def test_one_sample_per_prompt_asks_to_keep_its_ties(cli):
    code, out, err = cli("train", "suite=smoke", "method=sft", "method.samples_per_prompt=1", "train.steps=1")
    assert code == 2
    assert err.strip().splitlines()[-1].startswith("bench: error: method.samples_per_prompt=1 draws one sample per prompt")
    assert "set method.drop_ties=false" in err and "Traceback" not in err
