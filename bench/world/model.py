"""The world model's pre-training: a tiny Stable-Diffusion-layout pipeline taught the micro world.

``bench.models.tiny`` builds the pipeline (weights drawn from the spec's seed) and hands it here when
its spec says ``data: world``. Two stages, both seeded:

1. the VAE learns to reconstruct renders of the world's scenes (``pretrain_world_autoencoder``),
   then its ``scaling_factor`` is set to 1 / std of the latents, as Stable Diffusion chose 0.18215;
2. the UNet, with the text encoder's layers (not its token embedding, which stays as drawn from the
   seed and is never shipped), learns to denoise those latents given the scenes' captions
   (``pretrain_world_denoiser``): the epsilon loss of DDPM, a share of empty captions for
   classifier-free guidance, AdamW with a cosine decay to zero.

At the end every trained weight is rounded to float16, so a full build and the shipped file
(``bench.models.prebuilt`` stores exactly representable tensors as float16) are the same model.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from bench.io import progress
from bench.world.scene import TAGS, Scene, make_scene


def training_scenes(seed: int, count: int) -> list[Scene]:
    """``count`` scenes, the six tags in turn (scene ``i`` is ``make_scene(TAGS[i % 6], seed, i // 6)``)."""
    return [make_scene(TAGS[i % len(TAGS)], seed, i // len(TAGS)) for i in range(count)]


def scene_images(scenes, res: int) -> torch.Tensor:
    """The scenes' exact renders as a float ``(n, 3, res, res)`` batch in [-1, 1], the VAE's range."""
    pixels = np.stack([s.render(res) for s in scenes])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1


def cosine_schedule(optimizer, steps: int):
    """The learning rate up linearly over the first 2% of ``steps`` (Adam's first steps are large),
    then from its set value down to zero along a half cosine."""
    warmup = max(steps // 50, 1)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: (i + 1) / warmup if i < warmup else 0.5 * (1 + math.cos(math.pi * min(i - warmup, steps - warmup) / (steps - warmup)))
    )


@torch.enable_grad()
def pretrain_world_autoencoder(vae, images: torch.Tensor, cfg: dict, seed: int) -> None:
    """Reconstruction training of ``vae`` on ``images`` (MSE plus a small KL, a posterior sample
    decoded), then its ``scaling_factor`` from the latents of the first 1,024 images."""
    g = torch.Generator().manual_seed(seed)
    steps, bs = int(cfg["steps"]), int(cfg["batch_size"])
    opt = torch.optim.AdamW(vae.parameters(), lr=float(cfg["lr"]))
    schedule = cosine_schedule(opt, steps)
    vae.train()
    for _ in progress(range(steps), desc="world VAE", unit="step"):
        x = images[torch.randint(0, len(images), (bs,), generator=g)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        loss = torch.nn.functional.mse_loss(vae.decode(z).sample, x) + float(cfg.get("kl_weight", 1e-6)) * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    vae.eval()
    round_to_half(vae.parameters())
    vae.register_to_config(scaling_factor=float(1 / encode_means(vae, images[:1024]).std()))


@torch.no_grad()
def encode_means(vae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """The posterior means of ``images`` (unscaled latents)."""
    return torch.cat([vae.encode(images[i : i + batch]).latent_dist.mean for i in range(0, len(images), batch)])


def text_layers(text_encoder) -> list[torch.nn.Parameter]:
    """The text encoder's parameters the world pre-training trains: all but the token embedding."""
    return [p for name, p in text_encoder.named_parameters() if "token_embedding" not in name]


@torch.enable_grad()
def pretrain_world_denoiser(unet, text_encoder, encode, scheduler, latents: torch.Tensor, captions: list[str], cfg: dict, seed: int) -> None:
    """DDPM's epsilon loss on scaled ``latents`` given their ``captions`` (each blanked with probability
    ``cfg["empty_prompt"]``, so the model also learns the unconditional prediction CFG needs); trains
    the UNet and ``text_layers``. ``encode`` maps prompts to the UNet's ``Conditioning``."""
    g = torch.Generator().manual_seed(seed)
    steps, bs, empty = int(cfg["steps"]), int(cfg["batch_size"]), float(cfg.get("empty_prompt", 0.1))
    trained = list(unet.parameters()) + text_layers(text_encoder)
    text_encoder.get_input_embeddings().weight.requires_grad_(False)
    opt = torch.optim.AdamW(trained, lr=float(cfg["lr"]))
    schedule = cosine_schedule(opt, steps)
    alphas = scheduler.alphas_cumprod
    unet.train()
    text_encoder.train()
    for _ in progress(range(steps), desc="world UNet", unit="step"):
        pick = torch.randint(0, len(latents), (bs,), generator=g)
        blank = torch.rand(bs, generator=g) < empty
        prompts = ["" if b else captions[i] for i, b in zip(pick.tolist(), blank.tolist())]
        x0 = latents[pick]
        t = torch.randint(0, len(alphas), (bs,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = alphas[t].reshape(-1, 1, 1, 1)
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, **encode(prompts).unet_kwargs()).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    text_encoder.get_input_embeddings().weight.requires_grad_(True)
    unet.eval()
    text_encoder.eval()
    round_to_half(list(unet.parameters()) + text_layers(text_encoder))


@torch.no_grad()
def round_to_half(parameters) -> None:
    """Each weight rounded to the nearest float16 (kept as float32): what the shipped file holds."""
    for p in parameters:
        p.copy_(p.half().float())


def pretrain_world(pipe, spec: dict, encode) -> None:
    """Both stages on the scenes of ``spec["scenes"]`` (``seed``, ``count``), rendered at the
    pipeline's resolution."""
    resolution = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    scenes = training_scenes(int(spec["scenes"]["seed"]), int(spec["scenes"]["count"]))
    images = scene_images(scenes, resolution)
    seed = int(spec["seed"])
    pretrain_world_autoencoder(pipe.vae, images, spec["pretrain_vae"], seed)
    latents = encode_means(pipe.vae, images) * pipe.vae.config.scaling_factor
    del images
    pretrain_world_denoiser(pipe.unet, pipe.text_encoder, encode, pipe.scheduler, latents, [s.caption for s in scenes], spec["pretrain"], seed)


@torch.no_grad()
def evaluator_scores(model, n_per_tag: int = 50, seed: int = 0, sampler=None, batch_size: int = 60) -> dict:
    """The exact evaluator's GenEval summary (``bench.world.evaluate.evaluate``) of ``model`` (a
    ``DiffusionModel``) on ``n_per_tag`` captions of each tag drawn with ``seed``, one image each,
    image ``i`` from a generator seeded ``i``."""
    from bench.models.diffusion import to_uint8
    from bench.world.evaluate import evaluate
    from bench.world.scene import make_prompts

    scenes = make_prompts(n_per_tag, seed)
    images = []
    for start in progress(range(0, len(scenes), batch_size), desc="world evaluator", unit="batch"):
        chunk = scenes[start : start + batch_size]
        generators = [torch.Generator().manual_seed(start + i) for i in range(len(chunk))]
        latents = model.sample([s.caption for s in chunk], generators, sampler)
        images += list(to_uint8(model.decode(latents)).numpy())
    return {**evaluate(images, [s.spec for s in scenes]), "images": images}


def scores_table(results: dict[str, dict]) -> str:
    """A markdown table of ``evaluator_scores`` results, one row each: the tags' accuracies and overall."""
    tags = list(next(iter(results.values()))["per_tag"])
    lines = ["| model | " + " | ".join(tags) + " | overall |", "|---|" + "---|" * (len(tags) + 1)]
    for name, r in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{r['per_tag'][t]:.2f}" for t in tags) + f" | {r['overall']:.3f} |")
    return "\n".join(lines)
