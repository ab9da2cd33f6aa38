"""Build the embedded tiny models offline and save them as ordinary diffusers pipelines.

The tiny models have random weights drawn with a fixed seed from a config, then a
short seeded pre-training (whose result ``bench.models.prebuilt`` ships, so a build
usually only draws and loads); they are written once to the cache with
``save_pretrained`` and then loaded through the very same ``from_pretrained`` path
a hub id takes, so tests exercise the real loading code without a download.
"""

from __future__ import annotations

from contextlib import contextmanager

import gzip
import json
import shutil
import tempfile
from pathlib import Path

import torch


def clip_tokenizer_files(directory: Path, max_length: int = 77) -> None:
    """Write the real CLIP BPE vocabulary (shipped by open_clip) as vocab.json + merges.txt, the
    tokenizer padding to ``max_length`` tokens (CLIP's 77; the world model's captions fit in 16).

    ``CLIPTokenizer.from_pretrained(directory)`` then produces the same ids as
    ``open_clip.tokenize`` (except that open_clip also unescapes HTML entities such
    as ``&amp;``): 256 byte symbols, their end-of-word forms, 48,894
    merges and the two special tokens, 49,408 in all.
    """
    import open_clip.tokenizer as oct

    bpe_path = Path(oct.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1 : 49152 - 256 - 2 + 1]]
    byte_symbols = list(oct.bytes_to_unicode().values())
    vocab = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    (directory / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": max_length,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "tokenizer_class": "CLIPTokenizer",
            }
        )
    )


WORDS = (
    "red blue green yellow white black small large old new bright dark cat dog tree house car boat bird "
    "flower mountain river city street cup apple book chair lamp cloud sun moon painting photo of a the on in"
).split()


def synthetic_latents(n: int, shape: tuple[int, int, int], generator: torch.Generator) -> torch.Tensor:
    """Latents whose sample-to-sample variation is mostly global: a per-channel offset plus smooth
    low-frequency structure and a little fine noise. A UNet fits this in a few hundred steps, so the
    tiny model samples close to what it was trained on, and a fine-tuning signal on global image
    statistics (brightness, colour) is one the model can actually learn."""
    c, h, w = shape
    offset = 0.6 * torch.randn(n, c, 1, 1, generator=generator)
    coarse = torch.randn(n, c, 2, 2, generator=generator)
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
    return offset + 0.4 * smooth + 0.1 * torch.randn(n, c, h, w, generator=generator)


def synthetic_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Images in [0, 1] made of smooth colour fields at several scales plus a little grain, with a
    photo's muted colours (mostly a grey level, less chroma): what a tiny autoencoder must
    reconstruct to carry a photo's colours and coarse layout."""
    image = 0.5 + 0.2 * torch.randn(n, 1, 1, 1, generator=generator) + 0.08 * torch.randn(n, 3, 1, 1, generator=generator)
    for cells, weight in ((2, 0.2), (4, 0.15), (8, 0.1), (16, 0.05)):
        field = torch.randn(n, 3, cells, cells, generator=generator)
        image = image + weight * torch.nn.functional.interpolate(field, size=(size, size), mode="bilinear", align_corners=False)
    return (image + 0.02 * torch.randn(n, 3, size, size, generator=generator)).clamp(0, 1)


@torch.enable_grad()
def pretrain_autoencoder(vae, size: int, cfg: dict, seed: int) -> None:
    """A short, seeded reconstruction pre-training of the VAE on ``synthetic_images``, then its
    ``scaling_factor`` set to 1 / std of the latents, as Stable Diffusion chose 0.18215.

    A random VAE decodes the latents of a real photo into noise, so a method that fine-tunes
    toward given images (DreamBooth, PSO customization and style) could not move the pixels.
    """
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=float(cfg["lr"]))
    bs = int(cfg["batch_size"])
    vae.train()
    for _ in range(int(cfg["steps"])):
        x = synthetic_images(bs, size, g) * 2 - 1
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        loss = torch.nn.functional.mse_loss(vae.decode(z).sample, x) + float(cfg.get("kl_weight", 1e-6)) * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        latents = vae.encode(synthetic_images(256, size, g) * 2 - 1).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / latents.std()))


