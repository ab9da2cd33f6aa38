"""`bench plan`'s memory estimate against the memory a real run allocates.

    python benchmarks/plan_memory.py                 # CUDA: the tiny cases, then real architectures with random weights
    python benchmarks/plan_memory.py device=cpu      # the tiny cases on the CPU allocator (what tests/test_plan.py checks)
    python benchmarks/plan_memory.py cases=tiny      # or cases=real, or both (the default)

Measured is ``torch.cuda.max_memory_allocated`` above what is allocated before the step (on the CPU:
the allocator's events, ``bench.plan.check``). Estimated is the plan's activation and working-memory
terms, from the activation profiles ``bench plan`` reads (``bench/plan/profiles.json``, or measured
now on the meta device and kept in ``$BENCH_HOME/plan``).

* tiny: a real training micro-batch of offline pair methods (DPO with LoRA, offline PSO, SFT with
  full fine-tuning) on the embedded tiny models, and a real generation batch (sampling and decoding),
  through the harness's own code (``bench.plan.check``).
* real: the UNets of SDXL (2.57B parameters, 1024 px) and SD1.5 (512 px) built from
  ``bench/plan/configs`` with uninitialized weights on the GPU (nothing downloaded): a LoRA micro-batch
  (float32 weights, bf16 autocast, gradient checkpointing, two passes, as online PSO holds them), a
  full fine-tuning one (no checkpointing), a float16 generation pass with CFG, and the VAE's float16
  decode; each also as the absolute peak against weights + gradients + the estimate.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

GB = 1e9


def row(case: str, estimated: int, measured: int, seconds: float) -> str:
    ratio = measured / estimated if estimated else float("nan")
    return f"| {case} | {estimated / 1e6:,.1f} | {measured / 1e6:,.1f} | {ratio:.3f} | {seconds:.1f} |"


def allocated(device: str, module: torch.nn.Module) -> int:
    if device == "cuda":
        return torch.cuda.memory_allocated()
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()] + [p.grad for p in module.parameters() if p.grad is not None])


def tiny_cases(device: str, cache: Path) -> list[str]:
    from bench.plan import check

    lines = []
    for args in (
        ["method=diffusion-dpo", "model=tiny", "train.batch_size=16"],
        ["method=pso-offline", "model=tiny-fewstep", "train.batch_size=8"],
        ["method=sft", "model=tiny", "train.batch_size=16", "train.full_finetune=true", "train.lora_rank=0"],
    ):
        t = time.perf_counter()
        r = check.training_micro_batch(args, cache, device)
        lines.append(row(f"tiny training micro-batch: {' '.join(args)}", r["estimated"], r["measured"], time.perf_counter() - t))
    for args in (["model=tiny", "gen.dtype=float32"], ["model=tiny-sdxl-fewstep", "gen.batch_size=16", "gen.dtype=float32" if device == "cpu" else "gen.dtype=auto"]):
        t = time.perf_counter()
        r = check.generation_batch(args, cache, device)
        lines.append(row(f"tiny generation batch: {' '.join(args)}", r["estimated"], r["measured"], time.perf_counter() - t))
    return lines


def real_unet(name: str, lora: int | None, checkpointing: bool, dtype: torch.dtype, device: str):
    """A UNet of ``bench/plan/configs`` on ``device`` with uninitialized weights (values do not change memory)."""
    from bench.plan import arch, profile
    from bench.trainer import LORA_TARGETS

    component = arch._component("unet", name)
    unet = profile.build_unet(component.config, lora, LORA_TARGETS, False, dtype)
    unet = unet.to_empty(device=device)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    return component, unet


def real_training(name: str, side: int, lora: int | None, checkpointing: bool, samples: int, passes: int, device: str, profiles) -> str:
    from bench.plan import profile, store
    from bench.trainer import LORA_TARGETS

    t = time.perf_counter()
    setting = profile.Setting("float32", "bfloat16")
    component, unet = real_unet(name, lora, checkpointing, torch.float32, device)
    unet.train()
    trainable = [p for p in unet.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.zeros_like(p)
    inputs = [profile.unet_inputs(component.config, side, samples, torch.float32, device="meta") for _ in range(passes)]
    inputs = [{k: ({kk: torch.randn(vv.shape, device=device) for kk, vv in v.items()} if isinstance(v, dict) else torch.randn(v.shape, device=device) if v.is_floating_point() else torch.full(v.shape, 500, device=device))
               for k, v in kw.items()} for kw in inputs]
    weights = allocated(device, unet)

    def step():
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = sum(unet(**kw).sample.float().square().mean() for kw in inputs)
        loss.backward()

    from bench.plan.check import peak

    measured = peak(step, device)
    g = store.unet_training(profiles, component, side, setting, lora, LORA_TARGETS, checkpointing)
    n = samples * passes
    estimated = g["per_region"] + passes * g["per_pass"] + n * g["per_sample"] + max(
        g["backward_const"] + g["backward_per_sample"] * samples, g["forward_const"] + g["forward_per_sample"] * samples
    )
    what = f"LoRA {lora}" if lora else "full fine-tuning"
    case = f"{name} at {side * 8} px, {what}, checkpointing {'on' if checkpointing else 'off'}, {passes} x {samples} samples, bf16 autocast"
    absolute = f"| {case}: absolute, with the weights and gradients ({weights / GB:.2f} GB) | {(weights + estimated) / 1e6:,.1f} | {(weights + measured) / 1e6:,.1f} | {(weights + measured) / (weights + estimated):.3f} | |"
    del unet, trainable, inputs
    if device == "cuda":
        torch.cuda.empty_cache()
    return row(case, estimated, measured, time.perf_counter() - t) + "\n" + absolute


def real_generation(name: str, vae_name: str, side: int, batch: int, cfg: int, device: str, profiles) -> list[str]:
    from bench.plan import arch, profile, store
    from bench.plan.check import peak

    setting = profile.Setting("float16")
    t = time.perf_counter()
    component, unet = real_unet(name, None, False, torch.float16, device)
    unet.eval().requires_grad_(False)
    kw = profile.unet_inputs(component.config, side, batch * cfg, torch.float16, device="meta")
    kw = {k: ({kk: torch.randn(vv.shape, device=device, dtype=torch.float16) for kk, vv in v.items()} if isinstance(v, dict) else
              torch.randn(v.shape, device=device, dtype=torch.float16) if v.is_floating_point() else torch.full(v.shape, 500, device=device)) for k, v in kw.items()}
    with torch.no_grad():
        measured = peak(lambda: unet(**kw).sample, device)
    f = store.unet_forward(profiles, component, side, setting)
    lines = [row(f"{name} generation pass, {batch * cfg} samples at {side * 8} px, float16", f["const"] + f["per_sample"] * batch * cfg, measured, time.perf_counter() - t)]
    del unet, kw
    if device == "cuda":
        torch.cuda.empty_cache()
    t = time.perf_counter()
    vae_component = arch._component("vae", vae_name)
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL(**vae_component.config)
    vae = vae.to(torch.float16).to_empty(device=device).eval().requires_grad_(False)
    z = torch.randn(batch, 4, side, side, device=device, dtype=torch.float16)
    with torch.no_grad():
        measured = peak(lambda: vae.decode(z).sample, device)
    d = store.vae_decode(profiles, vae_component, side, setting)
    lines.append(row(f"{vae_name} decode of {batch} images at {side * 8} px, float16", d["const"] + d["per_sample"] * batch, measured, time.perf_counter() - t))
    del vae
    if device == "cuda":
        torch.cuda.empty_cache()
    return lines


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    device = opts.get("device", "cuda" if torch.cuda.is_available() else "cpu")
    cases = opts.get("cases", "both")
    from bench.io import cache_root
    from bench.plan.store import Profiles

    cache = Path(opts.get("cache_dir") or tempfile.mkdtemp(prefix="plan-memory-"))
    profiles = Profiles(cache_root({"cache_dir": None}))
    print(f"device {device}" + (f" ({torch.cuda.get_device_name()})" if device == "cuda" else ""))
    print("| case | estimated MB | measured MB | measured / estimated | seconds |")
    print("|---|---|---|---|---|")
    if cases in ("tiny", "both"):
        for line in tiny_cases(device, cache):
            print(line, flush=True)
    if cases == "smoke":  # the real-architecture code path on small latents, on any device (CPU autocast is not CUDA's: no verdict)
        print(real_training("sd15-unet", 8, 4, True, 2, 2, device, profiles), flush=True)
        for line in real_generation("sd15-unet", "sd-vae", 8, 2, 2, device, profiles):
            print(line, flush=True)
    if cases in ("real", "both"):
        if device != "cuda":
            print("(the real-architecture cases need CUDA: CPU autocast follows another casting policy)")
            return
        print(real_training("sdxl-unet", 128, 16, True, 4, 2, device, profiles), flush=True)
        print(real_training("sd15-unet", 64, None, False, 4, 1, device, profiles), flush=True)
        for line in real_generation("sdxl-unet", "sdxl-vae", 128, 8, 2, device, profiles):
            print(line, flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
