"""CLIP-family metrics with their canonical weights: PickScore and CLIP score on a named backbone.

Each loads its weights once per process, on first use, and scores whole batches: the images of a
batch are preprocessed exactly as the official code does (PIL bicubic resize of the stored uint8
pixels, center crop, CLIP normalization), then embedded in one forward pass, in float16 on GPU.
The official code scores one prompt's images per call (PickScore's README and evaluation script)
or one image at a time (CLIP score examples); the numbers are the same (``tests/test_clip_metrics.py``).

``scorers=tiny`` swaps the weights for a small randomly initialized model of the same family
(seeded, built offline) so that a whole suite runs with no download; its scores mean nothing
and are labelled so.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from bench.images import open_rgb, thread_map
from bench.io import scratch_dir
from bench.metrics import HubFiles, LearnedMetric, MetricInfo, seeded
from bench.metrics.reference import ReferenceMetric

PICKSCORE_REPO = "yuvalkirstain/PickScore_v1"
PICKSCORE_REVISION = "a4e4367c6dfa7288a00c550414478f865b875800"  # a snapshot loaded with from_pretrained in several GitHub projects
LAION_H14_REPO = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore's processor and tokenizer
LAION_H14_REVISION = "1c2b8495b28150b8a4922ee1c8edee224c284c0c"  # hub cache snapshot paths of 3 public projects

# The preprocessing of laion/CLIP-ViT-H-14-laion2B-s32B-b79K's preprocessor_config.json (OpenAI's CLIP constants).
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def clip_image_processor():
    """The PIL-based CLIP image processor (transformers 4's ``CLIPImageProcessor``, ``...Pil`` in 5):
    shortest side to 224 bicubic, center crop 224, rescale, normalize."""
    import transformers

    cls = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return cls(
        do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True, crop_size={"height": 224, "width": 224},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True,
    )


@lru_cache(maxsize=1)
def clip_tokenizer_dir() -> Path:
    """The real CLIP BPE vocabulary (shipped by open_clip) as a transformers tokenizer folder."""
    from bench.models.tiny import clip_tokenizer_files

    directory = scratch_dir("bench-clip-tokenizer-")
    clip_tokenizer_files(directory)
    return directory


def stored_pixels(images: torch.Tensor) -> torch.Tensor:
    """The uint8 ``(N, 3, H, W)`` values that float images in [0, 1] were decoded from."""
    return images.detach().float().mul(255).clamp_(0, 255).round_().to(torch.uint8)


def to_pil(images: torch.Tensor) -> list:
    """Float images in [0, 1] decoded from uint8 back to the exact uint8 PIL images."""
    from PIL import Image

    pixels = stored_pixels(images).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [Image.fromarray(p) for p in pixels]


def preprocess_each(preprocess, items: Sequence) -> torch.Tensor:
    """The official one-image preprocessing of each item, stacked; on threads (``thread_map``)."""
    return torch.stack(thread_map(preprocess, items))


def _features(output) -> torch.Tensor:
    """``get_*_features`` returns a tensor in transformers 4 and an output with ``pooler_output`` in 5."""
    return output if torch.is_tensor(output) else output.pooler_output


# --------------------------------------------------------------------------- PickScore


class PickScore(LearnedMetric):
    """PickScore v1 (Kirstain et al., 2023): ``logit_scale.exp() * cos(text, image)`` of a CLIP ViT-H/14
    fine-tuned on Pick-a-Pic, with the laion ViT-H/14 processor, text truncated at 77 tokens."""

    info = MetricInfo(
        name="pickscore", version="v1", higher_is_better=True, scale="logit_scale.exp() * cos (about 100 * cos; typically 18-23)",
        model_id=PICKSCORE_REPO, revision=PICKSCORE_REVISION,
    )
    weight_files = f"{PICKSCORE_REPO} (config.json, model.safetensors) and the tokenizer of {LAION_H14_REPO}"
    processor_id = LAION_H14_REPO
    hub_files = (HubFiles(PICKSCORE_REPO, PICKSCORE_REVISION, ("*.json", "*.safetensors")), HubFiles(LAION_H14_REPO, LAION_H14_REVISION, ("*.json", "*.txt")))

    def load_official(self):
        from transformers import CLIPModel, CLIPTokenizer

        model = CLIPModel.from_pretrained(self.info.model_id, **self.hub_kwargs(self.info.model_id))
        tokenizer = CLIPTokenizer.from_pretrained(self.processor_id, **self.hub_kwargs(self.processor_id))
        return model, clip_image_processor(), tokenizer

    def load_tiny(self):
        from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

        config = CLIPConfig(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408, max_position_embeddings=77),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=32),
            projection_dim=16,
        )
        with seeded():
            model = CLIPModel(config)
        return model, clip_image_processor(), CLIPTokenizer.from_pretrained(clip_tokenizer_dir())

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        model, processor, tokenizer = self.loaded()
        pixels = preprocess_each(lambda im: processor(images=im, return_tensors="pt")["pixel_values"][0], to_pil(images)).to(self.device, self.dtype)
        text = tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt").to(self.device)
        with torch.no_grad():
            image_emb = _features(model.get_image_features(pixel_values=pixels)).float()
            text_emb = _features(model.get_text_features(**text)).float()
            image_emb = image_emb / image_emb.norm(dim=-1, keepdim=True)
            text_emb = text_emb / text_emb.norm(dim=-1, keepdim=True)
            return (model.logit_scale.exp().float() * (text_emb * image_emb).sum(-1)).double().cpu()


# --------------------------------------------------------------------------- CLIP score (open_clip)

TINY_OPEN_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 8, "patch_size": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2},
}


@contextmanager
def quiet_root_logger():
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        root.setLevel(level)


@lru_cache(maxsize=1)
def _register_tiny_open_clip() -> str:
    import open_clip

    directory = scratch_dir("bench-open-clip-")
    (directory / "bench-tiny-clip.json").write_text(json.dumps(TINY_OPEN_CLIP))
    open_clip.add_model_config(directory)
    return "bench-tiny-clip"


OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"  # what open_clip's download_pretrained fetches from an hf_hub tag (its safetensors alternative)
# open_clip's pretrained tags, each at a commit of its hub repository (snapshot folders of open_clip's own downloads
# in several public projects, and /resolve/<commit>/ URLs); open_clip itself would fetch `main`.
OPEN_CLIP_REVISIONS = {
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K": LAION_H14_REVISION,
    "timm/vit_large_patch14_clip_224.openai": "18d0535469bb561bf468d76c1d73aa35156c922b",
    "timm/vit_base_patch32_clip_224.openai": "a6f597a30f7b82c51704746581f9a4e41421e878",
}


def tag_preprocess(cfg: dict) -> dict:
    """The preprocessing keywords open_clip applies for a pretrained tag (its mean, std, interpolation and
    resize mode merged over the model's), for loading the same weights from a file."""
    return {f"image_{key}": cfg[key] for key in ("mean", "std", "interpolation", "resize_mode") if cfg.get(key) is not None}


class OpenClipScore(LearnedMetric):
    """CLIP score: the cosine between the image's and the prompt's open_clip embeddings (the PSO and
    Diffusion-DPO tables print this raw cosine; torchmetrics' CLIPScore is max(100 * cos, 0)).

    The weights are open_clip's for the pretrained tag, fetched by us at a pinned commit of the tag's hub
    repository (open_clip would fetch ``main``) and loaded with the tag's preprocessing (``tag_preprocess``),
    as ``create_model_and_transforms(arch, pretrained=tag)`` loads them (tested equal)."""

    arch, tag = "ViT-H-14", "laion2b_s32b_b79k"

    @classmethod
    def hub_repo(cls) -> str | None:
        """The hub repository of the pretrained tag; None where the tag is a local weights file."""
        import open_clip

        cfg = open_clip.get_pretrained_cfg(cls.arch, cls.tag)
        return cfg["hf_hub"].rstrip("/") if cfg.get("hf_hub") else None

    @property
    def hub_files(self) -> tuple:
        repo = self.hub_repo()
        return (HubFiles(repo, OPEN_CLIP_REVISIONS[repo], (OPEN_CLIP_WEIGHTS,)),) if repo else ()

    @property
    def weight_files(self) -> str:
        repo = self.hub_repo()
        return f"{repo}@{OPEN_CLIP_REVISIONS[repo][:7]} ({OPEN_CLIP_WEIGHTS})" if repo else self.tag

    def load_official(self):
        import open_clip
        from huggingface_hub import hf_hub_download

        repo, weights, keywords = self.hub_repo(), self.tag, {}  # a local file: loaded as open_clip loads a path
        if repo:
            weights = hf_hub_download(repo, OPEN_CLIP_WEIGHTS, **self.hub_kwargs(repo))
            keywords = tag_preprocess(open_clip.get_pretrained_cfg(self.arch, self.tag))
        with quiet_root_logger():  # open_clip logs to the root logger
            model, _, preprocess = open_clip.create_model_and_transforms(self.arch, pretrained=weights, **keywords)
            return model, preprocess, open_clip.get_tokenizer(self.arch)

    def load_tiny(self):
        import open_clip

        name = _register_tiny_open_clip()
        with seeded(), quiet_root_logger():  # "no pretrained weights loaded" is the point here
            model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
            return model, preprocess, open_clip.get_tokenizer(name)

    def backbone(self) -> tuple:
        return ("open_clip", self.arch, self.tag)  # CLIP-I and CLIP-T on the same backbone share the loaded model

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        model, preprocess, _ = self.loaded()
        pixels = preprocess_each(preprocess, to_pil(images)).to(self.device, self.dtype)
        with torch.no_grad():
            emb = model.encode_image(pixels).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def embed_texts(self, prompts: Sequence[str]) -> torch.Tensor:
        model, _, tokenizer = self.loaded()
        with torch.no_grad():
            emb = model.encode_text(tokenizer(list(prompts)).to(self.device)).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        return (self.embed_images(images) * self.embed_texts(prompts)).sum(-1).double().cpu()


class ClipH14(OpenClipScore):
    info = MetricInfo("clip-h14", "1", True, "cos(image, text), open_clip ViT-H-14 laion2b_s32b_b79k", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")


class ClipL14(OpenClipScore):
    arch, tag = "ViT-L-14", "openai"
    info = MetricInfo("clip-l14", "1", True, "cos(image, text), OpenAI CLIP ViT-L/14 (open_clip 'openai')", "timm/vit_large_patch14_clip_224.openai")


class ClipB32(OpenClipScore):
    arch, tag = "ViT-B-32", "openai"
    info = MetricInfo("clip-b32", "1", True, "cos(image, text), OpenAI CLIP ViT-B/32 (open_clip 'openai')", "timm/vit_base_patch32_clip_224.openai")


# --------------------------------------------------------------------------- LAION aesthetic predictor v2

# The head at a commit of christophschuhmann/improved-aesthetic-predictor (main on 2023-10-12; the file is
# unchanged since it was added in 61f2f07, 2022-06-30). It is a plain git blob: its sha256 is computed from
# the repository at that commit, and equals that of the copy in PSO's repository (pso_pytorch/assets/).
AESTHETIC_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor/raw/6934dd81792f086e613a121dbce43082cb8be85e/sac+logos+ava1-l14-linearMSE.pth"
AESTHETIC_SHA256 = "21dd590f3ccdc646f0d53120778b296013b096a035a2718c9cb0d511bff0f1e0"


class AestheticMLP(torch.nn.Module):
    """The improved-aesthetic-predictor head (``MLP`` of its ``simple_inference.py``, state-dict keys
    ``layers.N``); its dropouts are inactive in eval mode."""

    def __init__(self, width: int = 768):
        super().__init__()
        from torch import nn

        self.layers = nn.Sequential(
            nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2), nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class Aesthetic(OpenClipScore):
    """LAION aesthetic predictor v2 (``sac+logos+ava1-l14-linearMSE``): the MLP on the L2-normalized
    OpenAI CLIP ViT-L/14 image embedding, about 1-10. The CLIP backbone is shared with ``clip-l14``."""

    arch, tag = "ViT-L-14", "openai"
    needs_prompts = False  # the image embedding alone
    head_url, head_sha256 = AESTHETIC_URL, AESTHETIC_SHA256
    info = MetricInfo("aesthetic", "v2", True, "LAION aesthetic predictor v2 (sac+logos+ava1-l14-linearMSE) on OpenAI CLIP ViT-L/14, about 1-10", "christophschuhmann/improved-aesthetic-predictor")

    def head(self) -> torch.nn.Module:
        from bench.metrics import _LOADED

        key = ("aesthetic-head", self.head_url, self.scorers, str(self.device), self.dtype)
        if key not in _LOADED:
            width = self.loaded()[0].visual.output_dim  # 768 for ViT-L/14
            if self.scorers == "tiny":
                with seeded():
                    mlp = AestheticMLP(width)
            else:
                mlp = AestheticMLP(width)
                mlp.load_state_dict(torch.load(self.url_weights(self.head_url, self.head_sha256), map_location="cpu", weights_only=True))
            _LOADED[key] = mlp.to(self.device, self.dtype).eval()
        return _LOADED[key]

    def download(self) -> list[str]:
        return super().download() + [str(self.url_weights(self.head_url, self.head_sha256))]

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        emb = self.embed_images(images)
        with torch.no_grad():
            return self.head()(emb.to(self.dtype)).float().squeeze(-1).double().cpu()


# --------------------------------------------------------------------------- CLIP-I (DreamBench)


class ClipI(ReferenceMetric, OpenClipScore):
    """CLIP-I (DreamBooth, Ruiz et al., 2023): the mean cosine between a generated image's CLIP
    embedding and each of its subject's photos (the DreamBench protocol of ``ReferenceMetric``).
    The DreamBooth repository fixes no backbone; OpenAI ViT-B/32 is ImagenHub's choice and shares
    the loaded model with ``clip-b32``. Photos go through the same preprocessing at their own size."""

    arch, tag = "ViT-B-32", "openai"
    info = MetricInfo("clip-i", "1", True, "cos(image, subject photo), OpenAI CLIP ViT-B/32, mean over the subject's photos", "timm/vit_base_patch32_clip_224.openai")

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_images(images)

    def embed_references(self, paths) -> torch.Tensor:
        model, preprocess, _ = self.loaded()
        pixels = preprocess_each(lambda p: preprocess(open_rgb(p)), paths).to(self.device, self.dtype)
        with torch.no_grad():
            emb = model.encode_image(pixels).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b.T


# --------------------------------------------------------------------------- CLIP-T (DreamBench)


class ClipT(OpenClipScore):
    """CLIP-T (DreamBooth, Ruiz et al., 2023): prompt fidelity, the cosine between the generated
    image's and its prompt's CLIP embeddings, on the CLIP-I backbone (OpenAI ViT-B/32, ImagenHub's
    ``MetricCLIP_T``), sharing the loaded model with ``clip-i`` and ``clip-b32``.

    The text is the prompt the image was generated from, unique token included ("a sks dog in the
    jungle"), as the DreamBooth paper defines it and ImagenHub scores it. Textual Inversion's
    evaluator drops its placeholder word instead and Custom Diffusion reports 2.5 * max(cos, 0):
    numbers from those scripts are not this column. Numerically this is ``clip-b32`` under the
    DreamBench name."""

    arch, tag = "ViT-B-32", "openai"
    info = MetricInfo("clip-t", "1", True, "cos(image, prompt as generated, unique token included), OpenAI CLIP ViT-B/32", "timm/vit_base_patch32_clip_224.openai")
