"""SPO's step-aware preference model (Liang et al., CVPR 2025; code RockeyCoss/SPO at 27a8642).

What the official code does (``spo_training_and_inference/spo/preference_models/``):

* **Architecture** (``models/time_conditioned_clip.py``, ``HFTimeConditionedCLIPModel``): PickScore's
  CLIP ViT-H/14 whose vision tower is conditioned on the diffusion timestep. The timestep goes
  through DiT's ``TimestepEmbedder`` (256 sinusoidal frequencies, cos then sin, max period 10,000,
  then Linear-SiLU-Linear to the vision width); every vision encoder layer gets adaLN modulation
  from it (SiLU, Linear to 6 x width: shift/scale/gate for attention and for the MLP,
  ``x * (1 + scale) + shift`` after each LayerNorm, the branch output times its gate), and the
  pooled CLS state after ``post_layernorm`` is modulated once more (SiLU, Linear to 2 x width:
  shift, scale). The text tower and both projections are CLIP's.
* **Loading** (``models/step_aware_preference_model.py``, ``StepAwarePreferenceModel``):
  ``HFTimeConditionedCLIPModel.from_pretrained("yuvalkirstain/PickScore_v1")``, then
  ``load_state_dict(torch.load(ckpt), strict=False)`` on the wrapper (keys ``model.*``), asserting
  that no key is missing and that every unexpected key equals the module's value. With no key
  missing, the checkpoint replaces every parameter: only PickScore_v1's ``config.json`` decides
  anything, so this module builds the model from that config and loads the checkpoint under the
  same rules, without downloading 3.9 GB of PickScore weights to overwrite. The checkpoints are
  ``sd-v1-5_step-aware_preference_model.bin`` and ``sdxl_step-aware_preference_model.bin`` of the
  hub repository ``SPO-Diffusion-Models/Step-Aware_Preference_Models`` (the training README's
  ``wget`` lines), pinned here to the commit that added them.
* **Score** (``get_preference_score``): images in [-1, 1] straight from the VAE decoder (not
  clamped), bicubic ``F.interpolate`` (no antialiasing) of the short side to 224 (the laion ViT-H/14
  processor's ``shortest_edge``), a center crop when not square, then ``(x / 2 + 0.5).clamp(0, 1)``,
  CLIP normalization; the text is the laion tokenizer's ids padded to 77; the score is
  ``logit_scale.exp() * cos(image embedding at timestep t, text embedding)``. The training
  pipelines score the x0 predicted at timestep t with ``t`` (``timesteps`` of ``extra_info``), and
  the final clean images with ``t = 0``. It runs in float32 (the model is never cast), as here.

As a metric (``spm-sd15``, ``spm-sdxl``) it scores stored images at t = 0; ``score_at`` is what
SPO's step-wise resampling calls. ``scorers=tiny`` builds a small seeded random model of the same
layout (no download).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from bench.errors import DataError
from bench.metrics import HubFiles, LearnedMetric, MetricInfo, seeded
from bench.metrics.clip import CLIP_MEAN, CLIP_STD, LAION_H14_REPO, LAION_H14_REVISION, PICKSCORE_REPO, PICKSCORE_REVISION, clip_tokenizer_dir

SPM_REPO = "SPO-Diffusion-Models/Step-Aware_Preference_Models"
SPM_REVISION = "0930261d5a1fb701f35d20c0ea8c145fe2c73738"  # "add models": the commit that uploaded both checkpoints
PICKSCORE_ID = PICKSCORE_REPO  # model_pretrained_model_name_or_path: the architecture's config (at PickScore's pin)
PROCESSOR_ID = LAION_H14_REPO  # processor_pretrained_model_name_or_path: 224 px, CLIP mean/std; the prompt tokenizer (at its pin)
IMAGE_SIZE = 224  # the laion ViT-H/14 processor's size["shortest_edge"]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedder (the official ``t_embedder``: keys ``mlp.0``, ``mlp.2``)."""

    def __init__(self, width: int, frequencies: int = 256):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # float32, as the official (frequencies is even)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class AdaLNEncoderLayer(nn.Module):
    """A CLIP vision encoder layer with adaLN modulation (keys of ``TimeConditionedCLIPEncoderLayer``)."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.clip.modeling_clip import CLIPMLP, CLIPAttention

        width = config.hidden_size
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(self, x: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(t_emb).chunk(6, dim=1)
        h = self.self_attn(hidden_states=modulate(self.layer_norm1(x), shift_msa, scale_msa))[0]
        x = x + h * gate_msa.unsqueeze(1)
        h = self.mlp(modulate(self.layer_norm2(x), shift_mlp, scale_mlp))
        return x + h * gate_mlp.unsqueeze(1)


class _Layers(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.layers = nn.ModuleList([AdaLNEncoderLayer(config) for _ in range(config.num_hidden_layers)])


class TimeConditionedVision(nn.Module):
    """The official ``TimeConditionedCLIPVisionTransformer`` (keys ``embeddings``, ``pre_layrnorm``,
    ``encoder.layers.N``, ``post_layernorm``, ``adaLN_modulation``)."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.clip.modeling_clip import CLIPVisionEmbeddings

        width = config.hidden_size
        self.embeddings = CLIPVisionEmbeddings(config)
        self.pre_layrnorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.encoder = _Layers(config)
        self.post_layernorm = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, pixel_values: torch.Tensor, t_emb: torch.Tensor) -> torch.Tensor:
        x = self.pre_layrnorm(self.embeddings(pixel_values))
        for layer in self.encoder.layers:
            x = layer(x, t_emb)
        pooled = self.post_layernorm(x[:, 0, :])
        shift, scale = self.adaLN_modulation(t_emb).chunk(2, dim=1)
        return pooled * (1 + scale) + shift


