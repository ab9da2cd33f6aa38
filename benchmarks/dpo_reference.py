"""Peak memory and step time of one Diffusion-DPO step: reference by disabling the LoRA adapters
versus reference as a frozen copy of the UNet, measured in the same run.

Each variant runs in its own fresh subprocess so one variant's allocations cannot hide in the
other's peak. On CUDA the peak is ``torch.cuda.max_memory_allocated``; on CPU it is the growth of
the process's peak resident memory (``ru_maxrss``) over its size with the UNet loaded.

    python benchmarks/dpo_reference.py                      # the tiny UNet, CPU (seconds)
    python benchmarks/dpo_reference.py unet=sd15 device=cuda pairs=4   # SD1.5 architecture, random weights, 512 px
    python benchmarks/dpo_reference.py unet=sdxl device=cuda pairs=2   # SDXL architecture, 1024 px

``unet=sd15`` / ``unet=sdxl`` build the real UNet architecture from its config with random weights
(no download): memory and time do not depend on the weight values.
"""

from __future__ import annotations

import copy
import json
import resource
import subprocess
import sys
import time

VARIANTS = {
    "lora, reference = adapters disabled": ("lora", "disable"),
    "lora, reference = frozen copy": ("lora", "copy"),
    "full fine-tuning, reference = frozen copy": ("full", "copy"),
}


def build_unet(kind: str):
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    if kind == "sd15":  # the stable-diffusion-v1-5 unet/config.json architecture
        return UNet2DConditionModel(
            sample_size=64, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2
        )
    if kind == "sdxl":  # the stable-diffusion-xl-base-1.0 unet/config.json architecture
        return UNet2DConditionModel(
            sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280),
            layers_per_block=2, transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816,
        )
    return UNet2DConditionModel(
        sample_size=8, cross_attention_dim=32, attention_head_dim=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8,
    )


def one_variant(unet_kind: str, device: str, pairs: int, steps: int, training: str, reference: str) -> dict:
    """Set up one variant, run ``steps`` DPO steps (the first is a warm-up), report time and peak memory."""
    import psutil
    import torch
    from types import SimpleNamespace

    from bench.method import TrainContext
    from bench.methods.diffusion_dpo import dpo_loss
    from bench.trainer import add_lora

    dev = torch.device(device)
    with dev:  # random initialization on the device itself: the SDXL UNet has 2.6 B parameters
        unet = build_unet(unet_kind)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = psutil.Process().memory_info().rss
    frozen = None
    if training == "lora":
        add_lora(unet, 8, 8, seed=0)
        unet.requires_grad_(False)
        for name, p in unet.named_parameters():
            p.requires_grad_("lora" in name)
        if reference == "copy":  # a second UNet holding the base weights, as a separate ref_unet does
            frozen = copy.deepcopy(unet).requires_grad_(False)
            frozen.disable_adapters()
    else:
        frozen = copy.deepcopy(unet).requires_grad_(False)
        unet.requires_grad_(True)
    ctx = TrainContext(SimpleNamespace(unet=unet), [], None, 0, dev, pairs, progress=False, frozen_unet=frozen)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * pairs, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g).to(dev)
    cond = {"encoder_hidden_states": torch.randn(2 * pairs, 77, cfg.cross_attention_dim, generator=g).to(dev)}
    if cfg.addition_embed_type == "text_time":  # SDXL: pooled text embedding and size ids
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        side = cfg.sample_size * 8
        cond["added_cond_kwargs"] = {
            "text_embeds": torch.randn(2 * pairs, pooled, generator=g).to(dev),
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * (2 * pairs), dtype=torch.float32, device=dev),
        }
    t = torch.randint(0, 1000, (pairs,), generator=g).repeat(2).to(dev)
    noise = torch.randn(x.shape, generator=g).to(dev)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast("cpu", enabled=False)

    times = []
    for _ in range(steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            err = lambda out: ((out.float() - noise) ** 2).flatten(1).mean(1).chunk(2)
            model_w, model_l = err(unet(x, t, **cond).sample)
            with torch.no_grad(), ctx.reference():
                ref_w, ref_l = err(ctx.model.unet(x, t, **cond).sample)
            loss = dpo_loss(model_w, model_l, ref_w, ref_l, 5000.0)[0].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"step_s": sum(times[1:]) / max(1, len(times) - 1), "peak_bytes": peak, "trainable": sum(p.numel() for p in params)}


def main(argv: list[str]) -> None:
    opts = {"unet": "tiny", "device": "cpu", "pairs": "2", "steps": "4"}
    opts.update(a.split("=", 1) for a in argv)
    if "_variant" in opts:  # the child process
        training, reference = VARIANTS[opts["_variant"]]
        print(json.dumps(one_variant(opts["unet"], opts["device"], int(opts["pairs"]), int(opts["steps"]), training, reference)))
        return
    rows = {}
    for name in VARIANTS:
        args = [f"{k}={v}" for k, v in opts.items()] + [f"_variant={name}"]
        out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=True)
        rows[name] = json.loads(out.stdout.strip().splitlines()[-1])
    base = rows["lora, reference = adapters disabled"]
    print(f"one Diffusion-DPO step: unet={opts['unet']} device={opts['device']} pairs={opts['pairs']} ({int(opts['steps']) - 1} timed steps after a warm-up)\n")
    print("| variant | peak memory (MiB) | vs adapters disabled | step time (s) | vs adapters disabled | trainable params |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        print(f"| {name} | {r['peak_bytes'] / 2**20:.1f} | {r['peak_bytes'] / base['peak_bytes']:.2f}x | {r['step_s']:.3f} | "
              f"{r['step_s'] / base['step_s']:.2f}x | {r['trainable']:,} |")


if __name__ == "__main__":
    main(sys.argv[1:])
