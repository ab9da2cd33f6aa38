"""The deterministic inputs of the ImageReward parity check: weights, images, prompts, configs.

``record_imagereward.py`` (the official package, in its own environment) and
``tests/test_imagereward.py`` (this project) both rebuild them from here, bit for bit: every tensor
of the package's state dict is drawn from a generator seeded by the SHA-256 of its name, every image
from numpy's PCG64 with a fixed seed. Only torch, numpy and the vocabulary writer are needed.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch

# THUDM/ImageReward med_config.json: BLIP's configs/med_config.json (BERT-base with cross-attention;
# encoder_width is overwritten by the ViT's width, 1024, when the model is built).
MED_CONFIG = {
    "architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-12, "max_position_embeddings": 512,
    "model_type": "bert", "num_attention_heads": 12, "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2,
    "vocab_size": 30524, "encoder_width": 768, "add_cross_attention": True,
}

# "real": the package's own architecture (ViT-L/16 + BERT-base, 447M parameters). "small": the same
# code on a small ViT and a 2-layer BERT; the package's MLP is fixed at 768 inputs, so the BERT keeps
# its width (the recording script patches the package's create_vit for this case only).
CASES = {
    "real": {"vit": {"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}, "med_config": MED_CONFIG},
    "small": {
        "vit": {"patch_size": 16, "embed_dim": 64, "depth": 2, "num_heads": 4},
        "med_config": {**MED_CONFIG, "num_hidden_layers": 2, "intermediate_size": 256, "max_position_embeddings": 64, "vocab_size": 512},
    },
}

# (width, height): three sizes, so that the resize and the crop of non-square images are exercised
# and a batch (one size) holds several images.
IMAGE_SIZES = [(256, 256)] * 3 + [(320, 240)] * 3 + [(200, 300)] * 2
PROMPTS = [
    "a photo of a cat sitting on a red table",
    "",
    "An astronaut riding a horse on the moon, highly detailed digital painting, dramatic light, by a famous artist, trending, 8k",  # > 35 tokens
    "Café au lait, DETAILED!!!",  # case and accents
    "a small blue house under the night sky",
    "the [ENC] token spelled out",  # a BLIP special token in the text
    "portrait of a woman, oil painting",
    "a dog",
]


def package_shapes(vit: dict, med_config: dict) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The package's ImageReward state dict, name -> (shape, dtype), from this project's network (whose
    names are the package's) plus the three entries that only the package has."""
    from bench.metrics.imagereward import ImageRewardNet

    with torch.device("meta"):
        net = ImageRewardNet(vit, med_config, med_config["vocab_size"])
    shapes = {k: (tuple(v.shape), v.dtype) for k, v in net.state_dict().items()}
    shapes["blip.text_encoder.embeddings.position_ids"] = ((1, med_config["max_position_embeddings"]), torch.int64)
    for name, width in (("vision_proj", vit["embed_dim"]), ("text_proj", med_config["hidden_size"])):  # BLIP_Pretrain's embed_dim 256
        shapes[f"blip.{name}.weight"], shapes[f"blip.{name}.bias"] = ((256, width), torch.float32), ((256,), torch.float32)
    return shapes


def shapes_digest(shapes: dict) -> str:
    lines = sorted(f"{name}:{tuple(shape)}:{str(dtype).replace('torch.', '')}" for name, (shape, dtype) in shapes.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def seeded_tensor(name: str, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A tensor that depends only on its name and shape. Unit-gain scales keep activations of order 1
    through 24 layers: weights N(0, 1/fan_in), norms 1 + N(0, 0.1^2), biases and embeddings N(0, 0.02^2)."""
    if not dtype.is_floating_point:  # the position-id buffer
        return torch.arange(shape[-1], dtype=dtype).expand(shape).clone()
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") >> 1
    z = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("cls_token", "pos_embed") or ".embeddings." in name and "LayerNorm" not in name or leaf == "bias":
        return 0.02 * z
    if len(shape) == 1:  # LayerNorm weights
        return 1 + 0.1 * z
    return z / math.sqrt(math.prod(shape[1:]))


def seeded_state_dict(shapes: dict) -> dict[str, torch.Tensor]:
    return {name: seeded_tensor(name, shape, dtype) for name, (shape, dtype) in shapes.items()}


def image_arrays() -> list[np.ndarray]:
    """uint8 (H, W, 3) images: coarse 16-pixel colour blocks plus fine noise, so both survive the resize."""
    rng = np.random.default_rng(20230128)
    out = []
    for width, height in IMAGE_SIZES:
        blocks = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3))
        coarse = np.repeat(np.repeat(blocks, 16, axis=0), 16, axis=1)[:height, :width]
        out.append(np.clip(coarse + rng.integers(-40, 41, (height, width, 3)), 0, 255).astype(np.uint8))
    return out


def array_digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes() + str(array.shape).encode()).hexdigest()
