"""The micro world's learned scorers: a tiny CLIP trained on the world, and a learned preference
model in PickScore's role, trained on pairs that the hidden gold utility (``bench.world.gold``) labels.

Both are ``transformers.CLIPModel`` in CLIP's layout (a ViT on the world's 64 px images, 8 px
patches; a 2-layer text transformer on the real CLIP vocabulary, padded to 16 tokens) and score as
their models do: the CLIP score is ``cos(image, text)``; the preference is PickScore's
``logit_scale.exp() * cos(image, text)``. The pipeline, all on every CPU thread and seeded:

1. **World CLIP** (``train_clip``): CLIP's symmetric contrastive loss on renders of the world's
   scenes and their captions; a caption that occurs twice in a batch is a positive for both images
   (the grammar has only 18 single-object captions). Half the renders are blurred or noised, so the
   model also reads a diffusion model's soft samples.
2. **Preference pairs** (``preference_pairs``): for each caption of another draw of the grammar,
   two samples of the world model (``model=world``, its own sampler) and one render, either of the
   caption or of another caption of its tag; pairs (sample, sample) and (sample, render), each
   labelled by the gold utility: the better image wins, equal utilities tie (Pick-a-Pic's 0.5/0.5).
3. **Preference model** (``train_preference``): the world CLIP fine-tuned with PickScore's loss, the
   cross-entropy of the softmax over the two images' scores against the label.

The token embedding of either model is the seed's draw, frozen: it is never shipped and a build
redraws it. The trained rest is rounded to float16 and shipped (``world-scorers-<hash>.safetensors``
beside the embedded models' files), so every machine scores with the same bytes; without the file
the scorers are built from the seed on first use (minutes; ``python -m bench.models.prebuilt`` ships it).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from bench.io import progress

log = logging.getLogger(__name__)

RESOLUTION = 64
MAX_TOKENS = 16  # the longest world caption is 14 tokens with its start and end

SPEC = {
    "seed": 11,
    "clip": {
        "config": {
            "text_config": {"vocab_size": 49408, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": MAX_TOKENS},
            "vision_config": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4, "image_size": RESOLUTION, "patch_size": 8},
            "projection_dim": 64,
        },
        "scenes": {"seed": 300, "count": 12000},
        "steps": 1500,
        "batch_size": 128,
        "lr": 1.0e-3,
        "degraded": 0.5,  # share of renders blurred (sigma 0.3-1.5 px) or noised (sigma up to 0.06)
    },
    "preference": {
        "scenes": {"seed": 400, "count": 1200},  # captions: make_scene(TAGS[i % 6], 400, i // 6)
        "steps": 600,
        "batch_size": 64,
        "lr": 1.0e-4,
    },
}


def build_name(world_build: str) -> str:
    """``world-scorers-<hash>``: the hash covers ``SPEC``, this module's and the world's source, and the
    world model's build (whose samples the preference pairs hold)."""
    import hashlib

    from bench.config import stable_hash

    here = Path(__file__).parent
    digest = hashlib.sha256(b"".join((here / f"{name}.py").read_bytes() for name in ("scorers", "gold", "evaluate", "scene", "render"))).hexdigest()
    return "world-scorers-" + stable_hash({"spec": SPEC, "source": digest, "world": world_build})[:12]


@lru_cache(maxsize=1)
def tokenizer():
    """The real CLIP vocabulary, padded to 16 tokens."""
    from transformers import CLIPTokenizer

    from bench.io import scratch_dir
    from bench.models.tiny import clip_tokenizer_files

    directory = scratch_dir("bench-world-tokenizer-")
    clip_tokenizer_files(directory, MAX_TOKENS)
    return CLIPTokenizer.from_pretrained(directory)


def initial_clip(spec: dict = SPEC):
    """The CLIP model with every weight drawn from ``spec["seed"]``."""
    from transformers import CLIPConfig, CLIPModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(spec["seed"]))
        return CLIPModel(CLIPConfig(**spec["clip"]["config"])).eval()


def pixel_values(images: torch.Tensor) -> torch.Tensor:
    """Float images ``(N, 3, H, W)`` in [0, 1] at the world's 64 px (nearest up, area down, as the
    evaluator's ``at_world_resolution``), CLIP-normalized; differentiable."""
    if images.shape[-1] < RESOLUTION:
        images = torch.nn.functional.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="nearest")
    elif images.shape[-1] > RESOLUTION:
        images = torch.nn.functional.interpolate(images, size=(RESOLUTION, RESOLUTION), mode="area")
    from torchvision.transforms.functional import normalize

    from bench.metrics.clip import CLIP_MEAN, CLIP_STD

    return normalize(images, CLIP_MEAN, CLIP_STD)


