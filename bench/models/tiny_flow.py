"""The embedded tiny flow models: FLUX.1- and SD3-layout pipelines at tiny sizes, built offline.

Each is the real pipeline class with the real component classes (``FluxTransformer2DModel`` or
``SD3Transformer2DModel``, a 16-channel ``AutoencoderKL`` with the hub's shift and scale, CLIP text
encoders, a T5 encoder, ``FlowMatchEulerDiscreteScheduler`` with the hub's shift), its widths cut
down, its weights drawn from the spec's seed. The T5 tokenizer is a ``T5TokenizerFast`` (Unigram,
as T5's SentencePiece model) over a small word list and single characters, built in code: the hub's
spiece.model cannot be downloaded here, and ids of another vocabulary would not matter to random
weights. ``bench.models.tiny.build_tiny_pipeline`` saves them as it saves the UNet models.
"""

from __future__ import annotations

from pathlib import Path

import torch

# the T5 tokenizer's words: the tiny models' synthetic prompts and the micro world's grammar; anything else spells out
T5_WORDS = (
    "red blue green yellow white black small large old new bright dark cat dog tree house car boat bird flower mountain "
    "river city street cup apple book chair lamp cloud sun moon painting photo of a an the on in and left right above below "
    "circle circles square squares triangle triangles two three four orange purple pink brown gray"
).split()
T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()&/"


def t5_tokenizer(max_length: int):
    """A T5-layout tokenizer: <pad> 0, </s> 1, <unk> 2 as T5's, then whole words (with SentencePiece's
    word-start mark) scored above single characters, so a word in the list is one token."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -3.0)]
    vocab += [("\u2581" + w, -1.0) for w in T5_WORDS] + [(c, -5.0) for c in T5_CHARS] + [("\u2581" + c, -4.0) for c in T5_CHARS]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def initial_flow_pipeline(spec: dict, tokenizer_dir: Path):
    """The FLUX- (``layout: flux``) or SD3-layout (``layout: sd3``) pipeline with every weight drawn from ``spec["seed"]``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    from bench.models.tiny import clip_tokenizer_files

    torch.manual_seed(int(spec["seed"]))
    vae = AutoencoderKL(**spec["vae"])
    clip_tokenizer_files(tokenizer_dir, 77)
    clip_tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    t5 = T5EncoderModel(T5Config(**spec["t5"]))
    tokenizer_t5 = t5_tokenizer(int(spec.get("t5_max_length", 512)))
    scheduler = FlowMatchEulerDiscreteScheduler(**spec["scheduler"])
    if spec["layout"] == "flux":
        return FluxPipeline(
            transformer=FluxTransformer2DModel(**spec["transformer"]), vae=vae, scheduler=scheduler,
            text_encoder=CLIPTextModel(CLIPTextConfig(**spec["text_encoder"])), tokenizer=clip_tokenizer,
            text_encoder_2=t5, tokenizer_2=tokenizer_t5,
        )
    if spec["layout"] == "sd3":
        return StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(**spec["transformer"]), vae=vae, scheduler=scheduler,
            text_encoder=CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder"])), tokenizer=clip_tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**spec["text_encoder_2"])), tokenizer_2=clip_tokenizer,
            text_encoder_3=t5, tokenizer_3=tokenizer_t5,
        )
    raise ValueError(f"unknown flow layout {spec['layout']!r} (expected flux or sd3)")


def build_flow_pipeline(spec: dict, directory: Path, pretrained: dict | None = None) -> None:
    """Build the tiny flow pipeline of ``spec`` into ``directory`` as ``bench.models.tiny.build_tiny_pipeline``
    builds the UNet ones: drawn from the seed on one thread, then pre-trained (the world's pre-training on
    every thread) or given the shipped pre-training, and written whole or not at all."""
    import shutil

    from bench.io import folder_written_whole
    from bench.models.tiny import one_thread

    with folder_written_whole(directory) as tmp:
        with one_thread(pretrained is not None or spec.get("data") != "world"):
            pipe = initial_flow_pipeline(spec, tmp / "_tok")
            if pretrained is None:
                pretrain_flow(pipe, spec)
            else:
                load_flow_pretrained(pipe, pretrained)
        for tok in (pipe.tokenizer, pipe.tokenizer_2):
            tok.backend_tokenizer.no_truncation()  # saved as built, not with the padding the pre-training's calls left set
            tok.backend_tokenizer.no_padding()
        pipe.save_pretrained(tmp)
        shutil.rmtree(tmp / "_tok")


