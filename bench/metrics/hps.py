"""HPSv2 and HPSv2.1 (Wu et al., 2023): open_clip ViT-H-14 fine-tuned on human preferences.

The official package (``hpsv2`` 1.2.0) builds ViT-H-14 with its own open_clip fork, loads
``checkpoint['state_dict']`` of ``hf_hub_download("xswu/HPSv2", "HPS_v2_compressed.pt" |
"HPS_v2.1_compressed.pt")`` and scores ``normalize(image) . normalize(text)``; its ``score()`` reloads
the checkpoint on every call and embeds one image at a time. Here the same state dict goes into
upstream open_clip's ViT-H-14 (the same parameter names), loaded once per process and shared by
the metrics of one version, and a whole batch is preprocessed and embedded at once.

The preprocessing is the fork's validation transform (``light_augmentation=True``), which is not
open_clip's resize-and-crop: to tensor, bicubic resize of the longest side to 224 (torchvision's
tensor resize, antialiased since torchvision 0.17: the 2023 v2.0 benchmark table predates that, so
re-scoring its downscaled images may differ slightly from it), zero padding to a centred square, then
CLIP normalization. Scores are reported as ``100 * cos``: the HPSv2 benchmark's and ``hpsv2.evaluate``'s
convention (its README tables: 23-29 for v2.0, 14-33 for v2.1); ``hpsv2.score()`` returns the raw cosine (divide by 100).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from bench.metrics import HubFiles, MetricInfo
from bench.metrics.clip import CLIP_MEAN, CLIP_STD, OpenClipScore, quiet_root_logger, stored_pixels

HPS_REPO = "xswu/HPSv2"  # hpsv2/utils.py hps_version_map, downloaded with hf_hub_download
HPS_REVISION = "697403c78157020a1ae59d23f111aa58ced35b0a"  # a snapshot holding both checkpoints (hub cache paths in many GitHub projects)
SCALE = "100 * cos(image, text) of the HPS fine-tuned open_clip ViT-H-14 (HPSv2 benchmark convention; hpsv2.score() returns cos = this / 100)"


def hps_preprocess(images: torch.Tensor, size: int = 224) -> torch.Tensor:
    """The HPSv2 fork's validation transform (``ToTensor``, ``ResizeMaxSize``, normalize), on a batch.

    ``images`` are float ``(N, 3, H, W)`` in [0, 1] decoded from uint8; they are re-quantized to those
    uint8 values and divided by 255 exactly as ``ToTensor`` does with the PIL image. The longest side
    is resized to ``size`` (bicubic, Python ``round`` of each side, as the fork) and the rest padded
    with zeros (black, before normalization), half on each side, the odd pixel right/bottom. The fork
    skips the pad when the longest side is already ``size``; then a non-square image cannot enter
    the model at all, so padding it here only changes a case the official code cannot score.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    x = stored_pixels(images).float().div(255)
    height, width = x.shape[-2:]
    scale = size / float(max(height, width))
    if scale != 1.0:
        x = TF.resize(x, [round(height * scale), round(width * scale)], InterpolationMode.BICUBIC)
    pad_h, pad_w = size - x.shape[-2], size - x.shape[-1]
    x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
    return TF.normalize(x, CLIP_MEAN, CLIP_STD)


class HPSv2(OpenClipScore):
    """HPS v2.0: ``100 * cos`` of the image and prompt embeddings of ``HPS_v2_compressed.pt`` (the
    ``hpsv2.score()`` default version; DSPO and Diffusion-DPO's ``hps_utils`` use it)."""

    arch, tag = "ViT-H-14", "laion2b_s32b_b79k"  # the architecture the checkpoint fine-tunes; its weights are replaced
    checkpoint = "HPS_v2_compressed.pt"  # a file name in HPS_REPO, or a local path (tests)
    info = MetricInfo("hpsv2", "v2.0", True, SCALE, HPS_REPO, HPS_REVISION)

    @property
    def weight_files(self) -> str:
        return f"{HPS_REPO}/{self.checkpoint} (open_clip {self.arch} fine-tuned by HPS)"

    @property
    def hub_files(self) -> tuple:
        return (HubFiles(HPS_REPO, HPS_REVISION, (self.checkpoint,)),)

    def backbone(self) -> tuple:
        return ("hps", self.checkpoint)  # one copy per checkpoint; v2.0 and v2.1 are different weights

    def checkpoint_path(self) -> str:
        if Path(self.checkpoint).is_file():
            return self.checkpoint
        from huggingface_hub import hf_hub_download

        return hf_hub_download(HPS_REPO, self.checkpoint, **self.hub_kwargs(HPS_REPO))

    def load_official(self):
        import open_clip

        path = self.checkpoint_path()
        with quiet_root_logger():  # "no pretrained weights loaded": the checkpoint replaces every weight
            model = open_clip.create_model(self.arch, pretrained=None)
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True)["state_dict"])
        return model, hps_preprocess, open_clip.get_tokenizer(self.arch)

    def load_tiny(self):
        model, _, tokenizer = super().load_tiny()  # the seeded tiny open_clip of clip.py
        return model, hps_preprocess, tokenizer

    def download(self) -> list[str]:
        return [self.checkpoint_path()]

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        model, preprocess, _ = self.loaded()
        pixels = preprocess(images.to(self.device), model.visual.image_size[0]).to(self.dtype)
        with torch.no_grad():
            emb = model.encode_image(pixels).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        return 100 * super().score(images, prompts)


class HPSv21(HPSv2):
    """HPS v2.1: the same recipe on ``HPS_v2.1_compressed.pt`` (trained on more data; the
    ``hpsv2.evaluate()`` default and the README's v2.1 benchmark). Not comparable with v2.0."""

    checkpoint = "HPS_v2.1_compressed.pt"
    info = MetricInfo("hpsv2.1", "v2.1", True, SCALE, HPS_REPO, HPS_REVISION)
