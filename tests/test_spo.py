"""SPO (Liang et al., CVPR 2025; RockeyCoss/SPO at 27a8642): the loss against the official expression,
the step-wise resampler's choices against the official compare-and-gather code, one optimizer step
moving the objective, rounds kept for resume, and the step-aware preference model's loading path
on tiny random weights saved in the official layout.

The "official" functions below are written out from the authors' code (``train_scripts/train_spo.py``,
``spo/custom_diffusers/ddim_with_logprob.py``, ``multi_sample_pipeline.py``,
``spo/preference_models/compare_funcs.py`` and ``models/time_conditioned_clip.py``); their module
cannot be imported here (it needs mmengine and transformers 4's CLIP internals).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from bench.errors import DataError, WeightsMissingError
from bench.method import RoundStore, TrainContext
from bench.methods.spo import SPO, best_and_worst, spo_loss, stepwise_resample
from bench.metrics.weightfree import Brightness
from bench.models.diffusion import Sampler
from conftest import interrupt_at, trained_weights, uninterrupted_weights

PROMPTS = ["a red apple", "a dark forest", "a white boat", "a small bird"]
CFG = {"beta": 10.0, "eps": 0.1, "num_candidates": 2, "divert_start_step": 0, "num_inner_step": 0, "threshold": 0.0,
       "logprob_reduction": "mean", "prompts_per_round": 4, "epochs_per_round": 1, "seed": 0, "reward": "brightness"}


def perturbed(model, scale=0.02, seed=1):
    """A copy whose LoRA B matrices are non-zero, so the model differs from its reference."""
    model = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


# ---- (a) the loss ---------------------------------------------------------------------------------
def official_ddim_logprob(alphas, eta, num_steps, model_output, timestep, sample, prev_sample):
    """``ddim_step_with_logprob`` (prediction_type epsilon, clip_sample False as SD1.5's scheduler)."""
    prev_timestep = torch.clamp(timestep - 1000 // num_steps, 0, 999)
    alpha_prod_t = alphas.gather(0, timestep).reshape(-1, 1, 1, 1)
    alpha_prod_t_prev = alphas.gather(0, prev_timestep).reshape(-1, 1, 1, 1)
    beta_prod_t = 1 - alpha_prod_t
    pred_original_sample = (sample - beta_prod_t ** 0.5 * model_output) / alpha_prod_t ** 0.5
    variance = (1 - alpha_prod_t_prev) / beta_prod_t * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** 0.5
    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t ** 2) ** 0.5 * model_output
    prev_sample_mean = alpha_prod_t_prev ** 0.5 * pred_original_sample + pred_sample_direction
    log_prob = (
        -((prev_sample.detach() - prev_sample_mean) ** 2) / (2 * std_dev_t ** 2)
        - torch.log(std_dev_t)
        - torch.log(torch.sqrt(2 * torch.as_tensor(math.pi)))
    )
    return log_prob.mean(dim=tuple(range(1, log_prob.ndim)))


def official_loss(model, states, step, prompts, beta, eps, guidance):
    """``train_spo.py``'s training step (train.cfg True): CFG noise predictions of the tuned and the
    frozen UNet for sample_0 (win) and sample_1 (lose), DDIM log-probabilities, clipped ratios."""
    timesteps = torch.tensor(model.timesteps())[step]
    embeds = model.encode_prompts(prompts).hidden
    neg = model.encode_prompts([""] * len(prompts)).hidden
    alphas = model.alphas_cumprod.to(states.dtype)
    unet = model.unet

    def cfg_pred(latents, ref):
        if ref:
            unet.disable_adapters()
        out = unet(torch.cat([latents] * 2), torch.cat([timesteps] * 2), torch.cat([neg, embeds])).sample
        unet.enable_adapters()
        uncond, text = out.chunk(2)
        return uncond + guidance * (text - uncond)

    probs = {}
    for s, (cur, nxt) in enumerate([(0, 1), (2, 3)]):
        for ref in (False, True):
            with torch.set_grad_enabled(not ref):
                pred = cfg_pred(states[:, cur], ref)
            probs[s, ref] = official_ddim_logprob(alphas, 1.0, model.sampler.steps, pred, timesteps, states[:, cur], states[:, nxt])
    ratio_0 = torch.clamp(torch.exp(probs[0, False] - probs[0, True]), 1 - eps, 1 + eps)
    ratio_1 = torch.clamp(torch.exp(probs[1, False] - probs[1, True]), 1 - eps, 1 + eps)
    return -torch.log(torch.sigmoid(beta * (torch.log(ratio_0)) - beta * (torch.log(ratio_1)))).mean()


def test_loss_equals_the_official_expression(fewstep_lora, monkeypatch):
    # the tiny weights with SPO's sampler: DDIM eta 1, classifier-free guidance in sampling and training
    model = perturbed(fewstep_lora, scale=0.01)
    model.sampler = Sampler(kind="ddim", steps=4, guidance=3.0, eta=1.0)  # 750, 500, 250, 0
    ctx = TrainContext(model, PROMPTS, Brightness(), 0, torch.device("cpu"), 6, progress=False)
    with torch.no_grad():
        _, traj, _ = model.sample(PROMPTS[:3] * 2, [torch.Generator().manual_seed(i) for i in range(6)], trajectory=True)
    traj = torch.stack(traj, 1)  # (6, 5, C, h, w)
    step = torch.tensor([0, 1, 2, 0, 1, 2])
    rows = torch.arange(6)
    other = torch.randn(6, *traj.shape[2:], generator=torch.Generator().manual_seed(5), dtype=traj.dtype)
    # a pair: the same x_t, the sampled x_{t-1} against another draw of the same Gaussian's scale
    states = torch.stack([traj[rows, step], traj[rows, step + 1], traj[rows, step], traj[rows, step + 1] + 0.3 * other], 1)
    batch = {"states": states, "step": step, "prompt_index": torch.tensor([0, 1, 2, 0, 1, 2])}
    method = SPO(CFG)
    monkeypatch.setattr(method, "next_units", lambda ctx, rounds=None: (0, batch, torch.arange(6)))
    params = [p for p in model.unet.parameters() if p.requires_grad]

    ours, logs = method.loss(ctx, {}, torch.Generator())
    grads_ours = torch.autograd.grad(ours, params)
    theirs = official_loss(model, states, step, PROMPTS[:3] * 2, 10.0, 0.1, 3.0)
    grads_theirs = torch.autograd.grad(theirs, params)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-9)
    assert abs(ours.item() - math.log(2)) > 1e-6  # the ratios moved off 1
    for a, b in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    assert sum(float(g.abs().sum()) for g in grads_ours) > 0
    assert 0.9 <= logs["ratio_win"] <= 1.1


