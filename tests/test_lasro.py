"""LaSRO: the Bradley-Terry surrogate loss, the normalized and clipped generator objective and the
regularizer against hand computations; the 1-/2-step outputs against the sampler; the surrogate's
held-out ranking accuracy rising in pre-training; resume through extra_state; bad options."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bench.errors import UsageError
from bench.method import TrainContext
from bench.methods.lasro import (
    LaSRO, RewardNormalizer, bradley_terry, draw_noise, generator_loss, pair_agreement, pair_loss, reference_regularizer, two_step_sampler, winner_loser,
)
from bench.metrics.weightfree import Brightness, JpegCompressibility
from bench.models.diffusion import Conditioning

from test_pso_online import perturbed

PROMPTS = ["a red apple", "a dark forest", "a white boat", "a small bird", "a green hill", "a blue car"]
CFG = {
    "name": "lasro", "reward": "brightness", "k": 3, "t_mid": None, "rm_backbone": None, "rm_timestep": 0, "rm_head_layers": 2, "rm_head_groups": 32,
    "rm_lr": 1e-3, "rm_weight_decay": 0.0, "rm_max_grad_norm": 1.0, "rm_batch_size": 2, "pretrain_steps": 2, "heldout_prompts": 2,
    "eval_every": 1, "gen_steps": 1, "adapt_steps": 1, "lambda_1": 0.7, "lambda_2": 1.3, "detach_first_step": True, "normalize": True,
    "norm_momentum": 0.9, "norm_percentile": 0.75, "norm_clip": 1.0, "reg": "none", "reg_weight": 0.0, "reg_samples_per_prompt": 1, "seed": 0,
}


def context(model, reward=None, batch=2):
    return TrainContext(model, PROMPTS, reward or Brightness(), 0, torch.device("cpu"), batch, progress=False)


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ---- the losses on small tensors --------------------------------------------------------------------
def test_bradley_terry_is_the_bce_of_the_score_difference():
    s_w = torch.tensor([0.3, -1.0, 2.0], dtype=torch.float64)
    s_l = torch.tensor([0.1, 0.5, 2.0], dtype=torch.float64)
    got = bradley_terry(s_w, s_l)
    for i in range(3):
        assert got[i].item() == pytest.approx(-math.log(sigmoid(s_w[i].item() - s_l[i].item())), rel=1e-12)
    # the mean over valid pairs only
    valid = torch.tensor([True, True, False])
    want = (-math.log(sigmoid(0.2)) - math.log(sigmoid(-1.5))) / 2
    assert pair_loss(s_w, s_l, valid).item() == pytest.approx(want, rel=1e-12)
    assert pair_loss(s_w, s_l, torch.zeros(3, dtype=torch.bool)).item() == 0.0


def test_winner_and_loser_are_the_best_and_worst_of_k_and_ties_are_dropped():
    r = torch.tensor([[0.2, 0.9, 0.1], [0.5, 0.5, 0.5], [-3.0, 1.0, -4.0]], dtype=torch.float64)
    w, lo, ok = winner_loser(r)
    assert w.tolist()[::2] == [1, 1] and lo.tolist()[::2] == [2, 2] and ok.tolist() == [True, False, True]


def test_surrogate_loss_sums_the_1_step_and_2_step_pairs_by_hand():
    """L_R = l(x1_w, x1_l) + l(x2_w, x2_l), with a surrogate that sums a latent's entries."""
    method = LaSRO(CFG)
    method.surrogate = lambda x, cond: x.flatten(1).sum(1)
    x1 = torch.tensor([[0.0, 1.0, 2.0], [3.0, -1.0, 0.5]], dtype=torch.float64).reshape(2, 3, 1)
    x2 = torch.tensor([[0.4, 0.2, -0.3], [1.0, 1.0, 1.0]], dtype=torch.float64).reshape(2, 3, 1)
    r1 = torch.tensor([[5.0, 1.0, 3.0], [0.0, 2.0, 1.0]], dtype=torch.float64)  # prompt 0: w = 0, l = 1; prompt 1: w = 1, l = 0
    r2 = torch.tensor([[1.0, 2.0, 0.0], [4.0, 4.0, 4.0]], dtype=torch.float64)  # prompt 0: w = 1, l = 2; prompt 1: all tie
    batch = {"prompts": ["a", "b"], "x1": x1, "x2": x2, "r1": r1, "r2": r2}
    loss, logs = method.surrogate_loss(batch, Conditioning(torch.zeros(2, 1, 1)))
    l1 = (-math.log(sigmoid(0.0 - 1.0)) - math.log(sigmoid(-1.0 - 3.0))) / 2
    l2 = -math.log(sigmoid(0.2 - (-0.3)))  # the tied prompt has no pair
    assert loss.item() == pytest.approx(l1 + l2, rel=1e-6)
    assert logs["rm_loss_1"] == pytest.approx(l1, rel=1e-6) and logs["rm_loss_2"] == pytest.approx(l2, rel=1e-6)


