"""Diff-Instruct / Diff-Instruct++: the EDM view of the tiny UNet, the one-step generator against the
tiny-onestep sampler, each loss against hand numbers and against a hand-written rollout, Theorem 3.3
(CFG = the score of the implicit-reward optimum) on the tiny teacher, the TA in checkpoints, and
Diff-Instruct moving the one-step generator toward the teacher's samples."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from bench.errors import UsageError
from bench.method import TrainContext
from bench.methods.diff_instruct_pp import (
    DiffInstructPP,
    cfg_denoise,
    draw_latents,
    edm_denoise,
    generator_loss,
    generator_weight,
    model_sigmas,
    nearest_timestep,
    one_step,
    sample_sigmas,
    ta_loss,
    ta_weight,
)
from bench.metrics.weightfree import Brightness, JpegCompressibility

PROMPTS = ["a red apple", "a dark forest", "a white boat", "a small bird"]
CFG = {
    "name": "di-pp", "alpha_cfg": 4.5, "alpha_rew": 2.0, "sigma_init": 2.5, "prior": "std", "p_mean": -2.0, "p_std": 2.0,
    "sigma_min": None, "sigma_max": None, "sigma_per": "sample", "sigma_data": 0.5, "ta_weighting": "edm",
    "gen_weighting": "inv_norm", "k_ta": 1, "ta_lr": 1e-3, "ta_betas": [0.0, 0.999], "init": None,
}


@pytest.fixture(scope="module")
def tiny64(tiny_cfg, cache_dir):
    from bench.models import load_model

    return load_model(tiny_cfg, cache_dir).to(dtype=torch.float64)


def full_finetune_ctx(model, reward=None, batch=2):
    model = copy.deepcopy(model)
    frozen = copy.deepcopy(model.unet).requires_grad_(False)
    model.unet.requires_grad_(True)
    return TrainContext(model, PROMPTS, reward, 0, torch.device("cpu"), batch, progress=False, frozen_unet=frozen)


# ---- the EDM view and the generator -----------------------------------------------------------------
def test_edm_denoiser_is_the_models_own_x0_prediction(tiny64):
    model, t = tiny64, 400
    a = model.alpha(t)
    x_vp = torch.randn((2, *model.latent_shape()), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    cond = model.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        want = model.x0_from_eps(x_vp, model.denoise(x_vp, t, cond), t)
        got = edm_denoise(model, model.unet, x_vp / math.sqrt(a), model_sigmas(model)[[t, t]], cond)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


def test_sigmas_round_to_the_nearest_timestep(tiny64):
    sig = model_sigmas(tiny64)
    assert nearest_timestep(tiny64, torch.tensor([2.5])).tolist() == [625] and float(sig[625]) == pytest.approx(2.5017, abs=1e-4)
    mid = float(sig[100] + sig[101]) / 2
    assert nearest_timestep(tiny64, torch.tensor([mid - 1e-9, mid + 1e-9, 0.0, 1e9], dtype=torch.float64)).tolist() == [100, 101, 0, 999]


def test_the_generator_is_the_tiny_onestep_sampler(model_cfg, cache_dir, tiny64):
    """D(z; sigma_init) with z ~ N(0, sigma_init^2 I) is what model=tiny-onestep samples."""
    from bench.models import load_model

    onestep = load_model(model_cfg("tiny-onestep"), cache_dir).to(dtype=torch.float64)
    assert onestep.identity == tiny64.identity and onestep.timesteps() == [625]
    gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]
    with torch.no_grad():
        want = onestep.sample(PROMPTS[:2], gens())
        got = one_step(tiny64, tiny64.unet, draw_latents(tiny64, gens()), float(model_sigmas(tiny64)[625]), tiny64.encode_prompts(PROMPTS[:2]))
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-10)


# ---- the losses on small tensors, against numbers worked out by hand ----------------------------------
def test_weightings_by_hand():
    assert ta_weight(torch.tensor([0.5, 1.0]), "edm", 0.5).tolist() == [8.0, 5.0]  # (s^2 + 0.25) / (0.25 s^2)
    assert ta_weight(torch.tensor([0.5, 1.0]), "constant", 0.5).tolist() == [1.0, 1.0]
    y = torch.tensor([[[[3.0, 4.0]]], [[[0.0, 2.0]]]])
    assert generator_weight(y, "inv_norm").tolist() == pytest.approx([0.2, 0.5])
    assert generator_weight(y, "constant").tolist() == [1.0, 1.0]


def test_ta_loss_by_hand():
    d = torch.tensor([[[[1.0, 2.0]]], [[[0.0, 1.0]]]])
    x0 = torch.tensor([[[[0.0, 0.0]]], [[[1.0, 1.0]]]])
    # sample 0: 8 * (1 + 4) = 40; sample 1: 5 * (1 + 0) = 5; mean 22.5
    assert ta_loss(d, x0, torch.tensor([8.0, 5.0])).item() == 22.5


def test_generator_loss_and_its_gradient_by_hand():
    x_t = torch.tensor([[[[1.0, 1.0]]], [[[2.0, -1.0]]]], requires_grad=True)
    y = torch.tensor([[[[3.0, 4.0]]], [[[0.0, 2.0]]]])
    reward = torch.tensor([0.3, 0.7], dtype=torch.float64, requires_grad=True)
    w = generator_weight(y, "inv_norm")
    loss = generator_loss(x_t, y, w, reward, alpha_rew=2.0)
    # sample 0: 0.2 * (3 + 4) - 2 * 0.3 = 0.8; sample 1: 0.5 * (0 - 2) - 2 * 0.7 = -2.4; mean -0.8
    assert loss.item() == pytest.approx(-0.8, abs=1e-7)
    loss.backward()
    assert torch.allclose(x_t.grad, torch.tensor([[[[0.3, 0.4]]], [[[0.0, 0.5]]]]))  # w y / B: y is a constant
    assert reward.grad.tolist() == [-1.0, -1.0]  # -alpha_rew / B, added after the spatial sum
    assert generator_loss(x_t, y, w).item() == pytest.approx((1.4 - 1.0) / 2, abs=1e-7)  # Diff-Instruct: no reward


def test_edm_noise_levels_by_hand():
    g = torch.Generator().manual_seed(7)
    s = torch.randn((4,), generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    want = (-2.0 + 2.0 * s).exp().clamp(0.05, 3.0)
    assert torch.equal(sample_sigmas(4, g, -2.0, 2.0, 0.05, 3.0), want)
    batch = sample_sigmas(4, torch.Generator().manual_seed(7), -2.0, 2.0, 0.05, 3.0, per_batch=True)
    assert batch.tolist() == [want[0].item()] * 4  # Listing 1: one sigma for the batch


# ---- the method's loss against a hand-written rollout ---------------------------------------------------
def hand_denoise(model, unet, x, sigma, hidden):
    """x - sigma eps(x / sqrt(1 + sigma^2), t(sigma)), written out."""
    t = torch.tensor([int((model_sigmas(model) - float(s)).abs().argmin()) for s in sigma])
    c_in = (1 / (sigma**2 + 1).sqrt()).view(-1, 1, 1, 1)
    return x - sigma.view(-1, 1, 1, 1) * unet(x * c_in, t, encoder_hidden_states=hidden).sample


def replay(model, g, n=2):
    """The draws of one TA or generator round: prompts, one latent per image, sigmas, noise."""
    prompts = [PROMPTS[int(i)] for i in torch.randint(0, len(PROMPTS), (n,), generator=g)]
    gens = [torch.Generator().manual_seed(int(s)) for s in torch.randint(0, 2**62, (n,), generator=g)]
    z = torch.stack([torch.randn(model.latent_shape(), generator=gg, dtype=torch.float64) for gg in gens])
    sigma = (-2.0 + 2.0 * torch.randn((n,), generator=g, dtype=torch.float64)).exp().clamp(float(model_sigmas(model)[0]), float(model_sigmas(model)[-1]))
    noise = torch.randn((n, *model.latent_shape()), generator=g, dtype=torch.float64)
    return prompts, z, sigma, noise


def test_loss_equals_a_hand_written_rollout(tiny64):
    ctx = full_finetune_ctx(tiny64, Brightness())
    model = ctx.model
    with torch.no_grad():  # a generator that is no longer the teacher
        for p in model.unet.parameters():
            p.add_(1e-3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    method = DiffInstructPP(CFG)
    method.prepare(ctx)
    ta_before = copy.deepcopy(method.ta)
    loss, logs = method.loss(ctx, {}, torch.Generator().manual_seed(11))
    loss.backward()
    got_grads = {n: p.grad.clone() for n, p in model.unet.named_parameters()}
    model.unet.zero_grad()

    sigma_init = float(model_sigmas(model)[625])
    g = torch.Generator().manual_seed(11)
    # TA round: x0 from the generator without gradient, lambda_EDM-weighted denoising loss of the TA as it was
    prompts, z, sigma, noise = replay(model, g)
    hidden = model.encode_prompts(prompts).hidden
    with torch.no_grad():
        x0 = hand_denoise(model, model.unet, sigma_init * z, torch.full((2,), sigma_init, dtype=torch.float64), hidden)
        d = hand_denoise(model, ta_before, x0 + sigma.view(-1, 1, 1, 1) * noise, sigma, hidden)
    lam = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert logs["ta_loss"] == pytest.approx(((lam.view(-1, 1, 1, 1) * (d - x0) ** 2).flatten(1).sum(1).mean()).item(), rel=1e-5)
    # generator round, with the TA after its update and the CFG teacher
    prompts, z, sigma, noise = replay(model, g)
    hidden = model.encode_prompts(prompts).hidden
    empty = model.encode_prompts([""] * 2).hidden
    x0 = hand_denoise(model, model.unet, sigma_init * z, torch.full((2,), sigma_init, dtype=torch.float64), hidden)
    x_t = x0 + sigma.view(-1, 1, 1, 1) * noise
    with torch.no_grad():
        d_c = hand_denoise(model, ctx.frozen_unet, x_t, sigma, hidden)
        d_u = hand_denoise(model, ctx.frozen_unet, x_t, sigma, empty)
        y = hand_denoise(model, method.ta, x_t, sigma, hidden) - (d_u + 4.5 * (d_c - d_u))
        w = 1 / y.flatten(1).norm(dim=1)
    reward = Brightness().score(model.decode(x0), prompts)
    want = ((w.view(-1, 1, 1, 1) * y * x_t).flatten(1).sum(1) - 2.0 * reward).mean()
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert logs["reward"] == pytest.approx(reward.mean().item(), rel=1e-6)
    for n, p in model.unet.named_parameters():
        assert torch.allclose(got_grads[n], p.grad, rtol=1e-4, atol=1e-9), n
    assert any(not torch.equal(a, b) for a, b in zip(ta_before.parameters(), method.ta.parameters()))  # the TA stepped


def test_the_ta_goes_to_checkpoints_and_back(tiny64):
    ctx = full_finetune_ctx(tiny64, batch=2)
    cfg = {**CFG, "alpha_rew": 0.0, "k_ta": 2}
    method = DiffInstructPP(cfg)
    method.prepare(ctx)
    method.loss(ctx, {}, torch.Generator().manual_seed(1))
    state = {k: v.clone() for k, v in method.extra_state().items()}
    assert any(k.startswith("ta_opt.") for k in state) and any(k.startswith("ta.") for k in state)
    again = DiffInstructPP(cfg)
    again.prepare(ctx)
    again.load_extra_state(state)
    with torch.no_grad():
        a, _ = method.loss(ctx, {}, torch.Generator().manual_seed(2))
        b, _ = again.loss(ctx, {}, torch.Generator().manual_seed(2))
    assert a.item() == b.item()


# ---- Theorem 3.3 on the tiny teacher -------------------------------------------------------------------
def test_micro_batches_update_the_ta_once_a_step_on_the_steps_samples(tiny64):
    """train.micro_batch_size cuts the generator's batch; the TA still takes one update per optimizer step
    on the whole step's samples (chunk by chunk): the same update as an uncut batch of that size."""
    cfg = {**CFG, "alpha_rew": 0.0}
    whole, cut = full_finetune_ctx(tiny64, batch=4), full_finetune_ctx(tiny64, batch=2)
    cut.grad_accum = 2
    methods = []
    for ctx in (whole, cut):
        method = DiffInstructPP(cfg)
        method.prepare(ctx)
        _, logs = method.loss(ctx, {}, torch.Generator().manual_seed(5))
        methods.append((method, logs))
    (a, logs_a), (b, logs_b) = methods
    assert logs_b["ta_loss"] == pytest.approx(logs_a["ta_loss"], rel=1e-9)
    for (n, p), q in zip(a.ta.named_parameters(), b.ta.parameters()):
        assert torch.allclose(p, q, rtol=1e-9, atol=1e-12), n
    before = [p.clone() for p in b.ta.parameters()]
    cut.micro = 1  # the step's second micro-batch: the generator's loss only
    _, logs = b.loss(cut, {}, torch.Generator().manual_seed(6))
    assert all(torch.equal(p, q) for p, q in zip(before, b.ta.parameters())) and logs["ta_loss"] == logs_b["ta_loss"]


