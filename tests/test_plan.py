"""``bench plan``: the work and the estimated peak GPU memory of a command, without weights.

* every paper and official preset (a method preset naming its base model) plans offline, from the
  shipped activation profiles alone, under 80 GB, and prints where it differs from its authors' code;
* the real architectures' parameter counts equal the published ones;
* the estimate agrees with memory measured on a real run of the tiny models on CPU: a training
  micro-batch to 10% and a generation batch to 20% (the estimate leaves out the conditioning
  tensors, the CFG combination and the sampler's latents, tens of kB a sample that are about a
  tenth of a tiny model's activations and a thousandth of SDXL's at 1024 px);
* the CUDA autocast the profiles emulate on the meta device equals the dispatcher's own on fake CUDA
  tensors, and the planner's bookkeeping leaves every checkpoint key as it was.
"""

from __future__ import annotations

import socket

import pytest

from bench.plan.planner import LIMIT, make_plan, preset_commands

PRESETS = preset_commands()


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError("bench plan must not touch the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def shipped():
    """Only the profiles shipped in bench/plan/profiles.json: a preset whose profile is missing fails."""
    from bench.plan.store import Profiles

    return Profiles(None, measure=False)


def test_every_paper_and_official_preset_is_covered():
    names = {a[0].split("=", 1)[1] for a in PRESETS}
    assert {"pso-online-dmd2-official", "pso-online-turbo-official", "pso-dreambooth-official", "diffusion-dpo-sdxl", "spo-sd15", "lasro-sdxl-turbo"} <= names
    assert len(names) >= 25


@pytest.mark.parametrize("args", PRESETS, ids=[a[0].split("=", 1)[1] for a in PRESETS])
def test_preset_plans_offline_under_80_gb_with_its_differences(args, shipped, no_network, tmp_path):
    """``bench run`` of the preset on PartiPrompts (DreamBench for the customization presets): the base
    model's evaluation leaves its five learned metrics loaded through the training, the heaviest suite."""
    suite = [] if any(a.startswith("suite=") for a in args) else ["suite=parti"]
    plan = make_plan("run", [*args, *suite, f"cache_dir={tmp_path}"], profiles=shipped)
    text = plan.text()
    assert plan.peak_bytes < LIMIT, text
    assert {p.name for p in plan.phases} >= {"evaluation", "training micro-batch", "optimizer step"}
    assert plan.differences, f"{args[0]} records no code_differences"
    assert "where the preset differs from the authors' code:" in text
    assert all(f"  - {d}" in text for d in plan.differences)
    assert "UNet sample-passes" in text and "with gradient" in text and "images per model" in text


def test_cli_plan_prints_work_memory_and_differences(cli):
    code, out, err = cli("plan", "method=pso-offline-dmd2", "suite=parti", "suite.limit=8")
    assert code == 0, err
    assert "8 prompts" in out and "sdxl-unet" in out and "UNet sample-passes 24 with gradient (1 x 24)" in out
    assert "estimated peak GPU memory" in out and "under one 80 GB GPU" in out
    assert "offline PSO's code is not released" in out
    code, out, err = cli("plan", "eval", "suite=smoke", "model=tiny")
    assert code == 0, err
    assert "32 prompts" in out and "evaluation" in out and "training" not in out


def test_protocol_plan_lists_its_cells(cli):
    code, out, err = cli("plan", "method=pso-online-dmd2", "protocol=pso-table1", "model=sdxl-dmd2")
    assert code == 0, err
    assert "protocol pso-table1" in out and "pickapic" in out and "parti" in out


def test_real_architecture_parameter_counts():
    from bench.plan import arch

    assert arch.parameter_count(arch._component("unet", "sdxl-unet")) == 2_567_463_684
    assert arch.parameter_count(arch._component("unet", "sd15-unet")) == 859_520_964
    published = [p.stem for p in arch.CONFIG_DIR.glob("*.json") if arch.load_config(p.stem).get("_parameters")]
    assert {"clip-vit-l14-text", "clip-vit-bigg14-text", "sd-vae", "sdxl-vae"} <= set(published)
    for name in published:
        cfg = arch.load_config(name)
        assert arch.parameter_count(arch.Component("x", cfg["_class"], arch.public(cfg), name)) == cfg["_parameters"], name
    # the distilled UNets: LCM adds the guidance embedding's projection; SSD-1B and Segmind-Vega are SDXL with blocks removed
    lcm = arch.parameter_count(arch._component("unet", "lcm-sdxl-unet"))
    assert lcm - 2_567_463_684 == 256 * 320  # cond_proj: Linear(256, 320), no bias
    assert 1.30e9 < arch.parameter_count(arch._component("unet", "ssd-1b-unet")) < 1.35e9  # "1.3B"
    assert 0.74e9 < arch.parameter_count(arch._component("unet", "segmind-vega-unet")) < 0.75e9  # "745M"


def test_lora_shapes_are_peft_s():
    from bench.plan import arch
    from bench.plan.profile import build_unet
    from bench.trainer import LORA_TARGETS

    for name, rank in (("sd15-unet", 4),):
        component = arch._component("unet", name)
        counted = sum(a * b for a, b in arch.lora_shapes(component, rank, LORA_TARGETS))
        unet = build_unet(component.config, rank, LORA_TARGETS, False)
        assert counted == sum(p.numel() for p in unet.parameters() if p.requires_grad)


@pytest.mark.slow  # about 9 s
def test_emulated_autocast_equals_the_dispatcher_s(tiny_cfg):
    """What a gradient-carrying pass keeps for its backward under bf16 autocast: the emulation on meta
    tensors (batch 1: per region + per pass + per sample) equals fake CUDA tensors under torch's own
    autocast, with LoRA adapters and with every weight trainable: the same saved tensors, and the
    same bytes to 0.1% (512 bytes of the time embedding's constants live a little longer on the meta
    device)."""
    from bench.plan import profile
    from bench.trainer import LORA_TARGETS

    config, side = tiny_cfg["build"]["unet"], 8
    setting = profile.Setting("float32", "bfloat16")
    for lora in (4, None):
        emulated = profile.unet_training(config, side, setting, lora, LORA_TARGETS, False)
        dispatcher = profile.fake_cuda_forward_saved(config, side, setting, lora, LORA_TARGETS)
        assert abs(emulated["per_region"] + emulated["per_pass"] + emulated["per_sample"] - dispatcher) <= 1e-3 * dispatcher


@pytest.mark.parametrize(
    "args",
    [
        ["method=diffusion-dpo", "model=tiny", "train.batch_size=16"],
        ["method=pso-offline", "model=tiny-fewstep", "train.batch_size=8"],
        ["method=sft", "model=tiny", "train.batch_size=16", "train.full_finetune=true", "train.lora_rank=0"],
    ],
    ids=["dpo-lora", "offline-pso", "sft-full"],
)
def test_tiny_training_micro_batch_estimate_vs_measured(args, cache_dir):
    from bench.plan import check

    r = check.training_micro_batch(args, cache_dir, "cpu")
    assert 0.9 < r["measured"] / r["estimated"] < 1.1, r


@pytest.mark.parametrize("model", ["tiny", "tiny-sdxl-fewstep"])
def test_tiny_generation_batch_estimate_vs_measured(model, cache_dir):
    """float32: in float64 (the CPU default) convolutions fall back to im2col kernels whose workspace,
    like cuDNN's on a GPU, is not in the estimate."""
    from bench.plan import check

    r = check.generation_batch([f"model={model}", "gen.dtype=float32"], cache_dir, "cpu")
    assert 0.9 < r["measured"] / r["estimated"] < 1.2, r


def test_code_differences_stay_out_of_the_checkpoint_key(tmp_path):
    from types import SimpleNamespace

    import torch

    from bench.config import compose, to_dict
    from bench.methods.diffusion_dpo import DiffusionDPO
    from bench.trainer import Trainer

    cfg = to_dict(compose(["method=diffusion-dpo-sdxl"]))
    model = SimpleNamespace(identity={"source": "x"}, sampler="s")
    key = lambda c: Trainer(c, model, DiffusionDPO(c["method"]), ["a"], None, torch.device("cpu"), tmp_path).train_id
    assert cfg["method"]["code_differences"]
    without = {**cfg, "method": {k: v for k, v in cfg["method"].items() if k != "code_differences"}}
    assert key(cfg) == key(without)
    assert key(cfg) != key({**cfg, "method": {**cfg["method"], "beta": 1.0}})


def test_plan_hooks_stay_out_of_the_recipe_hash():
    from bench.trainer import without_plan_hooks

    source = "class M:\n    x = 1\n\n    def loss(self):\n        return 1\n"
    hooked = source.replace("\n    def loss", "\n    def plan(self, p):\n        return p.work(p.passes())\n\n    def plan_micro(self, p):\n        return None\n\n    def loss") + "\n    def plan_prepare(self, p):\n        return None\n"
    assert without_plan_hooks(hooked) == source
    assert without_plan_hooks(source) is source


def test_shipped_profiles_record_what_they_measured():
    import json

    from bench.plan.store import SHIPPED, VERSION

    body = json.loads(SHIPPED.read_text())
    assert body["version"] == VERSION
    kinds = {entry["kind"] for entry in body["profiles"].values()}
    assert {"unet-train", "unet-forward", "vae-decode"} <= kinds
    assert all(entry["result"] for entry in body["profiles"].values())


@pytest.mark.slow
def test_shipped_profiles_are_measured_again_the_same():
    """Every shipped profile, measured again (about 5 minutes on 2 cores): the same bytes."""
    import json

    from bench.plan import arch, profile
    from bench.plan.store import SHIPPED

    checked = 0
    for key, entry in json.loads(SHIPPED.read_text())["profiles"].items():
        name = entry["component"]
        role = "vae" if entry["kind"].startswith("vae") else "unet"
        component = arch._component(role, name)
        setting = profile.Setting(entry["weights"], entry.get("autocast"))
        kind = entry["kind"]
        if kind == "unet-train":
            got = profile.unet_training(component.config, entry["side"], setting, entry["lora"] or None, entry.get("targets") or (), entry["checkpointing"])
        elif kind == "unet-encoder-train":
            got = profile.unet_encoder_training(component.config, entry["side"], setting, entry["checkpointing"])
        elif kind == "unet-forward":
            got = profile.unet_forward(component.config, entry["side"], setting)
        elif kind == "vae-decode":
            got = profile.vae_decode(component.config, entry["side"], setting)
        else:
            got = profile.vae_encode(component.config, entry["resolution"], setting)
        assert got == entry["result"], (key, entry)
        checked += 1
    assert checked


@pytest.mark.slow
def test_emulated_autocast_equals_the_dispatcher_s_on_sdxl():
    from bench.plan import arch, profile
    from bench.trainer import LORA_TARGETS

    config = arch._component("unet", "sdxl-unet").config
    setting = profile.Setting("float32", "bfloat16")
    emulated = profile.unet_training(config, 32, setting, 16, LORA_TARGETS, False)
    dispatcher = profile.fake_cuda_forward_saved(config, 32, setting, 16, LORA_TARGETS)
    assert abs(emulated["per_region"] + emulated["per_pass"] + emulated["per_sample"] - dispatcher) <= 1e-3 * dispatcher
