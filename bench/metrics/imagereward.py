"""ImageReward v1.0 (Xu et al., NeurIPS 2023): BLIP's ViT-L/16 image encoder, its BERT text encoder
cross-attending to the image tokens, an MLP on the [CLS] feature, standardized to mean 0 / std 1.

Scores equal the official ``image-reward`` package's ``ImageReward.score(prompt, image)`` (1.5,
``ImageReward/ImageReward.py``): the prompt tokenized by bert-base-uncased (plus the BLIP special
tokens ``[DEC]`` and ``[ENC]``), padded to 35 tokens, its [CLS] token left in place; the image
resized (shortest side 224, PIL bicubic), center-cropped to 224, normalized with OpenAI CLIP's
mean/std. The package encodes one image per call; here a whole batch goes through one forward pass,
in float16 on GPU. The network is built from timm's ``VisionTransformer`` and transformers'
``BlipTextModel`` (the port of BLIP's ``med.py``), whose parameter names are the package's own, so
``ImageReward.pt`` loads without renaming (``tests/test_imagereward.py`` checks the numbers).

When the images require grad (ReFL, DRaFT), the preprocessing runs on the tensor (bicubic resize with
antialiasing, center crop, normalize) so that the reward back-propagates to the pixels.
"""

from __future__ import annotations

import itertools
import json
import string
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from bench.io import scratch_dir
from bench.metrics import HubFiles, LearnedMetric, MetricInfo, seeded
from bench.metrics.clip import CLIP_MEAN, CLIP_STD, AestheticMLP, preprocess_each, to_pil

# ImageReward.py: the standardization of the MLP output; ``_transform`` normalizes with OpenAI CLIP's constants.
REWARD_MEAN, REWARD_STD = 0.16717362830052426, 1.0333394966054072
BERT_TOKENIZER = "google-bert/bert-base-uncased"  # BLIP's init_tokenizer: BertTokenizer "bert-base-uncased" + [DEC], [ENC]
BERT_TOKENIZER_REVISION = "86b5e0934494bd15c9632b12f734a8a67f723594"  # hub cache snapshot paths (~15) under this name and bert-base-uncased
IMAGEREWARD_REPO = "THUDM/ImageReward"
# HF commit page: a README edit (parent 9fabc27) after 7a9e21f uploaded ImageReward.pt (sha256 d71dc8d4...de561f6)
IMAGEREWARD_REVISION = "ba3af6204edef2c89cb0e47a0a7c62b9b2fc8514"
IMAGE_SIZE, MAX_TOKENS = 224, 35
# BLIP's create_vit('large'): ViT-L/16, qkv bias, LayerNorm eps 1e-6, no pre-logits; its width (1024)
# replaces med_config.json's encoder_width for the text encoder's cross-attention.
BLIP_VIT_LARGE = {"patch_size": 16, "embed_dim": 1024, "depth": 24, "num_heads": 16}

TINY_VIT = {"patch_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 4}
TINY_MED_CONFIG = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 64,
    "hidden_act": "gelu", "layer_norm_eps": 1e-12, "pad_token_id": 0,
}