def pretrain_flow(pipe, spec: dict) -> None:
    """The spec's pre-trainings, in place, on the micro world's renders and captions (the scenes of
    ``spec["scenes"]``); a spec without them keeps its random weights:

    1. the VAE's reconstruction (``pretrain_vae``, the world model's), which sets its ``scaling_factor``
       to 1 / std of the latents; their mean becomes its ``shift_factor``, as FLUX and SD3 normalise theirs;
    2. the transformer's flow matching on those latents (``pretrain``): ||v - (noise - x0)||^2 at
       sigma uniform in (0, 1], a share of empty prompts for CFG, AdamW with a cosine decay to zero.

    Trained weights end rounded to float16, so a build and the shipped file are one model."""
    from bench.world.model import encode_means, pretrain_world_autoencoder, round_to_half, scene_images, training_scenes

    if not (spec.get("pretrain_vae") or spec.get("pretrain")):
        return
    if spec.get("data") != "world":
        raise ValueError("the tiny flow models pre-train on the micro world: set build.data: world")
    seed, size = int(spec["seed"]), int(spec["resolution"])
    scenes = training_scenes(int(spec["scenes"]["seed"]), int(spec["scenes"]["count"]))
    images = scene_images(scenes, size)
    if spec.get("pretrain_vae"):
        pretrain_world_autoencoder(pipe.vae, images, spec["pretrain_vae"], seed)
    means = encode_means(pipe.vae, images)
    if spec.get("pretrain_vae"):
        pipe.vae.register_to_config(shift_factor=float(means[:1024].mean()))  # over the latents the scale was read from
    if spec.get("pretrain"):
        latents = (means - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        pretrain_flow_transformer(pipe, latents, [s.caption for s in scenes], spec["pretrain"], seed, size)
        round_to_half(list(pipe.transformer.parameters()) + text_parameters(pipe))


@torch.enable_grad()
def pretrain_flow_transformer(pipe, latents: torch.Tensor, captions: list[str], cfg: dict, seed: int, size: int) -> None:
    """Flow matching of ``pipe.transformer`` on scaled ``latents`` given their ``captions``, each blanked with
    probability ``cfg["empty_prompt"]``; with the text encoders' layers (``text_parameters``), as the world model trains its own."""
    from bench.io import progress
    from bench.models.diffusion import Sampler
    from bench.models.flow import FlowModel
    from bench.world.model import cosine_schedule

    model = FlowModel("pretrain", pipe, Sampler("flow_euler", 1, 0.0), size, {}, int(cfg.get("sequence_length", 32)))
    g = torch.Generator().manual_seed(seed)
    steps, bs, empty = int(cfg["steps"]), int(cfg["batch_size"]), float(cfg.get("empty_prompt", 0.1))
    transformer = pipe.transformer.requires_grad_(True).train()
    text = text_parameters(pipe)
    for p in text:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(list(transformer.parameters()) + text, lr=float(cfg["lr"]))
    schedule = cosine_schedule(opt, steps)
    for _ in progress(range(steps), desc="flow transformer", unit="step"):
        pick = torch.randint(0, len(latents), (bs,), generator=g)
        blank = torch.rand(bs, generator=g) < empty
        cond = model.encode_prompts(["" if b else captions[i] for i, b in zip(pick.tolist(), blank.tolist())])
        loss = model.diffusion_loss(latents[pick], cond, g).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    transformer.requires_grad_(False).eval()
    for p in text:
        p.requires_grad_(False)


def text_parameters(pipe) -> list[torch.nn.Parameter]:
    """The text encoders' weights the pre-training trains: all but CLIP's token embeddings (49,408 rows,
    kept as drawn from the seed and never shipped, as the world model's)."""
    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    return [p for e in encoders if e is not None for name, p in e.named_parameters() if "token_embedding" not in name]


def flow_pretrained_weights(directory: Path, spec: dict) -> dict:
    """What the pre-trainings of a flow build in ``directory`` changed (``vae.*``, ``transformer.*``, the text
    encoders' ``text_parameters``) and the VAE's scaling and shift."""
    import json

    from safetensors.torch import load_file

    folder = Path(directory)
    parts = (["vae"] if spec.get("pretrain_vae") else []) + (["transformer"] if spec.get("pretrain") else [])
    tensors = {f"{part}.{k}": v for part in parts for k, v in load_file(folder / part / "diffusion_pytorch_model.safetensors").items()}
    if spec.get("pretrain"):
        for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):
            if (folder / part).is_dir():
                tensors.update({f"{part}.{k}": v for k, v in load_file(folder / part / "model.safetensors").items() if "token_embedding" not in k})
    vae = json.loads((folder / "vae" / "config.json").read_text())
    trained = bool(spec.get("pretrain_vae"))
    return {"tensors": tensors, "vae_scaling_factor": vae["scaling_factor"] if trained else None, "vae_shift_factor": vae["shift_factor"] if trained else None}


def load_flow_pretrained(pipe, pretrained: dict) -> None:
    """Put a shipped pre-training in place; CLIP's token embeddings stay as drawn, T5's tied copy follows its ``shared``."""
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        state = {k.removeprefix(part + "."): v for k, v in pretrained["tensors"].items() if k.startswith(part + ".")}
        if not state:
            continue
        missing, unexpected = getattr(pipe, part).load_state_dict(state, strict=False)
        if unexpected or any("token_embedding" not in k and "embed_tokens" not in k for k in missing):
            raise ValueError(f"shipped weights do not fit the {part}: missing {missing}, unexpected {unexpected}")
    if pretrained["vae_scaling_factor"] is not None:
        pipe.vae.register_to_config(scaling_factor=pretrained["vae_scaling_factor"], shift_factor=pretrained["vae_shift_factor"])
