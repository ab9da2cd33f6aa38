"""The plan's estimate against memory measured on a real run (the tests, ``benchmarks/plan_memory.py``).

Measured is what the allocator hands out while the step runs, above what was allocated before it:
on CUDA ``torch.cuda.max_memory_allocated`` (after resetting its peak), on CPU the allocator's events
recorded by ``torch.profiler`` (``profile_memory=True``): every allocation and free of the c10 CPU
allocator, in order, summed to a running total. Estimated is the matching part of the plan: the
activation and working-memory terms of its micro-batch or evaluation phase (the weights, gradients
and optimizer state exist before the step and are counted from parameter counts, exactly).
"""

from __future__ import annotations

from pathlib import Path

import torch

DYNAMIC = ("activations", "working", "the surrogate")


def cpu_peak(fn) -> int:
    """Peak bytes of the CPU allocator above its level at the start, while ``fn()`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type().name == "CPU"), key=lambda e: e.start_ns())
    current = peak = 0
    for e in events:
        current += e.nbytes()
        peak = max(peak, current)
    return peak


def cuda_peak(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def peak(fn, device: str) -> int:
    return cuda_peak(fn) if torch.device(device).type == "cuda" else cpu_peak(fn)


def estimated(plan, phase_name: str) -> int:
    phase = next(p for p in plan.phases if p.name == phase_name)
    return sum(b for label, b in phase.terms if label.startswith(DYNAMIC))


def training_micro_batch(args: list[str], cache_dir: Path, device: str = "cpu", pairs: int = 64) -> dict:
    """One real micro-batch (loss and backward) of an offline pair method on synthetic pairs, set up as
    ``bench.trainer.Trainer`` sets it up, with gradients and optimizer state already allocated (as
    from the second micro-batch on), against the plan of ``bench train ARGS``."""
    from bench.config import compose, import_recipe, to_dict
    from bench.method import TrainContext
    from bench.models import load_model, make_sampler
    from bench.plan.planner import make_plan
    from bench.trainer import add_lora, make_optimizer, micro_batches, mixed_precision

    args = [*args, f"device={device}", f"cache_dir={cache_dir}"]
    plan = make_plan("train", args)
    cfg = to_dict(compose(args))
    tc = cfg["train"]
    method = import_recipe(cfg["method"])(cfg["method"])
    micro, _ = micro_batches(tc, method.splits_micro_batches, cfg["method"]["name"])
    model = load_model(cfg["model"], cache_dir, make_sampler({**cfg["model"]["sampler"], **(tc.get("sampler") or {})})).to(device, torch.float32)
    unet, frozen = model.unet, None
    if tc["lora_rank"] and not tc["full_finetune"]:
        add_lora(unet, int(tc["lora_rank"]), float(tc["lora_alpha"]), 0)
    else:
        frozen = __import__("copy").deepcopy(unet).requires_grad_(False) if method.uses_reference else None
        unet.requires_grad_(True)
    unet.train()
    if tc["gradient_checkpointing"]:
        unet.enable_gradient_checkpointing()
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, tc)
    prompts = [f"a photo of thing number {i}" for i in range(pairs)]
    ctx = TrainContext(model, prompts, None, 0, torch.device(device), micro, False, frozen, sample_batch_size=int(cfg["gen"]["batch_size"]))
    g = torch.Generator().manual_seed(0)
    shape = model.latent_shape()
    data = {
        "latents_w": torch.randn(pairs, *shape, generator=g), "latents_l": torch.randn(pairs, *shape, generator=g),
        "prompt_index": torch.arange(pairs), "ties_dropped": torch.tensor(0),
    }
    precision = mixed_precision(tc["mixed_precision"], torch.device(device).type)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)

    def step():
        with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None):
            loss, _ = method.loss(ctx, data, torch.Generator().manual_seed(1))
        loss.backward()

    step()
    optimizer.step()  # gradients and the optimizer's state exist now, as from the second micro-batch on
    measured = peak(step, device)
    return {"case": " ".join(args[:-2]), "estimated": estimated(plan, "training micro-batch"), "measured": measured}


def generation_batch(args: list[str], cache_dir: Path, device: str = "cpu") -> dict:
    """One real generation batch (``DiffusionModel.sample`` and ``decode``, as ``bench.generate``) against
    the plan of ``bench eval ARGS``."""
    from bench.config import compose, to_dict
    from bench.models import load_model, make_sampler
    from bench.plan.planner import make_plan
    from bench.runner import generation_dtype

    args = [*args, f"device={device}", f"cache_dir={cache_dir}"]
    plan = make_plan("eval", args)
    cfg = to_dict(compose(args))
    dtype = generation_dtype(cfg["gen"]["dtype"], torch.device(device))
    sampler = make_sampler(cfg["model"]["sampler"], cfg["gen"]["steps"], cfg["gen"]["guidance"])
    model = load_model(cfg["model"], cache_dir, sampler).to(device, dtype)
    b = int(cfg["gen"]["batch_size"])
    prompts = [f"a photo of thing number {i}" for i in range(b)]

    @torch.no_grad()
    def batch():
        gens = [torch.Generator().manual_seed(i) for i in range(b)]
        return model.decode(model.sample(prompts, gens, sampler))

    batch()
    return {"case": " ".join(args[:-2]), "estimated": estimated(plan, "evaluation"), "measured": peak(batch, device)}