class ImageRewardNet(nn.Module):
    """BLIP's image and text encoders under the package's attribute names (``blip.visual_encoder``,
    ``blip.text_encoder``, ``mlp``), so its state dict keys are ``ImageReward.pt``'s."""

    def __init__(self, vit: dict, med_config: dict, vocab_size: int):
        super().__init__()
        from functools import partial

        from timm.models.vision_transformer import VisionTransformer
        from transformers import BlipTextConfig, BlipTextModel

        self.blip = nn.Module()
        self.blip.visual_encoder = VisionTransformer(
            img_size=IMAGE_SIZE, mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0, global_pool="", **vit
        )
        m = med_config
        text_config = BlipTextConfig(
            vocab_size=vocab_size, hidden_size=m["hidden_size"], encoder_hidden_size=vit["embed_dim"], intermediate_size=m["intermediate_size"],
            num_hidden_layers=m["num_hidden_layers"], num_attention_heads=m["num_attention_heads"], max_position_embeddings=m["max_position_embeddings"],
            hidden_act=m["hidden_act"], layer_norm_eps=m["layer_norm_eps"], pad_token_id=m["pad_token_id"], bos_token_id=vocab_size - 2,  # [DEC]
            is_decoder=True,  # builds the cross-attention layers; forward runs bidirectional (is_decoder=False), as med.py's 'multimodal' mode
        )
        self.blip.text_encoder = BlipTextModel(text_config, add_pooling_layer=False)
        self.mlp = AestheticMLP(m["hidden_size"])  # ImageReward's MLP is the aesthetic predictor's layer stack

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image_embeds = self.blip.visual_encoder.forward_features(pixels)  # all tokens, after the final LayerNorm
        # The package also passes an all-ones encoder_attention_mask, which adds zeros: left out.
        text = self.blip.text_encoder(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds, is_decoder=False)
        reward = self.mlp(text.last_hidden_state[:, 0, :]).squeeze(-1).float()
        return (reward - REWARD_MEAN) / REWARD_STD


def build_net(vit: dict, med_config: dict, vocab_size: int, state_dict: dict | None = None) -> ImageRewardNet:
    """The network; with ``state_dict`` (ImageReward.pt's keys) it is built on the meta device and the
    weights assigned, skipping a random initialization of 447M parameters. Keys the package's model
    does not use (``blip.vision_proj``, ``blip.text_proj``, the position-id buffer) are ignored."""
    from bench.errors import DataError

    if state_dict is None:
        return ImageRewardNet(vit, med_config, vocab_size)
    with torch.device("meta"):
        net = ImageRewardNet(vit, med_config, vocab_size)
    missing = [k for k in net.state_dict() if k not in state_dict]
    if missing:
        raise DataError(f"the ImageReward checkpoint lacks {len(missing)} of the model's {len(net.state_dict())} tensors (first: {missing[0]}): it is not an ImageReward v1.0 state dict")
    net.load_state_dict({k: state_dict[k] for k in net.state_dict()}, assign=True)
    embeddings = net.blip.text_encoder.embeddings  # its position ids are a non-persistent buffer
    embeddings.position_ids = torch.arange(embeddings.position_embeddings.num_embeddings).expand((1, -1))
    assert not any(t.is_meta for t in itertools.chain(net.parameters(), net.buffers()))
    return net


def blip_tokenizer(name_or_dir: str, **kwargs):
    """BLIP's ``init_tokenizer``: bert-base-uncased plus ``[DEC]`` (bos) and ``[ENC]``. ImageReward never
    writes them into a prompt; they matter only if a prompt spells them out."""
    from transformers import BertTokenizer

    tokenizer = BertTokenizer.from_pretrained(name_or_dir, **kwargs)
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tokenizer


TINY_WORDS = (
    "a an the of in on with and at by to from photo painting picture portrait drawing cat dog horse bird car tree house city "
    "man woman person astronaut riding red green blue yellow black white big small sitting standing under over table street "
    "forest mountain sky sea water night day light dark cafe beautiful detailed realistic style art"
).split()


def write_wordpiece_vocab(directory, extra: Sequence[str] = ()) -> Path:
    """A small uncased WordPiece vocabulary in bert-base-uncased's layout ([PAD] 0, [UNK] 100, [CLS] 101,
    [SEP] 102, [MASK] 103), with every ASCII character as a word and as a ``##`` piece, so any text
    tokenizes: the no-download tokenizer of ``scorers=tiny`` and of the parity tests. ``extra`` words
    come last (BLIP-VQA's answers "yes" and "no" as single tokens)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits
    tokens = ["[PAD]", *(f"[unused{i}]" for i in range(99)), "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokens += [*string.punctuation, *chars, *(f"##{c}" for c in chars), *TINY_WORDS, "##s", "##ing", "##ed", *extra]
    (directory / "vocab.txt").write_text("\n".join(dict.fromkeys(tokens)) + "\n")
    (directory / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True, "model_max_length": 512}))
    return directory


@lru_cache(maxsize=1)
def tiny_tokenizer_dir() -> Path:
    return write_wordpiece_vocab(scratch_dir("bench-bert-tokenizer-"))


def pil_preprocess():
    """ImageReward.py's ``_transform(224)``, the torchvision transforms on PIL images."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(IMAGE_SIZE, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(IMAGE_SIZE), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD),
    ])