def test_loss_by_hand_and_the_clip():
    sig = lambda v: 1 / (1 + math.exp(-v))
    win = torch.tensor([0.02, -0.3, 0.05], dtype=torch.float64)
    lose = torch.tensor([-0.01, 0.01, 0.4], dtype=torch.float64)
    got = spo_loss(win, lose, 10.0, 0.1)
    clip = lambda v: math.log(min(max(math.exp(v), 0.9), 1.1))
    for i in range(3):
        want = -math.log(sig(10 * clip(win[i].item()) - 10 * clip(lose[i].item())))
        assert got[i].item() == pytest.approx(want, rel=1e-12)
    x = torch.tensor([0.5], dtype=torch.float64, requires_grad=True)  # beyond the clip: no gradient
    spo_loss(x, torch.zeros(1, dtype=torch.float64), 10.0, 0.1).sum().backward()
    assert x.grad.item() == 0


# ---- (b) the step-wise resampler ------------------------------------------------------------------
def official_compare(scores, threshold):
    """``preference_score_compare``."""
    scores, indices = torch.sort(scores, dim=0, descending=True)
    indices = indices[[0, -1], :]
    scores = scores[[0, -1], :]
    scores = scores.softmax(dim=0)
    valid_samples = scores[0] - scores[1] > threshold
    return indices, valid_samples