@pytest.mark.parametrize("beta", [1.0, 1 / 3.5])
def test_cfg_is_the_score_of_the_implicit_reward_optimum(tiny64, beta):
    """Thm 3.3: with the implicit reward r = w log p_ref(x_t | c) / p_ref(x_t), the minimiser of
    E_q[-r] + beta w KL(q, p_ref(. | c)) has the CFG score with scale 1 + 1/beta.

    The teacher's conditional and unconditional scores restricted to a line x(tau) = x_a + tau v
    through latent space are 1-D fields, hence exact gradients of log-densities on that line
    (trapezoid sums on a grid). The objective is minimised over all distributions q on the grid by
    L-BFGS (nothing assumes the closed form), and the score of the minimiser, by finite differences,
    is compared with the directional CFG score that the DI++ teacher uses (``cfg_denoise``)."""
    model, sigma, w = tiny64, 0.5, 0.7
    g = torch.Generator().manual_seed(5)
    cond, uncond = model.encode_prompts(["a red apple"]), model.unconditional(1)
    x_a = 0.6 * torch.randn((1, *model.latent_shape()), generator=g, dtype=torch.float64)
    v = torch.randn(x_a.shape, generator=g, dtype=torch.float64)
    v = v / v.norm()
    taus = torch.linspace(-0.5, 0.5, 81, dtype=torch.float64)
    h = float(taus[1] - taus[0])
    xs = x_a + taus.view(-1, 1, 1, 1) * v
    sig = torch.full((len(taus),), sigma, dtype=torch.float64)
    rep = lambda c: type(c)(c.hidden.expand(len(taus), -1, -1))
    with torch.no_grad():
        score = lambda d: ((d - xs) / sigma**2 * v).flatten(1).sum(1)  # v . s(x(tau)), s = (d - x) / sigma^2
        f_c = score(edm_denoise(model, model.unet, xs, sig, rep(cond)))
        f_u = score(edm_denoise(model, model.unet, xs, sig, rep(uncond)))
        f_cfg = score(cfg_denoise(model, model.unet, xs, sig, rep(cond), rep(uncond), 1 + 1 / beta))
    integrate = lambda f: torch.cat([torch.zeros(1, dtype=f.dtype), torch.cumsum(h * (f[1:] + f[:-1]) / 2, 0)])
    log_pc, log_pu = integrate(f_c), integrate(f_u)
    log_pc = log_pc - torch.logsumexp(log_pc, 0)  # the conditional density on the grid
    reward = w * (log_pc - log_pu)  # the implicit reward (3.8) at this time level (constants do not matter)

    phi = log_pc.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([phi], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def objective():
        opt.zero_grad()
        log_q = torch.log_softmax(phi, 0)
        q = log_q.exp()
        value = -(q * reward).sum() + beta * w * (q * (log_q - log_pc)).sum()
        value.backward()
        return value

    for _ in range(20):
        opt.step(objective)
    log_q = torch.log_softmax(phi.detach(), 0)
    score_q = (log_q[1:] - log_q[:-1]) / h  # finite differences of the optimum's log-density
    cfg_mid = (f_cfg[1:] + f_cfg[:-1]) / 2  # the CFG score, averaged as the trapezoid rule sums it
    err = (score_q - cfg_mid).abs().max().item()
    gap = ((f_cfg - f_c).abs().max()).item()  # how far CFG moves the score: the check is not vacuous
    assert err < 1e-4 * cfg_mid.abs().max().item(), (err, gap)  # L-BFGS's convergence, not the quadrature, limits this
    assert gap > 100 * err


# ---- options, presets, end to end ------------------------------------------------------------------------
def test_options_and_rewards_are_checked_before_training(tiny64, model_cfg, cache_dir):
    from bench.models import load_model

    ctx = full_finetune_ctx(tiny64, JpegCompressibility())
    with pytest.raises(UsageError, match="'jpeg_compressibility' is not differentiable"):
        DiffInstructPP(CFG).prepare(ctx)
    with pytest.raises(UsageError, match="unknown method.gen_weighting 'dmd'"):
        DiffInstructPP({**CFG, "gen_weighting": "dmd"}).prepare(ctx)
    DiffInstructPP({**CFG, "alpha_rew": 0.0}).prepare(ctx)  # Diff-Instruct needs no reward
    onestep = full_finetune_ctx(load_model(model_cfg("tiny-onestep"), cache_dir), Brightness())
    DiffInstructPP(CFG).prepare(onestep)
    with pytest.raises(UsageError, match=r"samples 1 euler step\(s\) from t = 625"):
        DiffInstructPP({**CFG, "sigma_init": 1.0}).prepare(onestep)  # evaluation would sample another generator
    with pytest.raises(UsageError, match="prior variance"):
        DiffInstructPP({**CFG, "prior": "variance"}).prepare(onestep)
    with pytest.raises(UsageError, match="not a finished checkpoint"):
        DiffInstructPP({**CFG, "init": str(cache_dir / "nowhere")}).prepare(onestep)


def test_a_one_step_generator_is_only_evaluated_as_one(cli, tmp_path):
    """Evaluating the generator with the teacher's multi-step sampler (or more steps) is an error before any work."""
    for args in (["model=tiny"], ["model=tiny-onestep", "gen.steps=2"]):
        code, out, err = cli("run", "suite=smoke", "method=di-pp", "suite.limit=2", "train.steps=2", *args)
        assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
        assert "trains a one-step generator D(z; 2.5017) at t = 625" in err and "model=<teacher>-onestep" in err
    assert not (tmp_path / "runs").exists()  # nothing was evaluated
    code, out, err = cli("train", "suite=smoke", "method=diff-instruct", "model=tiny", "train.steps=1", "train.batch_size=2")
    assert code == 0, err  # distilling from a multi-step teacher is fine: only evaluation needs the one-step sampler


@pytest.mark.slow  # two trainings (about 8 s); test_di_pp_runs_end_to_end_and_starts_from_a_diff_instruct_checkpoint trains DI++ by default
def test_di_pp_trains_its_diff_instruct_stage_first(cli, tmp_path):
    """init_from: the alignment starts from the checkpoint of the Diff-Instruct preset, trained first on the same model."""
    code, out, err = cli("run", "suite=smoke", "model=tiny-onestep", "method=di-pp", "suite.limit=2", "train.steps=2", "train.batch_size=2",
                         "method.init_from=diff-instruct", "method.init_overrides=[train.steps=1,train.batch_size=2]")
    assert code == 0, err
    (run,) = (tmp_path / "runs").glob("smoke-tiny-onestep-di-pp-*")
    init = Path(json.loads((run / "manifest.json").read_text())["config"]["method"]["init"])
    assert init.parent.name.startswith("diff-instruct-") and (init / "weights.safetensors").exists()
    assert json.loads((init / "train.json").read_text())["steps"] == 1


def test_paper_presets_carry_the_five_settings():
    from bench.config import compose, to_dict

    settings = {}
    for name in ("di-pp-cfg1-rew0", "di-pp-cfg1-rew1", "di-pp-cfg4.5-rew0", "di-pp-cfg4.5-rew1", "di-pp-cfg4.5-rew10"):
        cfg = to_dict(compose([f"method={name}", "model=tiny-onestep"]))
        settings[name] = (cfg["method"]["alpha_cfg"], cfg["method"]["alpha_rew"])
        assert cfg["train"]["lr"] == 5e-6 and cfg["train"]["adam_betas"] == [0.0, 0.999] and cfg["train"]["batch_size"] == 256
        assert cfg["train"]["ema_decay"] == 0.95 and cfg["method"]["sigma_init"] == 2.5 and cfg["method"]["ta_lr"] == 5e-6
    assert sorted(settings.values()) == [(1.0, 0.0), (1.0, 1.0), (4.5, 0.0), (4.5, 1.0), (4.5, 10.0)]
    pre = to_dict(compose(["method=diff-instruct-paper"]))
    assert (pre["method"]["alpha_cfg"], pre["method"]["alpha_rew"], pre["train"]["batch_size"], pre["train"]["steps"]) == (4.5, 0.0, 1024, 16000)
    # the alignment starts from that pre-training, on the stand-in teacher's one-step config
    for name in settings:
        cfg = to_dict(compose([f"method={name}"]))
        assert cfg["method"]["init_from"] == "diff-instruct-paper" and cfg["model"]["name"] == pre["model"]["name"] == "sd15-onestep"
    onestep = pre["model"]["sampler"]
    assert (onestep["kind"], onestep["steps"], onestep["timesteps"], onestep["guidance"], onestep["scheduler_config"]) == ("euler", 1, [625], 1.0, {"timestep_spacing": "trailing"})


def test_di_pp_runs_end_to_end_and_starts_from_a_diff_instruct_checkpoint(cli):
    code, out, err = cli("train", "suite=smoke", "method=diff-instruct", "model=tiny", "train.steps=2", "train.batch_size=2", "train.save_every=1")
    assert code == 0, err
    ckpt = out.strip().split("checkpoint: ")[-1]
    code, out, err = cli("run", "suite=smoke", "model=tiny-onestep", "method=di-pp", "suite.limit=2", "train.steps=2", "train.batch_size=2", f"method.init={ckpt}")
    assert code == 0, err
    assert "smoke / tiny-onestep / di-pp vs" in out


def _onestep_fid():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "onestep_fid.py"
    spec = importlib.util.spec_from_file_location("onestep_fid", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow  # 150 training steps and three 256-image feature passes: about 100 s
def test_diff_instruct_moves_the_one_step_generator_toward_the_teacher(cli, tiny_cfg, cache_dir):
    """Frechet distance (bench.metrics.fid) on fixed pixel features (4x4 thumbnails of the decoded
    images) to the teacher's samples (tiny, 25 DDIM steps, CFG at the method's alpha_cfg 4.5)."""
    from bench.models import load_model
    from bench.trainer import Checkpoint, apply_checkpoint

    fid = _onestep_fid()
    code, out, err = cli("train", "suite=smoke", "method=diff-instruct", "model=tiny")
    assert code == 0, err
    ckpt = Checkpoint(Path(out.strip().split("checkpoint: ")[-1]), "")
    teacher = load_model(tiny_cfg, cache_dir)
    tuned = load_model(tiny_cfg, cache_dir)
    apply_checkpoint(tuned, ckpt)
    sigma_init, n = float(model_sigmas(teacher)[625]), 256
    prompts = [p.strip() for p in (Path(__file__).resolve().parents[1] / "suites" / "smoke" / "eval.txt").read_text().splitlines() if p.strip()]
    ref = fid.feature_stats(lambda ps, gens: teacher.sample(ps, gens, fid.teacher_sampler(teacher, 25, 4.5)), teacher, prompts, n, 10_000)
    base = fid.feature_stats(fid.one_step_sampler(teacher, teacher.unet, sigma_init), teacher, prompts, n, 0)
    trained = fid.feature_stats(fid.one_step_sampler(tuned, tuned.unet, sigma_init), tuned, prompts, n, 0)
    before, after = fid.distance(base, ref), fid.distance(trained, ref)
    assert after < 0.8 * before, (before, after)


def test_with_lora_the_ta_starts_as_the_teacher_not_the_generator(tiny64):
    from bench.trainer import add_lora

    model = copy.deepcopy(tiny64)
    add_lora(model.unet, 4, 4, seed=0)
    with torch.no_grad():  # a generator whose adapters already moved it away from the teacher
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel()), dtype=p.dtype))
    ctx = TrainContext(model, PROMPTS, None, 0, torch.device("cpu"), 2, progress=False)
    method = DiffInstructPP({**CFG, "alpha_rew": 0.0})
    method.prepare(ctx)
    x = torch.randn((2, *model.latent_shape()), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigma, cond = torch.tensor([0.3, 3.0], dtype=torch.float64), model.encode_prompts(PROMPTS[:2])
    with torch.no_grad():
        ta = edm_denoise(model, method.ta, x, sigma, cond)
        with ctx.reference():
            teacher = edm_denoise(model, model.unet, x, sigma, cond)
        generator = edm_denoise(model, model.unet, x, sigma, cond)
    assert torch.allclose(ta, teacher, rtol=1e-12, atol=1e-12) and not torch.allclose(ta, generator, atol=1e-6)
    assert all("lora_" not in n for n, p in method.ta.named_parameters() if p.requires_grad)