class TimeConditionedCLIP(nn.Module):
    """``HFTimeConditionedCLIPModel``: the same parameter names, built from a ``CLIPConfig``."""

    def __init__(self, config):
        super().__init__()
        from transformers import CLIPTextModel

        vision = config.vision_config
        vision._attn_implementation = "eager"  # CLIPAttention as the official layers instantiate it
        self.text_model = CLIPTextModel(config.text_config)  # keys text_model.{embeddings,encoder,final_layer_norm}
        self.vision_model = TimeConditionedVision(vision)
        self.visual_projection = nn.Linear(vision.hidden_size, config.projection_dim, bias=False)
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(float(config.logit_scale_init_value)))
        self.t_embedder = TimestepEmbedder(vision.hidden_size)

    def image_features(self, pixel_values: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        t_emb = self.t_embedder(timesteps.to(pixel_values.dtype))
        return self.visual_projection(self.vision_model(pixel_values, t_emb))

    def text_features(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.text_projection(self.text_model(input_ids=input_ids).pooler_output)


class StepAwarePreferenceModel(nn.Module):
    """The official wrapper (checkpoint keys ``model.*``) and its ``get_preference_score``."""

    def __init__(self, config, image_size: int = IMAGE_SIZE):
        super().__init__()
        self.model = TimeConditionedCLIP(config)
        self.image_size = image_size

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (N, 3, H, W), unclamped -> normalized pixels, as ``get_preference_score``."""
        import torch.nn.functional as F
        from torchvision.transforms.functional import center_crop, normalize

        scale = self.image_size / min(images.shape[-2], images.shape[-1])
        size = (int(images.shape[-2] * scale + 0.5), int(images.shape[-1] * scale + 0.5))
        images = F.interpolate(images, size=size, mode="bicubic", align_corners=False)
        if size[0] != size[1]:
            images = center_crop(images, [self.image_size, self.image_size])
        images = (images / 2 + 0.5).clamp(0, 1).float()
        return normalize(images, CLIP_MEAN, CLIP_STD)

    def preference_score(self, images: torch.Tensor, input_ids: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        dtype = self.model.logit_scale.dtype
        image = self.model.image_features(self.preprocess(images).to(dtype), timesteps)
        image = image / image.norm(dim=-1, keepdim=True)
        text = self.model.text_features(input_ids)
        text = text / text.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp() * (image * text).sum(-1)


def load_step_aware(checkpoint: str | Path, config) -> StepAwarePreferenceModel:
    """The model of ``config`` with ``checkpoint`` loaded under the official rules: ``strict=False``, no
    missing key, and every unexpected key equal to the module's value (persistent-buffer changes
    across transformers versions, e.g. ``position_ids``)."""
    model = StepAwarePreferenceModel(config)
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    missing, unexpected = model.load_state_dict(state, strict=False)
    for key in unexpected:
        value = model
        try:
            for part in key.split("."):
                value = getattr(value, part)
        except AttributeError:
            raise DataError(f"step-aware preference model {checkpoint}: unexpected key {key} has no counterpart (not the official layout)") from None
        if not torch.equal(state[key].to(value.dtype), value.detach()):
            raise DataError(f"step-aware preference model {checkpoint}: unexpected key {key} differs from the model's value")
    if missing:
        raise DataError(f"step-aware preference model {checkpoint}: {len(missing)} missing keys ({', '.join(missing[:3])}, ...): not the official layout")
    return model.requires_grad_(False).eval()


def tiny_config():
    """A small CLIP config of the same family (``scorers=tiny`` and the loading tests)."""
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=32),
        projection_dim=16,
    )


class StepAwarePreference(LearnedMetric):
    """SPO's step-aware preference model for SD1.5: ``logit_scale.exp() * cos`` at a timestep (t = 0
    on stored images). ``checkpoint`` and ``config_source`` may be local paths (tests)."""

    checkpoint = "sd-v1-5_step-aware_preference_model.bin"
    config_source = PICKSCORE_ID
    tokenizer_source = PROCESSOR_ID
    info = MetricInfo(
        name="spm-sd15", version="SPO-27a8642", higher_is_better=True,
        scale="logit_scale.exp() * cos of SPO's step-aware preference model (PickScore-like, about 100 * cos) at t = 0",
        model_id=f"{SPM_REPO}/{checkpoint}", revision=SPM_REVISION,
    )

    @property
    def hub_files(self) -> tuple:
        return (
            HubFiles(SPM_REPO, SPM_REVISION, (self.checkpoint,)),
            HubFiles(PICKSCORE_ID, PICKSCORE_REVISION, ("config.json",)),
            HubFiles(PROCESSOR_ID, LAION_H14_REVISION, ("*.json", "*.txt")),
        )

    @property
    def weight_files(self) -> str:
        return (f"{SPM_REPO}@{SPM_REVISION[:7]} {self.checkpoint}, the config.json of {self.config_source} "
                f"and the tokenizer of {self.tokenizer_source}")

    def to(self, device) -> "StepAwarePreference":
        super().to(device)
        self.dtype = torch.float32  # the official model is never cast (float32 on GPU too)
        return self

    def backbone(self) -> tuple:
        return ("step-aware", self.checkpoint, self.config_source)

    def checkpoint_path(self) -> str:
        if Path(self.checkpoint).is_file():
            return str(self.checkpoint)
        from huggingface_hub import hf_hub_download

        return hf_hub_download(SPM_REPO, self.checkpoint, **self.hub_kwargs(SPM_REPO))

    def load_official(self):
        from transformers import CLIPConfig, CLIPTokenizer

        config = CLIPConfig.from_pretrained(self.config_source, **self.hub_kwargs(self.config_source))
        tokenizer = CLIPTokenizer.from_pretrained(self.tokenizer_source, **self.hub_kwargs(self.tokenizer_source))
        return load_step_aware(self.checkpoint_path(), config), tokenizer

    def load_tiny(self):
        from transformers import CLIPTokenizer

        with seeded():
            model = StepAwarePreferenceModel(tiny_config())
            for module in model.modules():  # adaLN weights are zero-initialised officially; random here so time matters
                if isinstance(module, nn.Linear):
                    nn.init.normal_(module.weight, std=0.05)
        return model.requires_grad_(False).eval(), CLIPTokenizer.from_pretrained(clip_tokenizer_dir())

    def download(self) -> list[str]:
        """The checkpoint file, PickScore's config and the laion tokenizer, each at its pin (``hub_files``)."""
        from huggingface_hub import snapshot_download

        return [self.checkpoint_path(), *(snapshot_download(f.repo, allow_patterns=list(f.patterns), revision=f.revision) for f in self.hub_files[1:])]

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        tokenizer = self.loaded()[1]
        return tokenizer(list(prompts), max_length=tokenizer.model_max_length, padding="max_length", truncation=True, return_tensors="pt").input_ids

    @torch.no_grad()
    def score_at(self, images: torch.Tensor, prompts: Sequence[str], timesteps) -> torch.Tensor:
        """Scores of images in [-1, 1] (the VAE decoder's output, unclamped) at per-image timesteps."""
        model = self.loaded()[0]
        t = torch.as_tensor(timesteps, device=self.device).reshape(-1).expand(images.shape[0])
        with torch.autocast(self.device.type, enabled=False):  # float32 also inside a training step's autocast (the official runs it outside)
            scores = model.preference_score(images.to(self.device, self.dtype), self.tokenize(prompts).to(self.device), t)
        return scores.double().cpu()

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        return self.score_at(images * 2 - 1, prompts, torch.zeros(images.shape[0]))


class StepAwarePreferenceSDXL(StepAwarePreference):
    """The SDXL step-aware preference model (``sdxl_step-aware_preference_model.bin``; same architecture)."""

    checkpoint = "sdxl_step-aware_preference_model.bin"
    info = MetricInfo(
        name="spm-sdxl", version="SPO-27a8642", higher_is_better=True,
        scale="logit_scale.exp() * cos of SPO's SDXL step-aware preference model (PickScore-like, about 100 * cos) at t = 0",
        model_id=f"{SPM_REPO}/{checkpoint}", revision=SPM_REVISION,
    )