def official_gather(all_prev_latents, indices, valid_samples):
    """The SD1.5 pipeline's ``valid_next_latents`` (2, valid, c, h, w) from the (K, b, c, h, w) candidates."""
    return torch.gather(
        all_prev_latents, dim=0, index=indices.unsqueeze(-1).unsqueeze(-1).unsqueeze(-1).expand(-1, -1, *all_prev_latents.shape[2:]),
    )[valid_samples.unsqueeze(0).unsqueeze(-1).unsqueeze(-1).unsqueeze(-1).expand(2, -1, *all_prev_latents.shape[2:])].reshape(2, -1, *all_prev_latents.shape[2:])


def test_pair_choice_equals_the_official_compare_and_gather():
    g = torch.Generator().manual_seed(0)
    scores = torch.tensor([[20.1, 21.0, 19.0, 22.0, 20.0, 18.2],
                           [20.5, 21.0, 19.9, 21.2, 20.0, 18.0],
                           [19.7, 21.0, 19.5, 22.4, 20.0, 18.1],
                           [20.0, 21.0, 19.2, 21.9, 20.0, 19.5]], dtype=torch.float64)
    scores[:, 3] = torch.tensor([21.6, 21.2, 21.7, 21.4], dtype=torch.float64)  # K = 4 candidates, 6 prompts
    candidates = torch.randn(4, 6, 4, 3, 3, generator=g)
    rows = torch.arange(6)
    for threshold in (0.3, 0.4, 0.0, -1.0):
        (win, lose), keep = best_and_worst(scores, threshold)
        indices, valid = official_compare(scores, threshold)
        assert torch.equal(torch.stack([win, lose]), indices) and torch.equal(keep, valid)
        pairs = official_gather(candidates, indices, valid)
        assert torch.equal(candidates[win, rows][keep], pairs[0]) and torch.equal(candidates[lose, rows][keep], pairs[1])
    # softmax(best, worst) gap = tanh(difference / 2): prompts 0 (0.8 apart: 0.38), 2 (0.9: 0.42) and 5 (1.5: 0.64) keep their
    # pair at 0.3; 3 (0.5: 0.24) and the ties (1, 4) do not; at 0.4 only 2 and 5
    assert best_and_worst(scores, 0.3)[1].tolist() == [True, False, True, False, False, True]
    assert best_and_worst(scores, 0.4)[1].tolist() == [False, False, True, False, False, True]


def test_resampling_continues_from_a_random_candidate(fewstep_lora):
    model = copy.deepcopy(fewstep_lora)
    seen = []

    def score(latents, prompts, t):  # a deterministic stand-in preference: mean of the predicted x0
        seen.append(t)
        return latents.double().flatten(1).mean(1).cpu()

    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    out = stepwise_resample(model, PROMPTS, gens, score, k=2, divert=0, inner=0, threshold=-1.0)
    assert seen == [749, 499, 249]  # each transition's candidates scored at their own timestep
    assert out["step"].tolist() == [0] * 4 + [1] * 4 + [2] * 4 and out["prompt"].tolist() == [0, 1, 2, 3] * 3
    xw, pw, xl, pl = out["x_t_win"], out["x_prev_win"], out["x_t_lose"], out["x_prev_lose"]
    assert torch.equal(xw, xl)  # SD1.5 mode: both candidates leave the same shared x_t
    # the recorded scores: the win candidate is the best, the lose the worst of its K
    cond = model.encode_prompts(PROMPTS * 2)
    with torch.no_grad():
        for j in range(3):  # transition j's candidates, scored at t_{j+1}
            t, units = model.timesteps()[j + 1], slice(4 * j, 4 * j + 4)
            x = torch.cat([pw[units], pl[units]])
            got = model.x0_from_eps(x, model.predict_eps(x, t, cond), t).double().flatten(1).mean(1)
            torch.testing.assert_close(got, torch.cat([out["scores"][:, j].max(0).values, out["scores"][:, j].min(0).values]), rtol=1e-9, atol=1e-12)
    # with K = 2 the next shared state is one of the two candidates: sometimes the worse one (random, not greedy)
    went = []
    for p in range(4):
        for j in (0, 1):
            nxt = xw[4 * (j + 1) + p]
            assert torch.equal(nxt, pw[4 * j + p]) or torch.equal(nxt, pl[4 * j + p])
            went.append(torch.equal(nxt, pw[4 * j + p]))
    assert any(went) and not all(went)
    # one prompt's chain does not depend on its batch mates
    alone = stepwise_resample(model, PROMPTS[2:3], [torch.Generator().manual_seed(2)], score, k=2, divert=0, inner=0, threshold=-1.0)
    torch.testing.assert_close(alone["x_prev_win"], pw[out["prompt"] == 2], rtol=1e-10, atol=1e-10)