def text_ids(prompts, device="cpu") -> torch.Tensor:
    return tokenizer()(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt")["input_ids"].to(device)


def image_embeddings(model, images: torch.Tensor) -> torch.Tensor:
    """Unit image embeddings of ``images`` (float in [0, 1])."""
    image = model.visual_projection(model.vision_model(pixel_values=pixel_values(images)).pooler_output)
    return image / image.norm(dim=-1, keepdim=True)


def embeddings(model, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit image and text embeddings of ``images`` (float in [0, 1]) and token ``ids``."""
    text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    return image_embeddings(model, images), text / text.norm(dim=-1, keepdim=True)


def as_float(pixels: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W, 3)`` to float ``(N, 3, H, W)`` in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float() / 255


def degraded(images: torch.Tensor, share: float, g: torch.Generator) -> torch.Tensor:
    """``images`` with a ``share`` of them Gaussian-blurred or noised (half each), at random strengths."""
    from torchvision.transforms.functional import gaussian_blur

    out = images.clone()
    pick = torch.rand(len(images), generator=g) < share
    kind = torch.rand(len(images), generator=g) < 0.5
    level = torch.rand(len(images), generator=g)
    for i in torch.nonzero(pick).flatten().tolist():
        if kind[i]:
            out[i] = gaussian_blur(images[i], kernel_size=7, sigma=0.3 + 1.2 * float(level[i]))
        else:
            out[i] = (images[i] + 0.06 * float(level[i]) * torch.randn(images[i].shape, generator=g)).clamp(0, 1)
    return out


@torch.enable_grad()
def optimize(model, cfg: dict, seed: int, desc: str, step_loss) -> None:
    """``cfg["steps"]`` AdamW steps at ``cfg["lr"]`` with the world model's cosine schedule on every
    weight but the token embedding (frozen: the seed's draw); ``step_loss(g)`` is one step's loss,
    its batch drawn from the generator ``g`` seeded ``seed``."""
    from bench.world.model import cosine_schedule

    g = torch.Generator().manual_seed(seed)
    model.text_model.embeddings.token_embedding.weight.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=float(cfg["lr"]))
    schedule = cosine_schedule(opt, int(cfg["steps"]))
    model.train()
    for _ in progress(range(int(cfg["steps"])), desc=desc, unit="step"):
        loss = step_loss(g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    model.eval()


def train_clip(model, cfg: dict, seed: int) -> None:
    """CLIP's contrastive loss on the renders of ``cfg["scenes"]``, duplicate captions counted positive."""
    from bench.world.model import training_scenes

    scenes = training_scenes(int(cfg["scenes"]["seed"]), int(cfg["scenes"]["count"]))
    images = as_float(np.stack([s.render(RESOLUTION) for s in scenes]))
    ids = text_ids([s.caption for s in scenes])

    def step_loss(g):
        pick = torch.randint(0, len(scenes), (int(cfg["batch_size"]),), generator=g)
        image, text = embeddings(model, degraded(images[pick], float(cfg["degraded"]), g), ids[pick])
        logits = model.logit_scale.exp().clamp(max=100) * image @ text.T
        same = (ids[pick][:, None, :] == ids[pick][None, :, :]).all(-1).float()
        targets = same / same.sum(1, keepdim=True)
        return (torch.nn.functional.cross_entropy(logits, targets) + torch.nn.functional.cross_entropy(logits.T, targets)) / 2

    optimize(model, cfg, seed, "world CLIP", step_loss)


def preference_pairs(world_model, cfg: dict, seed: int, batch_size: int = 60) -> dict:
    """The labelled pairs of ``cfg["scenes"]``'s captions: ``a`` and ``b`` (uint8 images), ``prompt``
    and ``label`` (1: a is better, 0: b, 0.5: a tie), the gold utility of each image beside."""
    from bench.models.diffusion import to_uint8
    from bench.world.gold import gold_utility
    from bench.world.model import training_scenes
    from bench.world.render import render
    from bench.world.scene import layout, random_spec

    scenes = training_scenes(int(cfg["scenes"]["seed"]), int(cfg["scenes"]["count"]))
    samples = []
    for start in progress(range(0, len(scenes), batch_size), desc="preference samples", unit="batch"):
        chunk = scenes[start : start + batch_size]
        prompts = [s.caption for s in chunk for _ in range(2)]
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + 2 * (start + i) + k) for i in range(len(chunk)) for k in range(2)]
        with torch.no_grad():
            samples += list(to_uint8(world_model.decode(world_model.sample(prompts, generators))).numpy())
    rng = np.random.default_rng(seed)
    a, b, prompts = [], [], []
    for i, scene in enumerate(scenes):
        first, second = samples[2 * i], samples[2 * i + 1]
        other = scene.spec if rng.random() < 0.5 else random_spec(scene.tag, rng)
        a += [first, first]
        b += [second, render(layout(other, rng), RESOLUTION)]
        prompts += [scene.caption, scene.caption]
    specs = [s.spec for s in scenes for _ in range(2)]
    gold_a = np.array([gold_utility(x, spec) for x, spec in zip(a, specs)])
    gold_b = np.array([gold_utility(x, spec) for x, spec in zip(b, specs)])
    label = np.where(gold_a > gold_b, 1.0, np.where(gold_a < gold_b, 0.0, 0.5))
    return {"a": np.stack(a), "b": np.stack(b), "prompt": prompts, "label": label, "gold_a": gold_a, "gold_b": gold_b}


def preference_logits(model, a: torch.Tensor, b: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """PickScore's logits: ``logit_scale.exp() * cos`` of the text with each image, ``(N, 2)``."""
    image_a, text = embeddings(model, a, ids)
    image_b, _ = embeddings(model, b, ids)
    scale = model.logit_scale.exp()
    return torch.stack([scale * (image_a * text).sum(-1), scale * (image_b * text).sum(-1)], dim=1)


def train_preference(model, pairs: dict, cfg: dict, seed: int) -> None:
    """PickScore's objective on ``pairs``: cross-entropy of the two images' softmax against the label."""
    a, b = as_float(pairs["a"]), as_float(pairs["b"])
    ids = text_ids(pairs["prompt"])
    labels = torch.from_numpy(np.stack([pairs["label"], 1 - pairs["label"]], axis=1)).float()

    def step_loss(g):
        pick = torch.randint(0, len(ids), (int(cfg["batch_size"]),), generator=g)
        return torch.nn.functional.cross_entropy(preference_logits(model, a[pick], b[pick], ids[pick]), labels[pick])

    optimize(model, cfg, seed, "world preference", step_loss)


def trained_weights(model) -> dict[str, torch.Tensor]:
    """Every weight but the token embedding (the seed's draw), rounded to float16 in place."""
    out = {}
    with torch.no_grad():
        for name, p in model.state_dict().items():
            if "token_embedding" not in name:
                p.copy_(p.half().float())
                out[name] = p.clone()
    return out


def build_scorers(world_model, spec: dict = SPEC) -> dict[str, torch.Tensor]:
    """The world CLIP and preference model trained from the seed: ``clip.*`` and ``pick.*`` tensors."""
    seed = int(spec["seed"])
    clip = initial_clip(spec)
    train_clip(clip, spec["clip"], seed)
    clip_weights = trained_weights(clip)
    pairs = preference_pairs(world_model, spec["preference"], seed)
    train_preference(clip, pairs, spec["preference"], seed)
    return {**{f"clip.{k}": v for k, v in clip_weights.items()}, **{f"pick.{k}": v for k, v in trained_weights(clip).items()}}


def models_from(weights: dict[str, torch.Tensor], spec: dict = SPEC) -> tuple:
    """The two ``CLIPModel``s of ``build_scorers``' tensors, their token embeddings drawn from the seed."""
    out = []
    for part in ("clip", "pick"):
        model = initial_clip(spec)
        state = {k.removeprefix(part + "."): v for k, v in weights.items() if k.startswith(part + ".")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if unexpected or any("token_embedding" not in k for k in missing):
            raise ValueError(f"world scorer weights do not fit the {part} model: missing {missing}, unexpected {unexpected}")
        out.append(model.requires_grad_(False).eval())
    return tuple(out)


@lru_cache(maxsize=1)
def world_build() -> str:
    """The build name of ``model=world``, whose samples the preference pairs hold."""
    from bench.config import compose, to_dict
    from bench.models import embedded_build_name

    return embedded_build_name(to_dict(compose(["model=world"]))["model"])


@lru_cache(maxsize=1)
def scorer_weights() -> dict[str, torch.Tensor]:
    """The scorers' trained tensors: the shipped file, else an earlier build in the cache
    (``<cache>/models/world-scorers-<hash>.safetensors``), else built now from the seed and cached."""
    from bench.io import cache_root
    from bench.models.prebuilt import shipped_weights

    name = build_name(world_build())
    shipped = shipped_weights(name)
    if shipped is not None:
        return shipped["tensors"]
    cached = cache_root() / "models" / f"{name}.safetensors"
    if not cached.exists():
        log.warning("no shipped weights for the world scorers %s: training them from the seed (minutes; python -m bench.models.prebuilt ships them)", name)
        write_scorers(cached)
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(cached).items()}


def write_scorers(path: Path, world_model=None) -> None:
    """Build the scorers on ``world_model`` (default: ``model=world`` loaded from its shipped weights)
    and save them to ``path`` as float16 (each weight was rounded to it), written to a sibling first so
    a killed build leaves nothing."""
    from safetensors.torch import save_file

    if world_model is None:
        from bench.config import compose, to_dict
        from bench.io import cache_root
        from bench.models import load_model

        world_model = load_model(to_dict(compose(["model=world"]))["model"], cache_root())
    weights = build_scorers(world_model, SPEC)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.half() for k, v in weights.items()}, tmp)
    tmp.replace(path)


@lru_cache(maxsize=4)
def scorer_model(part: str, device: str = "cpu"):
    """The world ``clip`` or the preference model (``pick``), frozen, on ``device``."""
    return models_from(scorer_weights())[("clip", "pick").index(part)].to(device)
