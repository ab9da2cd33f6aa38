"""Training on a pair dataset end to end (`bench train method=... data=FILE.parquet`), the paper
presets' settings, and the trainer's learning-rate schedule."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench.config import compose
from bench.registry import METHODS
from bench.trainer import lr_factor, peak_lr


@pytest.mark.parametrize("method", ["dspo", "diffusion-dpo"])
def test_train_on_a_parquet_file_records_the_data(cli, pairs_parquet, method):
    args = ("train", f"method={method}", f"data={pairs_parquet}", "data.shuffle_buffer=0", "train.steps=3", "train.batch_size=2", "train.save_every=100")
    code, out, err = cli(*args)
    assert code == 0, err
    ckpt = Path(out.strip().split("checkpoint: ")[1])
    meta = json.loads((ckpt / "train.json").read_text())
    # 3 steps x 2 pairs = 6 pairs from a file of 4 pairs and 2 ties (rows 2 and 4): all 6 rows of the
    # first epoch, then rows 0 and 1 of the second
    assert meta["data"]["source"] == str(pairs_parquet)
    assert (meta["data"]["pairs"], meta["data"]["ties_dropped"], meta["data"]["rows_read"]) == (6, 2, 8)
    assert len(meta["history"]) == 3 and all(math.isfinite(h) for h in meta["history"])
    # the same command again reuses the checkpoint; another dataset setting trains anew
    code, out2, _ = cli(*args)
    assert code == 0 and out2 == out
    code, out3, _ = cli(*args, "data.drop_ties=false")
    assert code == 0 and out3 != out


def test_paper_preset_offline_names_the_missing_weights(cli):
    code, out, err = cli("train", "method=dspo-sd15", "data=pickapic-v2")
    assert code == 5 and out == ""
    assert len(err.strip().splitlines()) == 1
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in err and "bench prefetch model=sd15" in err


def test_sdxl_preset_offline_names_the_missing_weights(cli):
    code, out, err = cli("train", "method=pso-offline-dmd2", "data=pickapic-v2")
    assert code == 5 and out == "" and len(err.strip().splitlines()) == 1
    assert "stabilityai/stable-diffusion-xl-base-1.0" in err and "bench prefetch model=sdxl-dmd2" in err


def test_presets_carry_the_papers_settings():
    dspo = compose(["method=dspo-sd15"])
    assert dspo.model.name == "sd15" and dspo.method.lam == 0.001 and dspo.method.form == "sd15"
    assert peak_lr(dspo.train) == pytest.approx(2.048e-5)  # 1e-8 x 16 x 128, the code's effective rate
    assert dspo.train.full_finetune and dspo.train.warmup_steps == 500 and dspo.method.prompt_dropout == 0.2
    sdxl = compose(["method=dspo-sdxl"])
    assert sdxl.model.name == "sdxl" and sdxl.method.lam == 5000 and sdxl.train.optimizer == "adafactor"
    assert sdxl.train.batch_size * sdxl.train.grad_accum == 2048 and peak_lr(sdxl.train) == pytest.approx(2.048e-5)
    dpo = compose(["method=diffusion-dpo-sd15"])
    assert dpo.method.beta == 5000 and dpo.method.beta_convention == "salesforce"
    for base, rank in [("dmd2", 16), ("turbo", 16), ("lcm", 32)]:
        pso = compose([f"method=pso-offline-{base}"])
        assert (pso.method.beta, pso.train.lr, pso.train.batch_size, pso.train.steps, pso.train.lora_rank) == (50, 1e-5, 64, 5000, rank)
    # an explicit model= wins over the preset's base
    assert compose(["method=dspo-sd15", "model=tiny"]).model.name == "tiny"
    assert {n for n in METHODS.names()} >= {"dspo", "dspo-sd15", "dspo-sdxl", "pso-offline", "diffusion-kto", "mapo", "sft-sd15"}


def test_learning_rate_schedules():
    assert [lr_factor("constant_with_warmup", s, 4, 10) for s in (0, 1, 4, 9)] == [0.0, 0.25, 1.0, 1.0]
    assert lr_factor("linear", 7, 2, 12) == pytest.approx(0.5)
    assert lr_factor("cosine", 7, 2, 12) == pytest.approx(0.5)
    assert lr_factor("constant", 0, 0, 10) == 1.0


def test_unknown_schedule_or_optimizer_fails_before_any_work(cli):
    code, _, err = cli("train", "method=sft", "train.lr_schedule=exponential")  # refused at composition (bench.schema): a usage error
    assert code == 2 and "train.lr_schedule=exponential" in err and "constant_with_warmup" in err
    code, _, err = cli("train", "method=sft", "train.optimizer=lion")
    assert code == 2 and "train.optimizer=lion" in err


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
def test_optimizer_state_round_trips_through_a_checkpoint(name, tmp_path):
    """Resume needs the exact optimizer state; Adafactor keeps a plain-int step next to its tensors."""
    import torch
    from safetensors.torch import load_file, save_file

    from bench.io import write_json
    from bench.trainer import _load_optimizer, _optimizer_tensors, make_optimizer

    tc = {"optimizer": name, "lr": 1e-2, "weight_decay": 0.01, "scale_lr": False, "batch_size": 1, "grad_accum": 1}

    def fresh():
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.randn(6, 5))
        return w, make_optimizer([w], tc)

    def step(w, opt, k):
        loss = ((w - k) ** 2).sum()
        loss.backward()
        opt.step()
        opt.zero_grad()

    w1, opt1 = fresh()
    for k in range(3):
        step(w1, opt1, k)
    tensors, meta = _optimizer_tensors(opt1)
    save_file(tensors, tmp_path / "opt.safetensors")
    write_json(tmp_path / "meta.json", meta)

    w2, opt2 = fresh()
    with torch.no_grad():
        w2.copy_(w1)
    _load_optimizer(opt2, load_file(tmp_path / "opt.safetensors"), json.loads((tmp_path / "meta.json").read_text()))
    step(w1, opt1, 3)
    step(w2, opt2, 3)
    assert torch.equal(w1, w2)


def test_missing_data_file_is_named(cli, tmp_path):
    code, _, err = cli("train", "method=dspo", f"data={tmp_path / 'missing.parquet'}")
    assert code == 2 and "no such file or folder" in err and "missing.parquet" in err


@pytest.mark.parametrize("name", ["diffusion-dpo-sd15", "diffusion-dpo-sdxl", "dspo-sd15", "dspo-sdxl", "sft-sd15", "diffusion-kto-sd15", "mapo-sdxl",
                                  "pso-offline-dmd2", "pso-offline-turbo", "pso-offline-lcm"])
def test_offline_paper_presets_name_their_data_and_base(name):
    """`bench run suite=pickapic method=<preset>` streams Pick-a-Pic v2 (ties dropped) into the paper's base
    model, instead of stopping to ask for data=."""
    cfg = compose([f"method={name}"])
    assert cfg.data.source == "yuvalkirstain/pickapic_v2" and cfg.data.split == "train" and cfg.data.drop_ties
    assert cfg.model.name == cfg.method.base_model and cfg.model.name in {"sd15", "sdxl", "sdxl-dmd2", "sdxl-turbo", "sdxl-lcm"}
    assert compose([f"method={name}", "data=pokemon-blip-captions"]).data.name == "pokemon-blip-captions"  # data= still wins
