"""DreamBench DINO: subject fidelity as DINO sees it (DreamBooth, Ruiz et al., 2023).

The score of a generated image is the mean, over its subject's real photos, of the cosine between
the DINO ViT-S/16 embeddings of the two (the ``ReferenceMetric`` protocol; photos embedded once).

* Embedding: what the official ``torch.hub.load('facebookresearch/dino:main', 'dino_vits16')``
  returns, the CLS token after the final LayerNorm (its head is the identity). DINO rewards a
  generated image for showing *this* subject rather than any member of its class, which CLIP-I
  does much less.
* Weights: hub ``facebook/dino-vits16`` at commit a7a4d16 ("Adding safetensors variant"), the
  transformers conversion of that checkpoint (``convert_dino_to_pytorch.py``, base model, no pooler)
  as ``pytorch_model.bin`` and, from that commit, ``model.safetensors`` (transformers loads the latter
  when present; ``bench prefetch`` takes both, in case the variant has another name). The conversion
  kept ``ViTConfig``'s default ``layer_norm_eps=1e-12`` where DINO's LayerNorms use 1e-6, so the
  config is loaded with 1e-6: the forward is then exactly the official one.
* Preprocessing: that of DINO's ``eval_knn.py``, used by ImagenHub (``miscmodels/dino_vit.py``)
  and Custom Diffusion (``customconcept101/evaluate.py``): torchvision ``Resize(256)`` of the short
  side, bicubic (``interpolation=3``), ``CenterCrop(224)``, ImageNet mean/std, on the PIL image of
  the stored uint8 pixels; the reference photos alike, from their files.

``tests/test_dreambench_metrics.py`` checks all this against the official architecture.
"""

from __future__ import annotations

from typing import Sequence

import torch

from bench.images import open_rgb, thread_map
from bench.metrics import HubFiles, LearnedMetric, MetricInfo, seeded
from bench.metrics.clip import preprocess_each, to_pil
from bench.metrics.reference import ReferenceMetric

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DINO_LAYER_NORM_EPS = 1e-6  # partial(nn.LayerNorm, eps=1e-6) in DINO's vision_transformer.py
DINO_REPO = "facebook/dino-vits16"
DINO_REVISION = "a7a4d161f5c0bd70478c05ca5777ec7cd8848021"  # HF commits page: "Adding safetensors variant", 2023-06-22


def dino_transform():
    """Resize 256 (bicubic, short side), center crop 224, ImageNet normalization: PIL -> (3, 224, 224)."""
    from torchvision import transforms

    return transforms.Compose(
        [
            transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(224),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class Dino(ReferenceMetric, LearnedMetric):
    info = MetricInfo(
        "dino", "1", True, "cos(DINO ViT-S/16 CLS embedding, the subject photo's), mean over the subject's photos", DINO_REPO, DINO_REVISION
    )
    weight_files = f"{DINO_REPO}@{DINO_REVISION[:7]} (config.json, model.safetensors or pytorch_model.bin)"
    hub_files = (HubFiles(DINO_REPO, DINO_REVISION, ("config.json", "model.safetensors", "pytorch_model.bin")),)

    def load_official(self):
        from transformers import ViTModel

        model = ViTModel.from_pretrained(
            self.info.model_id, add_pooling_layer=False, layer_norm_eps=DINO_LAYER_NORM_EPS, **self.hub_kwargs(self.info.model_id)
        )
        return model, dino_transform()

    def load_tiny(self):
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=16, layer_norm_eps=DINO_LAYER_NORM_EPS
        )
        with seeded():
            model = ViTModel(config, add_pooling_layer=False)
        return model, dino_transform()

    def embed_pil(self, images: Sequence) -> torch.Tensor:
        """L2-normalized CLS embeddings of PIL images, in one forward pass."""
        model, transform = self.loaded()
        pixels = preprocess_each(transform, images).to(self.device, self.dtype)
        with torch.no_grad():
            emb = model(pixel_values=pixels).last_hidden_state[:, 0].float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_pil(to_pil(images))

    def embed_references(self, paths) -> torch.Tensor:
        return self.embed_pil(thread_map(open_rgb, paths))

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b.T