@torch.enable_grad()
def pretrain_on_synthetic_latents(unet, encode, scheduler, cfg: dict, seed: int, vae=None) -> None:
    """A short, seeded denoising pre-training of the UNet on ``synthetic_latents`` or, given a
    pre-trained ``vae``, on the latents of ``synthetic_images`` (so samples decode to images).

    Without it a random UNet is far from consistent with its own samples, and any
    fine-tuning drifts its outputs more than the method's signal moves them.
    ``encode`` maps prompts to the UNet's ``Conditioning``.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    if vae is not None:
        size = shape[1] * 2 ** (len(vae.config.block_out_channels) - 1)
        with torch.no_grad():
            pool = vae.encode(synthetic_images(4096, size, g) * 2 - 1).latent_dist.mean * vae.config.scaling_factor
    opt = torch.optim.AdamW(unet.parameters(), lr=float(cfg["lr"]))
    alphas = scheduler.alphas_cumprod
    bs = int(cfg["batch_size"])
    unet.train()
    for _ in range(int(cfg["steps"])):
        words = torch.randint(0, len(WORDS), (bs, 4), generator=g)
        prompts = [" ".join(WORDS[i] for i in row) if float(torch.rand((), generator=g)) > 0.1 else "" for row in words]
        with torch.no_grad():
            cond = encode(prompts)
        x0 = pool[torch.randint(0, len(pool), (bs,), generator=g)] if vae is not None else synthetic_latents(bs, shape, g)
        t = torch.randint(0, len(alphas), (bs,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        a = alphas[t].reshape(-1, 1, 1, 1)
        pred = unet(a.sqrt() * x0 + (1 - a).sqrt() * noise, t, **cond.unet_kwargs()).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
    unet.eval()


@contextmanager
def one_thread(enabled: bool = True):
    """Run on one CPU thread: float32 CPU kernels split their reductions by thread count, so a build
    on 2 threads and one on 16 would differ in the last bits (and a model named twice, as
    ``tiny-onestep`` names ``tiny``'s weights, would not be the same model)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if enabled else threads)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_tiny_pipeline(spec: dict, directory: Path, pretrained: dict | None = None) -> None:
    """Build a tiny Stable-Diffusion-layout (or, with ``layout: sdxl``, SDXL-layout: two text
    encoders, pooled-text and size conditioning) pipeline from ``spec`` and save it to ``directory``,
    on one thread so that the thread count cannot change its bits. The world model (``data: world``)
    pre-trains on every thread: on one it would not fit its 30 minutes, and its bits come from the
    shipped file (a rebuild is checked by its scores, not its bytes).

    ``pretrained``: the result of a pre-training already done (``pretrained_weights`` of an earlier
    build of this spec, as ``bench.models.prebuilt`` ships them), put in place of running it again.
    Written to a temporary sibling folder first and renamed, so a killed build
    never leaves a half-written model behind.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp-", dir=directory.parent))
    try:
        with one_thread(pretrained is not None or spec.get("data") != "world"):
            pipe = initial_pipeline(spec, tmp / "_tok")
            if pretrained is None:
                pretrain(pipe, spec)
            else:
                load_pretrained(pipe, pretrained)
        pipe.tokenizer.backend_tokenizer.no_truncation()  # saved as built, not with the padding the pre-training's calls left set
        pipe.tokenizer.backend_tokenizer.no_padding()
        pipe.save_pretrained(tmp)
        shutil.rmtree(tmp / "_tok")
        if directory.exists():
            shutil.rmtree(tmp)
            return
        tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def initial_pipeline(spec: dict, tokenizer_dir: Path):
    """The pipeline with every weight drawn from ``spec["seed"]``, before any pre-training."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    torch.manual_seed(int(spec["seed"]))
    unet = UNet2DConditionModel(**spec["unet"])
    vae = AutoencoderKL(**spec["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**spec["text_encoder"]))
    sdxl = spec.get("layout") == "sdxl"
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"])) if sdxl else None
    clip_tokenizer_files(tokenizer_dir, int(spec.get("tokenizer_max_length", 77)))
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    scheduler = DDPMScheduler(**spec["scheduler"])
    if sdxl:
        return StableDiffusionXLPipeline(
            unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
            tokenizer_2=tokenizer, scheduler=scheduler, force_zeros_for_empty_prompt=True,
        )
    return StableDiffusionPipeline(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def pretrain(pipe, spec: dict) -> None:
    """The spec's pre-trainings, in place: the VAE's (``pretrain_vae``), then the UNet's (``pretrain``),
    on synthetic data or, with ``data: world``, on the micro world (``bench.world.model``)."""
    from bench.models.diffusion import encode_text

    encoders = [e for e in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)) if e is not None]
    resolution = pipe.unet.config.sample_size * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    encode = lambda prompts: encode_text(prompts, [pipe.tokenizer] * len(encoders), encoders, resolution, "cpu", torch.float32)
    if spec.get("data") == "world":
        from bench.world.model import pretrain_world

        return pretrain_world(pipe, spec, encode)
    if spec.get("pretrain_vae"):
        pretrain_autoencoder(pipe.vae, resolution, spec["pretrain_vae"], int(spec["seed"]))
    if spec.get("pretrain"):
        pretrain_on_synthetic_latents(pipe.unet, encode, pipe.scheduler, spec["pretrain"], int(spec["seed"]), pipe.vae if spec.get("pretrain_vae") else None)


def pretrained_weights(directory: Path, spec: dict) -> dict:
    """What the pre-trainings of a build in ``directory`` changed: the weights of the parts they
    trained (``unet.*``, ``vae.*``, and for the world model ``text_encoder.*`` but its token
    embedding, as float32 tensors) and the VAE's ``scaling_factor``; the rest of the pipeline is
    drawn from the seed again."""
    from safetensors.torch import load_file

    parts = (["vae"] if spec.get("pretrain_vae") else []) + (["unet"] if spec.get("pretrain") else [])
    tensors = {f"{part}.{k}": v for part in parts for k, v in load_file(Path(directory) / part / "diffusion_pytorch_model.safetensors").items()}
    if spec.get("data") == "world":
        text = load_file(Path(directory) / "text_encoder" / "model.safetensors")
        tensors.update({f"text_encoder.{k}": v for k, v in text.items() if "token_embedding" not in k})
    scaling = json.loads((Path(directory) / "vae" / "config.json").read_text())["scaling_factor"]
    return {"tensors": tensors, "vae_scaling_factor": scaling if spec.get("pretrain_vae") else None}


def load_pretrained(pipe, pretrained: dict) -> None:
    for part in ("unet", "vae", "text_encoder"):
        state = {k.removeprefix(part + "."): v for k, v in pretrained["tensors"].items() if k.startswith(part + ".")}
        if not state:
            continue
        missing, unexpected = getattr(pipe, part).load_state_dict(state, strict=False)
        if unexpected or any("token_embedding" not in k for k in missing):  # the text encoder's token embedding stays as drawn
            raise ValueError(f"shipped weights do not fit the {part}: missing {missing}, unexpected {unexpected}")
    if pretrained["vae_scaling_factor"] is not None:
        pipe.vae.register_to_config(scaling_factor=float(pretrained["vae_scaling_factor"]))