def test_normalizer_tracks_mean_and_percentile_and_clips_only_the_top():
    f = RewardNormalizer(momentum=0.9, percentile=0.75, clip=1.0)
    a = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    f.update(a)  # the first batch sets the statistics: mean 2, 75th percentile 3
    assert f.mu.item() == pytest.approx(2.0) and f.r_max.item() == pytest.approx(3.0)
    b = torch.tensor([10.0, 12.0], dtype=torch.float64)  # mean 11, 75th percentile 11.5
    f.update(b)
    mu, r_max = 0.9 * 2 + 0.1 * 11, 0.9 * 3 + 0.1 * 11.5
    assert f.mu.item() == pytest.approx(mu) and f.r_max.item() == pytest.approx(r_max)
    s = torch.tensor([2.0, 3.5, 9.0], dtype=torch.float64, requires_grad=True)
    out = f(s)
    want = [min((v - mu) / (r_max - mu), 1.0) for v in (2.0, 3.5, 9.0)]
    assert out.tolist() == pytest.approx(want, rel=1e-12)
    assert want[0] < 0 < want[1] < 1 and want[2] == 1.0  # below the mean: negative, never clipped
    out.sum().backward()
    assert s.grad.tolist() == pytest.approx([1 / (r_max - mu), 1 / (r_max - mu), 0.0])  # the clipped score gets no gradient


def test_generator_loss_by_hand():
    f = RewardNormalizer(momentum=0.5, percentile=0.9, clip=0.5)
    s1 = torch.tensor([0.2, 0.8], dtype=torch.float64)
    s2 = torch.tensor([1.0, -0.4], dtype=torch.float64)
    f.update(torch.cat([s1, s2]))
    mu, r_max = torch.cat([s1, s2]).mean().item(), torch.quantile(torch.cat([s1, s2]), 0.9).item()
    g = lambda v: min((v - mu) / (r_max - mu), 0.5)
    want = 0.7 * -(g(0.2) + g(0.8)) / 2 + 1.3 * -(g(1.0) + g(-0.4)) / 2
    assert generator_loss(s1, s2, f, 0.7, 1.3).item() == pytest.approx(want, rel=1e-12)
    assert generator_loss(s1, s2, lambda s: s, 0.0, 1.0).item() == pytest.approx(-0.3)  # lambda_1 = 0: the "No 1st-step loss" ablation


def test_pair_agreement_counts_ordered_pairs_and_skips_reward_ties():
    r = torch.tensor([[1.0, 2.0, 2.0]], dtype=torch.float64)  # pairs (0,1), (0,2); (1,2) ties
    s = torch.tensor([[0.0, 1.0, -1.0]], dtype=torch.float64)  # (0,1) agrees, (0,2) does not
    assert pair_agreement(s, r) == (1.0, 2)
    assert pair_agreement(torch.zeros(1, 3, dtype=torch.float64), r) == (1.0, 2)  # score ties count one half