def tensor_preprocess(images: torch.Tensor) -> torch.Tensor:
    """The same steps on float tensors in [0, 1], differentiable (ReFL's ``rm_preprocess`` without ToTensor).
    Antialiased like PIL's bicubic downscaling (torchvision's default for tensors since 0.17)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    x = F.resize(images, IMAGE_SIZE, interpolation=InterpolationMode.BICUBIC, antialias=True)
    return F.normalize(F.center_crop(x, IMAGE_SIZE), CLIP_MEAN, CLIP_STD)


class ImageReward(LearnedMetric):
    """ImageReward v1.0 (``THUDM/ImageReward``): the standardized reward, about N(0, 1) on its test set."""

    info = MetricInfo(
        name="imagereward", version="v1.0", higher_is_better=True, scale="standardized reward (r - 0.1672) / 1.0333, mean 0 / std 1 on ImageReward's test set",
        model_id=IMAGEREWARD_REPO, revision=IMAGEREWARD_REVISION,
    )
    differentiable = True
    tokenizer_id = BERT_TOKENIZER
    vit = BLIP_VIT_LARGE  # the package always builds BLIP's 'large' ViT
    files = ("ImageReward.pt", "med_config.json")
    weight_files = "THUDM/ImageReward (ImageReward.pt, med_config.json) and the bert-base-uncased tokenizer (vocab.txt)"
    hub_files = (
        HubFiles(IMAGEREWARD_REPO, IMAGEREWARD_REVISION, files),
        HubFiles(BERT_TOKENIZER, BERT_TOKENIZER_REVISION, ("vocab.txt", "tokenizer_config.json", "tokenizer.json", "config.json")),
    )

    def weights_file(self, name: str) -> Path:
        """``name`` from the hub repo, or from ``model_id`` when that is a local folder."""
        if Path(self.info.model_id).is_dir():
            path = Path(self.info.model_id) / name
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist")
            return path
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(self.info.model_id, name, **self.hub_kwargs(self.info.model_id)))

    def load_official(self):
        ckpt, med_path = (self.weights_file(name) for name in self.files)
        tokenizer = blip_tokenizer(self.tokenizer_id, **self.hub_kwargs(self.tokenizer_id))
        med_config = json.loads(med_path.read_text())
        state_dict = torch.load(ckpt, map_location="cpu", weights_only=True)
        net = build_net(self.vit, med_config, med_config["vocab_size"], state_dict)
        return net.requires_grad_(False), tokenizer, pil_preprocess()

    def load_tiny(self):
        tokenizer = blip_tokenizer(str(tiny_tokenizer_dir()))
        with seeded():
            net = build_net(TINY_VIT, TINY_MED_CONFIG, len(tokenizer))
            for layer in net.mlp.layers:  # unit-gain head: rewards of order 1 that vary with the image, not ~0
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=layer.in_features**-0.5)
        return net.requires_grad_(False), tokenizer, pil_preprocess()

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        net, tokenizer, preprocess = self.loaded()
        grad = images.requires_grad and torch.is_grad_enabled()
        if grad:  # reward back-propagation: differentiable tensor preprocessing
            pixels = tensor_preprocess(images.to(self.device, torch.float32)).to(self.dtype)
        else:  # the package's preprocessing of the stored uint8 pixels
            pixels = preprocess_each(preprocess, to_pil(images)).to(self.device, self.dtype)
        text = tokenizer(list(prompts), padding="max_length", truncation=True, max_length=MAX_TOKENS, return_tensors="pt").to(self.device)
        with torch.set_grad_enabled(grad):
            rewards = net(pixels, text["input_ids"], text["attention_mask"]).double()
        return rewards if grad else rewards.cpu()