def test_inner_steps_pair_whole_chains(fewstep_lora):
    """SDXL mode (num_inner_step): candidates branch, run alone, and every transition of the best and
    the worst chain is a pair under the one comparison, as ``multi_sample_pipeline_sdxl``."""
    model = copy.deepcopy(fewstep_lora)
    score = lambda latents, prompts, t: latents.double().flatten(1).mean(1).cpu()
    out = stepwise_resample(model, PROMPTS[:2], [torch.Generator().manual_seed(i) for i in range(2)], score, k=2, divert=0, inner=1, threshold=-1.0)
    assert out["step"].tolist() == [0, 0, 1, 1, 2, 2] and out["scores"].shape == (2, 2, 2)  # segments [0, 1] and [2]
    xw, pw, xl, pl = out["x_t_win"], out["x_prev_win"], out["x_t_lose"], out["x_prev_lose"]
    assert torch.equal(xw[:2], xl[:2])  # the branch leaves one shared state
    assert torch.equal(pw[:2], xw[2:4]) and torch.equal(pl[:2], xl[2:4])  # the inner transition continues the same chains
    assert not torch.equal(xw[2:4], xl[2:4])


# ---- (c) training moves the objective; rounds kept for resume -------------------------------------
def test_one_step_raises_the_win_margin(fewstep_lora, tmp_path):
    model = copy.deepcopy(fewstep_lora).to(dtype=torch.float32)
    ctx = TrainContext(model, PROMPTS, Brightness(), 0, torch.device("cpu"), 12, progress=False, rounds=RoundStore(tmp_path / "rounds"))
    method = SPO(CFG)
    method.prepare(ctx)
    r, batch, units = method.next_units(ctx)
    pairs = int(batch["step"].numel())
    assert r == 0 and pairs == 12 and json.loads((tmp_path / "rounds" / "index.json").read_text()) == {"pairs": [12]}

    def margin():
        from bench.methods.online import unit_log_probs

        with torch.no_grad():
            st = batch["states"]
            lr = unit_log_probs(ctx, torch.cat([st[:, 0], st[:, 2]]), torch.cat([st[:, 1], st[:, 3]]), batch["step"].repeat(2),
                                [PROMPTS[int(i)] for i in batch["prompt_index"]] * 2, reference=True)
            win, lose = lr.chunk(2)
            return float((win - lose).mean())

    assert margin() == 0
    opt = torch.optim.AdamW([p for p in model.unet.parameters() if p.requires_grad], lr=1e-3)
    loss, logs = method.loss(ctx, {}, torch.Generator())
    assert loss.item() == pytest.approx(math.log(2), rel=1e-6) and logs["round"] == 0
    loss.backward()
    opt.step()
    assert margin() > 0
    # the round is read back, not resampled, after the weights changed; the next step starts round 1
    assert torch.equal(method.next_units(ctx)[1]["states"], batch["states"])
    ctx.step = 1
    assert method.next_units(ctx)[0] == 1 and (tmp_path / "rounds" / "round-000001.safetensors").exists()
    assert len(json.loads((tmp_path / "rounds" / "index.json").read_text())["pairs"]) == 2


def test_rounds_without_pairs_are_skipped_then_refused(fewstep_lora, tmp_path):
    """A round whose pairs all fail the threshold takes no step (the code skips it); an epoch of them is an error."""
    from bench.errors import TrainingError

    class Flat(Brightness):
        def score(self, images, prompts, refs=None):
            return torch.zeros(len(images), dtype=torch.float64)

    ctx = TrainContext(copy.deepcopy(fewstep_lora), PROMPTS, Flat(), 0, torch.device("cpu"), 4, progress=False, rounds=RoundStore(tmp_path / "rounds"))
    method = SPO(dict(CFG, prompts_per_round=2))  # 2 rounds an epoch
    method.prepare(ctx)
    with pytest.raises(TrainingError, match="no pair passed method.threshold=0.0 in 2 rounds"):
        method.next_units(ctx)
    assert json.loads((tmp_path / "rounds" / "index.json").read_text()) == {"pairs": [0, 0]}