def test_reference_regularizer_by_hand(fewstep_lora):
    model = perturbed(fewstep_lora)  # non-zero LoRA: the model differs from its reference
    ctx = context(model)
    latents = torch.randn(3, *model.latent_shape(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    data = {"reg_latents": latents.float(), "reg_prompt_index": torch.tensor([0, 1, 2])}
    with torch.no_grad():
        got = reference_regularizer(ctx, data, torch.Generator().manual_seed(3))
        g = torch.Generator().manual_seed(3)
        idx = torch.randint(0, 3, (2,), generator=g)
        t = model.timesteps()[int(torch.randint(0, 4, (), generator=g))]
        x0 = latents.float().double()[idx]
        noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
        a = model.alpha(t)
        x_t = math.sqrt(a) * x0 + math.sqrt(1 - a) * noise
        hidden = model.encode_prompts([PROMPTS[int(i)] for i in idx]).hidden
        x0_of = lambda: (x_t - math.sqrt(1 - a) * model.unet(x_t, torch.tensor([t, t]), encoder_hidden_states=hidden).sample) / math.sqrt(a)
        tuned = x0_of()
        model.unet.disable_adapters()
        base = x0_of()
        model.unet.enable_adapters()
    assert got.item() > 0 and got.item() == pytest.approx(((tuned - base) ** 2).mean().item(), rel=1e-5)


# ---- sampling and the generator step on the tiny few-step model ---------------------------------------
def test_1_step_and_2_step_outputs_are_the_samplers(fewstep_lora):
    model = fewstep_lora
    method = LaSRO(CFG)
    sampler = two_step_sampler(model, None)
    assert model.timesteps(sampler) == [999, 499]
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(2)]
    method.k = 1
    out = method.samples(context(model), PROMPTS[:2], *draw_noise(model, gens(), sampler))
    with torch.no_grad():
        x1 = model.sample(PROMPTS[:2], gens(), sampler=sampler, stop_at=0)
        x2 = model.sample(PROMPTS[:2], gens(), sampler=sampler)
    assert torch.equal(out["x1"][:, 0], x1) and torch.equal(out["x2"][:, 0], x2)
    assert out["r2"][:, 0].tolist() == pytest.approx(Brightness().score(model.decode(x2), PROMPTS[:2]).tolist(), abs=1 / 255)
    assert two_step_sampler(model, 300).timesteps == (999, 300)


def test_generator_loss_of_a_step_equals_the_objective_by_hand(fewstep_lora):
    """At step 0 (no adaptation yet): lambda_1 mean(-f(r_phi(x1_i))) + lambda_2 mean(-f(r_phi(x2_j))),
    x1_i and x2_j one random sample out of each prompt's K, recomputed through the sampler."""
    model = copy.deepcopy(fewstep_lora)
    method = LaSRO(CFG)
    ctx = context(model)
    method.build(ctx)
    data = {f"surrogate.{k}": v for k, v in method.surrogate.state_dict().items()}
    loss, _ = method.loss(ctx, data, torch.Generator().manual_seed(11))

    g = torch.Generator().manual_seed(11)
    train = PROMPTS[:4]  # the last 2 are held out
    prompts = [train[int(i)] for i in torch.randint(0, 4, (2,), generator=g)]
    seeds = torch.randint(0, 2**62, (6,), generator=g)
    i1, i2 = torch.randint(0, 3, (2,), generator=g), torch.randint(0, 3, (2,), generator=g)
    sampler = two_step_sampler(model, None)
    with torch.no_grad():
        pick = lambda idx: [torch.Generator().manual_seed(int(seeds[p * 3 + int(idx[p])])) for p in range(2)]
        x1 = model.sample(prompts, pick(i1), sampler=sampler, stop_at=0)
        x2 = model.sample(prompts, pick(i2), sampler=sampler)
        cond = model.encode_prompts(prompts)
        s1, s2 = method.surrogate(x1, cond).float(), method.surrogate(x2, cond).float()
    scores = torch.cat([s1, s2]).double()
    mu, r_max = scores.mean().item(), torch.quantile(scores, 0.75).item()
    f = lambda v: min((v - mu) / (r_max - mu), 1.0)
    want = 0.7 * -sum(f(v) for v in s1.tolist()) / 2 + 1.3 * -sum(f(v) for v in s2.tolist()) / 2
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()  # the gradient reaches the LoRA weights and nothing of the surrogate
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.unet.named_parameters() if "lora" in n)
    assert all(p.grad is None for p in method.surrogate.parameters())


