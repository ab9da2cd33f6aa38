"""How close a one-step generator's samples are to its teacher's: Frechet distance with the harness's
own FID code (``bench.metrics.fid``: FeatureStats + frechet_distance) on fixed features.

Features: fixed pixel features, the 4x4 RGB thumbnail (8x8 average pooling, 48 numbers) of each
decoded image as the suite stores it (uint8, then [0, 1]). No weights, no download.

    python benchmarks/onestep_fid.py [method=diff-instruct] [steps=N] [n=512] [teacher_steps=50] [cache_dir=...] [key=value ...]

trains ``method`` on ``model=tiny`` through the trainer (cached like ``bench train``), then prints
the distance to the teacher (the tiny model, DDIM eta 1 at ``teacher_steps`` steps, CFG at the
method's alpha_cfg) of the untrained one-step generator (the teacher's weights at sigma_init, which is
``model=tiny-onestep``) and of the trained one.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import torch

from bench.metrics.fid import FeatureStats, frechet_distance
from bench.models.diffusion import from_uint8, to_uint8


THUMB = 4  # thumbnail side: 3 * 4 * 4 = 48 features


def thumbnail_features(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [0, 1] -> (N, 3 * THUMB^2) float64: the average-pooled thumbnail."""
    return torch.nn.functional.adaptive_avg_pool2d(images.double(), THUMB).flatten(1)


@torch.no_grad()
def feature_stats(latents_fn, model, prompts: list[str], n: int, offset: int, batch: int = 64) -> FeatureStats:
    """Thumbnail-feature statistics of n decoded images; ``latents_fn(prompts, generators)`` samples
    latents, image i with prompt i mod len(prompts) and a generator seeded offset + i."""
    stats = FeatureStats(3 * THUMB * THUMB)
    for start in range(0, n, batch):
        idx = range(start, min(n, start + batch))
        ps = [prompts[i % len(prompts)] for i in idx]
        latents = latents_fn(ps, [torch.Generator().manual_seed(offset + i) for i in idx])
        images = from_uint8(to_uint8(model.decode(latents))).double()
        stats.update(thumbnail_features(images))
    return stats


def distance(a: FeatureStats, b: FeatureStats) -> float:
    return frechet_distance(a.mean, a.cov, b.mean, b.cov)


def teacher_sampler(model, steps: int, guidance: float):
    return replace(model.sampler, steps=steps, guidance=guidance, timesteps=None)


def one_step_sampler(model, unet, sigma_init: float, prior: str = "std"):
    """latents_fn of the one-step generator D(z; sigma_init) with ``unet``."""
    from bench.methods.diff_instruct_pp import draw_latents, one_step

    return lambda ps, gens: one_step(model, unet, draw_latents(model, gens), sigma_init, model.encode_prompts(ps), prior)


def main(argv: list[str]) -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from bench.config import compose
    from bench.runner import Session
    from bench.trainer import apply_checkpoint

    args = dict(a.split("=", 1) for a in argv)
    n, teacher_steps = int(args.pop("n", 512)), int(args.pop("teacher_steps", 50))
    overrides = [f"method={args.pop('method', 'diff-instruct')}", "model=tiny"] + ([f"train.steps={args.pop('steps')}"] if "steps" in args else [])
    overrides += [f"{k}={v}" for k, v in args.items()]
    session = Session(compose(overrides), progress=True)
    cfg = session.cfg
    checkpoint = session.train()
    prompts = session.suite.prompts
    teacher = session.model().to("cpu", torch.float32)
    from bench.methods.diff_instruct_pp import nearest_timestep, model_sigmas

    sigma_init = float(model_sigmas(teacher)[int(nearest_timestep(teacher, torch.tensor([float(cfg["method"]["sigma_init"])])))])
    alpha_cfg = float(cfg["method"]["alpha_cfg"])
    prior = cfg["method"].get("prior") or "std"
    ref = feature_stats(lambda ps, gens: teacher.sample(ps, gens, teacher_sampler(teacher, teacher_steps, alpha_cfg)), teacher, prompts, n, 10_000)
    ref2 = feature_stats(lambda ps, gens: teacher.sample(ps, gens, teacher_sampler(teacher, teacher_steps, alpha_cfg)), teacher, prompts, n, 20_000)
    base = feature_stats(one_step_sampler(teacher, teacher.unet, sigma_init, prior), teacher, prompts, n, 0)
    tuned_model = session.model().to("cpu", torch.float32)
    apply_checkpoint(tuned_model, checkpoint)
    tuned = feature_stats(one_step_sampler(tuned_model, tuned_model.unet, sigma_init, prior), tuned_model, prompts, n, 0)
    print(f"checkpoint {checkpoint.path}")
    print(f"features: 4x4 RGB thumbnails (48), {n} images per set, teacher = tiny DDIM eta 1, {teacher_steps} steps, CFG {alpha_cfg}")
    print(f"teacher vs teacher (other seeds): {distance(ref2, ref):.5f}")
    print(f"untrained one-step generator:      {distance(base, ref):.5f}")
    print(f"trained ({cfg['method']['name']}, {cfg['train']['steps']} steps): {distance(tuned, ref):.5f}")


if __name__ == "__main__":
    main(sys.argv[1:])