def test_bench_train_spo_end_to_end(cli):
    args = ["suite=smoke", "model=tiny-fewstep", "method=spo", "train.steps=4", "train.batch_size=4", "method.prompts_per_round=2",
            "method.num_candidates=2", "train.save_every=2", "suite.limit=2"]
    code, out, err = cli("train", *args)
    assert code == 0, err
    ckpt = Path(out.split("checkpoint: ")[1].strip())
    data = json.loads((ckpt / "train.json").read_text())["data"]
    # a round: 2 prompts x 3 stochastic transitions = 6 pairs, ceil(6 / 4) = 2 optimizer steps
    assert data["source"] == "online, step-wise resampling" and data["rounds"] == 2 and data["pairs"] == 12 and data["pairs_per_round"] == [6, 6]
    assert json.loads((ckpt.parent / "rounds" / "index.json").read_text())["pairs"] == [6, 6]
    # rounds before the last checkpoint's (step 2: round 1) are deleted when they cannot be needed
    assert sorted(p.name for p in (ckpt.parent / "rounds").glob("*.safetensors")) == ["round-000001.safetensors"]
    code, again, err = cli("train", *args)
    assert code == 0 and again == out, err  # cached


# ---- (d) the step-aware preference model ----------------------------------------------------------
@pytest.fixture
def spm_files(tmp_path):
    """Random tiny weights in the official layout: the config folder (PickScore_v1's role), the
    ``.bin`` state dict of the wrapper (``model.*`` keys), the tokenizer folder."""
    from bench.metrics.clip import clip_tokenizer_dir
    from bench.metrics.step_aware import StepAwarePreferenceModel, tiny_config

    config = tiny_config()
    torch.manual_seed(3)
    model = StepAwarePreferenceModel(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.02 if p.dim() > 1 else 0.1) + (1.0 if "layer_norm" in name and name.endswith("weight") else 0.0))
        model.model.logit_scale.fill_(math.log(100.0))
    config.save_pretrained(tmp_path / "pickscore")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(state, tmp_path / "sd-v1-5_step-aware_preference_model.bin")
    return tmp_path, state, str(clip_tokenizer_dir())


def metric_on(files, tokenizer):
    from bench.metrics.step_aware import StepAwarePreference

    metric = StepAwarePreference()
    metric.checkpoint = str(files / "sd-v1-5_step-aware_preference_model.bin")
    metric.config_source = str(files / "pickscore")
    metric.tokenizer_source = tokenizer
    return metric


def official_image_features(state, config, pixel_values, timesteps):
    """``HFTimeConditionedCLIPModel.get_image_features`` written out on the state dict (eager attention)."""
    import torch.nn.functional as F

    from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

    vc = config.vision_config
    w = lambda k: state[f"model.{k}"]
    lin = lambda x, k, bias=True: F.linear(x, w(f"{k}.weight"), w(f"{k}.bias") if bias else None)
    ln = lambda x, k: F.layer_norm(x, (vc.hidden_size,), w(f"{k}.weight"), w(f"{k}.bias"), vc.layer_norm_eps)
    half = 128
    freqs = torch.exp(-math.log(10000) * torch.arange(start=0, end=half, dtype=torch.float32) / half)
    args = timesteps[:, None].float() * freqs[None]
    t = lin(F.silu(lin(torch.cat([torch.cos(args), torch.sin(args)], dim=-1), "t_embedder.mlp.0")), "t_embedder.mlp.2")
    emb = CLIPVisionEmbeddings(vc)
    emb.load_state_dict({k[len("model.vision_model.embeddings."):]: v for k, v in state.items() if k.startswith("model.vision_model.embeddings.")}, strict=False)
    h = ln(emb(pixel_values), "vision_model.pre_layrnorm")
    heads = vc.num_attention_heads
    for i in range(vc.num_hidden_layers):
        p = f"vision_model.encoder.layers.{i}"
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = lin(F.silu(t), f"{p}.adaLN_modulation.1").chunk(6, dim=1)
        x = ln(h, f"{p}.layer_norm1") * (1 + scale_msa.unsqueeze(1)) + shift_msa.unsqueeze(1)
        q, k, v = (lin(x, f"{p}.self_attn.{n}_proj").unflatten(-1, (heads, -1)).transpose(1, 2) for n in "qkv")
        att = torch.softmax(q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1) @ v
        h = h + lin(att.transpose(1, 2).flatten(2), f"{p}.self_attn.out_proj") * gate_msa.unsqueeze(1)
        x = ln(h, f"{p}.layer_norm2") * (1 + scale_mlp.unsqueeze(1)) + shift_mlp.unsqueeze(1)
        fc1 = lin(x, f"{p}.mlp.fc1")
        h = h + lin(fc1 * torch.sigmoid(1.702 * fc1), f"{p}.mlp.fc2") * gate_mlp.unsqueeze(1)  # quick_gelu, CLIP's hidden_act
    pooled = ln(h[:, 0, :], "vision_model.post_layernorm")
    shift, scale = lin(F.silu(t), "vision_model.adaLN_modulation.1").chunk(2, dim=1)
    return F.linear(pooled * (1 + scale) + shift, w("visual_projection.weight"))