@pytest.mark.slow  # 200 surrogate pre-training steps (about 25 s); test_lasro_end_to_end trains LaSRO by default
def test_pretraining_raises_the_heldout_ranking_accuracy(fewstep_lora):
    """Alg. 1 on the tiny model: the surrogate orders held-out pairs (prompts it never trained on)
    by brightness at chance before pre-training and well above chance after."""
    model = copy.deepcopy(fewstep_lora)
    prompts = open(__import__("pathlib").Path(__file__).parents[1] / "suites" / "smoke" / "train.txt").read().splitlines()[:24]
    ctx = TrainContext(model, prompts, Brightness(), 0, torch.device("cpu"), 2, progress=False)
    method = LaSRO({**CFG, "k": 4, "rm_batch_size": 4, "pretrain_steps": 20, "eval_every": 10, "heldout_prompts": 8, "rm_lr": 3e-4})
    data = method.prepare(ctx)
    curve = data["pretrain_accuracy"]  # rows: step, 1-step, 2-step, both
    assert curve[:, 0].tolist() == [0, 10, 20] and int(data["heldout_pairs"]) == 2 * 8 * 6  # 2 groups x 8 prompts x (4 choose 2)
    before, middle, after = curve[:, 3].tolist()
    # measured: 0.43, 0.70, 0.72 (0.47, 0.77, 0.82 on the multi-threaded build before tiny builds ran on one thread);
    # 0.65 is 3 binomial standard deviations above chance on these 96 pairs
    assert before < 0.55 and before < middle < after and after > 0.65, curve
    manifest = method.data_manifest(ctx, data)
    assert manifest["heldout_accuracy_before"] == before and manifest["heldout_accuracy_after"] == after


def test_a_resumed_run_repeats_the_uninterrupted_one(fewstep_lora):
    """extra_state carries the adapted surrogate, its optimizer's moments and the normalizer."""
    model = copy.deepcopy(fewstep_lora)
    ctx = context(model)
    first = LaSRO(CFG)
    first.build(ctx)
    data = {f"surrogate.{k}": v.clone() for k, v in first.surrogate.state_dict().items()}
    run = lambda m, step: (setattr(ctx, "step", step), m.loss(ctx, data, torch.Generator().manual_seed(step))[0].item())[1]
    for step in range(3):
        run(first, step)  # steps 1 and 2 adapt the surrogate
    saved = {k: v.clone() for k, v in first.extra_state().items()}
    assert any(k.startswith("rm_opt.") for k in saved) and "norm.r_max" in saved
    uninterrupted = run(first, 3)
    resumed = LaSRO(CFG)
    resumed.load_extra_state(saved)  # before the surrogate exists, as after a cached prepare()
    assert run(resumed, 3) == uninterrupted
    assert all(torch.equal(a, b) for a, b in zip(first.surrogate.parameters(), resumed.surrogate.parameters()))


def test_a_non_differentiable_reward_trains_the_surrogate(fewstep_lora):
    """JPEG compressibility has no gradient; the surrogate's Bradley-Terry step still runs on it."""
    model = copy.deepcopy(fewstep_lora)
    ctx = context(model, JpegCompressibility())
    method = LaSRO({**CFG, "reward": "jpeg_compressibility"})
    method.build(ctx)
    batch = method.off_policy(ctx, PROMPTS[:4], 2, torch.Generator().manual_seed(0))
    assert batch["r1"].shape == (2, 3) and (batch["r1"] < 0).all()
    before = {k: v.clone() for k, v in method.surrogate.state_dict().items()}
    logs = method.surrogate_step(ctx, batch)
    assert logs["rm_loss_1"] > 0 and any(not torch.equal(before[k], v) for k, v in method.surrogate.state_dict().items())


def test_the_surrogate_can_start_from_another_models_unet(fewstep_lora, tmp_path):
    """rm_backbone (the paper's Segmind-Vega): the encoder comes from that UNet, the head from the seed."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(7)
    other = UNet2DConditionModel.from_config(fewstep_lora.unet.config)
    other.save_pretrained(tmp_path / "unet")
    method = LaSRO({**CFG, "rm_backbone": str(tmp_path)})
    method.build(context(fewstep_lora))
    assert torch.equal(method.surrogate.conv_in.weight, other.conv_in.weight.double())
    assert not torch.equal(method.surrogate.conv_in.weight, fewstep_lora.unet.conv_in.weight)
    with pytest.raises(UsageError, match="has no loadable UNet"):
        LaSRO({**CFG, "rm_backbone": str(tmp_path / "nowhere")}).build(context(fewstep_lora))


def test_bad_options_fail_with_one_line(fewstep_lora):
    ctx = context(fewstep_lora)
    with pytest.raises(UsageError, match="method.k=1"):
        LaSRO({**CFG, "k": 1})
    with pytest.raises(UsageError, match="unknown method.reg 'lcm'"):
        LaSRO({**CFG, "reg": "lcm"})
    with pytest.raises(UsageError, match="norm_percentile=0.3"):
        LaSRO({**CFG, "norm_percentile": 0.3})
    with pytest.raises(UsageError, match="heldout_prompts=6 leaves no training prompt"):
        LaSRO({**CFG, "heldout_prompts": 6}).prepare(ctx)
    with pytest.raises(UsageError, match="rm_head_layers=4 halves .* use at most 2"):
        LaSRO({**CFG, "rm_head_layers": 4}).build(ctx)
    with pytest.raises(UsageError, match="method.t_mid=999"):
        two_step_sampler(fewstep_lora, 999)


def test_lasro_end_to_end(cli):
    code, out, err = cli("run", "suite=smoke", "model=tiny-fewstep", "method=lasro", "suite.limit=2", "train.steps=2", "train.batch_size=2",
                         "method.k=2", "method.pretrain_steps=2", "method.rm_batch_size=2", "method.eval_every=1", "method.reward=jpeg_compressibility")
    assert code == 0, err
    assert "smoke / tiny-fewstep / lasro vs" in out


def test_paper_presets_compose_and_name_rewards_that_arrive_with_the_real_metrics(cli):
    from bench.config import compose, to_dict

    cfg = to_dict(compose(["method=lasro-ssd1b-lcm"]))
    assert cfg["model"]["name"] == "ssd-1b-lcm" and cfg["method"]["pretrain_steps"] == 30000 and cfg["method"]["rm_backbone"] == "segmind/Segmind-Vega"
    assert to_dict(compose(["method=lasro-sdxl-turbo"]))["method"]["reg"] == "none"
    for preset in ("lasro-ssd1b-lcm", "lasro-ssd1b-lcm-attribute-binding", "lasro-ssd1b-lcm-text-alignment"):  # their rewards are registered: offline, the model's weights are what is missing
        code, _, err = cli("train", f"method={preset}", "suite=smoke")
        assert code != 0 and "unknown metric" not in err and "weights for model 'ssd-1b-lcm'" in err and "bench prefetch" in err and len(err.strip().splitlines()) == 1