def official_preference_score(state, config, tokenizer, images, prompts, timesteps):
    """``get_preference_score``: resize, crop, clamp, normalize; text features as CLIPModel's."""
    import torch.nn.functional as F
    from torchvision import transforms

    from transformers import CLIPModel

    shortest = min(images.size(-2), images.size(-1))
    scale = 224 / shortest
    new_size = (int(images.size(-2) * scale + 0.5), int(images.size(-1) * scale + 0.5))
    images = F.interpolate(images, size=new_size, mode="bicubic", align_corners=False)
    if new_size[0] != new_size[1]:
        images = transforms.CenterCrop(size=224)(images)
    images = (images / 2 + 0.5).clamp(0, 1).float()
    images = transforms.Normalize(mean=[0.48145466, 0.4578275, 0.40821073], std=[0.26862954, 0.26130258, 0.27577711])(images)
    image = official_image_features(state, config, images, timesteps)
    image = image / torch.norm(image, dim=-1, keepdim=True)
    clip = CLIPModel(config)
    clip.load_state_dict({k[len("model."):]: v for k, v in state.items() if k.startswith("model.text_") or k == "model.logit_scale"}, strict=False)
    ids = tokenizer(prompts, max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids
    text = clip.get_text_features(input_ids=ids)
    text = text if torch.is_tensor(text) else text.pooler_output
    text = text / torch.norm(text, dim=-1, keepdim=True)
    return state["model.logit_scale"].exp() * (image * text).sum(dim=-1)


def test_step_aware_model_loads_the_official_layout(spm_files):
    from transformers import CLIPConfig, CLIPTokenizer

    from bench.metrics import _LOADED

    files, state, tokenizer_dir = spm_files
    metric = metric_on(files, tokenizer_dir)
    model, tokenizer = metric.loaded()
    loaded = model.state_dict()
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 32, 48, generator=g) * 2.2 - 1.1  # the decoder's range, unclamped; not square: resize then crop
    prompts = ["a red apple", "", "an astronaut riding a horse " * 20]
    t = torch.tensor([951.0, 501.0, 0.0])
    got = metric.score_at(images, prompts, t)
    want = official_preference_score(state, CLIPConfig.from_pretrained(files / "pickscore"), CLIPTokenizer.from_pretrained(tokenizer_dir), images, prompts, t)
    torch.testing.assert_close(got, want.double(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(metric.score_at(images, prompts, torch.zeros(3)), got)  # the timestep matters
    # as a metric: stored images in [0, 1] at t = 0
    torch.testing.assert_close(metric.score((images[:1] + 1).clamp(0, 2) / 2, prompts[:1]), metric.score_at((images[:1] + 1).clamp(0, 2) - 1, prompts[:1], [0.0]))
    for key in [k for k in _LOADED if k[0] == "step-aware"]:
        del _LOADED[key]


def test_step_aware_loading_rules_and_offline_error(spm_files, monkeypatch):
    from bench.metrics import _LOADED
    from bench.metrics.step_aware import StepAwarePreference, load_step_aware, tiny_config

    files, state, _ = spm_files
    path = files / "sd-v1-5_step-aware_preference_model.bin"
    # an unexpected key equal to the module's value is accepted (the official assert), a different one is not
    extra = dict(state, **{"model.vision_model.embeddings.position_ids": torch.arange(50).unsqueeze(0)})
    torch.save(extra, path)
    load_step_aware(path, tiny_config())
    torch.save(dict(extra, **{"model.vision_model.embeddings.position_ids": torch.arange(1, 51).unsqueeze(0)}), path)
    with pytest.raises(DataError, match="differs"):
        load_step_aware(path, tiny_config())
    torch.save({k: v for k, v in state.items() if "t_embedder" not in k}, path)
    with pytest.raises(DataError, match="missing keys"):
        load_step_aware(path, tiny_config())
    # offline without the files: one line naming them and bench prefetch
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metric = StepAwarePreference()
    with pytest.raises(WeightsMissingError) as err:
        metric.score(torch.rand(1, 3, 32, 32), ["a cat"])
    message = str(err.value)
    assert "\n" not in message and "bench prefetch metrics=spm-sd15" in message
    assert "sd-v1-5_step-aware_preference_model.bin" in message and "Step-Aware_Preference_Models" in message and "PickScore_v1" in message
    assert not [k for k in _LOADED if k[0] == "step-aware" and k[3] == "official"]


def test_spo_scores_chains_with_the_step_aware_model(fewstep_lora):
    """With a step-aware reward, chains are scored on the unclamped decoded x0 prediction at their
    timestep (scorers=tiny: the same code path on random weights)."""
    from bench.metrics.step_aware import StepAwarePreference

    model = copy.deepcopy(fewstep_lora)
    reward = StepAwarePreference(scorers="tiny")
    calls = []
    real = reward.score_at

    def spy(images, prompts, timesteps):
        calls.append((images.detach().clone(), list(timesteps.tolist())))
        return real(images, prompts, timesteps)

    reward.score_at = spy
    ctx = TrainContext(model, PROMPTS, reward, 0, torch.device("cpu"), 4, progress=False)
    method = SPO(dict(CFG, reward="spm-sd15"))
    out = stepwise_resample(model, PROMPTS[:2], [torch.Generator().manual_seed(i) for i in range(2)], method.score_fn(ctx), 2, 0, 0, -1.0)
    assert [c[1] for c in calls] == [[749.0] * 4, [499.0] * 4, [249.0] * 4]
    assert out["scores"].shape == (2, 3, 2) and out["scores"].dtype == torch.float64
    images = calls[0][0]
    assert images.shape == (4, 3, 32, 32) and (images.min() < 0 or images.max() > 1)  # in the decoder's range, not [0, 1] pixels


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_weights(cli, cache_dir, tmp_path, monkeypatch):
    """A run killed after its checkpoint at step 2 (round 1 already sampled) resumes from the kept
    round and its index, and ends with the weights of an uninterrupted run."""
    args = ["suite=smoke", "model=tiny-fewstep", "method=spo", "train.steps=4", "train.batch_size=4", "method.prompts_per_round=2",
            "method.num_candidates=2", "train.save_every=2"]
    want = uninterrupted_weights(cli, cache_dir, tmp_path, args)
    undo = interrupt_at(monkeypatch, SPO, 3)
    code, _, err = cli("train", *args)
    assert code == 130, err  # "interrupted; finished work is kept"
    rounds = Path(cache_dir) / "checkpoints"
    assert [p.name for p in rounds.glob("spo-*/step-*")] == ["step-0000002"] and len(list(rounds.glob("spo-*/rounds/round-000001.safetensors"))) == 1
    undo()
    code, out, err = cli("train", *args)
    assert code == 0, err
    got = trained_weights(out)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_spo_raises_brightness_on_micro(cli, tmp_path):
    """A short run on the micro suite (brightness reward) beats the base model on most prompts."""
    code, out, err = cli("run", "suite=smoke", "model=tiny-fewstep", "method=spo", "train.steps=60")
    assert code == 0, err
    run = Path(out.split("run folder: ")[1].split()[0])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["winrate"]["brightness"]["value"] >= 0.8
