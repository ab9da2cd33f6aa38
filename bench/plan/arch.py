"""Real architectures without weights: the components of a model (or of a reward) built on the meta
device from their published configs, so parameter counts and shapes come from the code that will
run, not from a table of numbers.

The configs are data (``bench/plan/configs/*.json``), one file per component, each naming its
source (``_source``) and, where a published figure exists, its parameter count (``_parameters``,
checked by the tests). Which components a model loads is read off its config the way
``bench.models.load_model`` loads them: the pipeline's ``source``, then the ``unet:`` / ``vae:``
replacements (a ``file`` is loaded into the pipeline's own architecture, a folder brings its own).
The embedded tiny models are built from their ``build`` spec.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch

from bench.errors import UsageError

CONFIG_DIR = Path(__file__).parent / "configs"

# Hub pipelines and replacement components -> their architectures (files in CONFIG_DIR).
SD15 = {"unet": "sd15-unet", "text_encoder": "clip-vit-l14-text", "vae": "sd-vae"}
SDXL = {"unet": "sdxl-unet", "text_encoder": "clip-vit-l14-text", "text_encoder_2": "clip-vit-bigg14-text", "vae": "sdxl-vae"}
PIPELINES = {
    "stable-diffusion-v1-5/stable-diffusion-v1-5": SD15,
    "runwayml/stable-diffusion-v1-5": SD15,
    "stabilityai/stable-diffusion-xl-base-1.0": SDXL,
    "stabilityai/sdxl-turbo": SDXL,
    "segmind/SSD-1B": {**SDXL, "unet": "ssd-1b-unet"},
    "segmind/Segmind-Vega": {**SDXL, "unet": "segmind-vega-unet"},
}
COMPONENTS = {  # a model config's `unet: {repo, file: null}` / `vae:` folder brings its own architecture
    "latent-consistency/lcm-sdxl": "lcm-sdxl-unet",
    "latent-consistency/lcm-ssd-1b": "lcm-ssd-1b-unet",
    "madebyollin/sdxl-vae-fp16-fix": "sdxl-vae",
    "segmind/Segmind-Vega": "segmind-vega-unet",
}

# Metrics (rewards and evaluation scorers) -> their networks. open_clip models are built from the
# configs open_clip ships; `dtype` is what bench.metrics loads them in on CUDA.
METRICS = {  # `shares`: metrics on one loaded copy (bench.metrics.LearnedMetric.backbone)
    "pickscore": {"parts": ["pickscore-v1"], "dtype": "float16"},
    "spm-sd15": {"parts": ["step-aware:pickscore-v1"], "dtype": "float32"},  # SPO's model is never cast (bench.metrics.step_aware)
    "spm-sdxl": {"parts": ["step-aware:pickscore-v1"], "dtype": "float32"},
    "imagereward": {"parts": ["imagereward-v1"], "dtype": "float16"},
    "clip-h14": {"parts": ["open_clip:ViT-H-14"], "dtype": "float16"},
    "hpsv2": {"parts": ["open_clip:ViT-H-14"], "dtype": "float16"},
    "hpsv2.1": {"parts": ["open_clip:ViT-H-14"], "dtype": "float16"},
    "clip-l14": {"parts": ["open_clip:ViT-L-14"], "dtype": "float16", "shares": "openai-vit-l14"},
    "aesthetic": {"parts": ["open_clip:ViT-L-14", "aesthetic-mlp"], "dtype": "float16", "shares": "openai-vit-l14"},
    "clip-b32": {"parts": ["open_clip:ViT-B-32"], "dtype": "float16", "shares": "openai-vit-b32"},
    "clip-i": {"parts": ["open_clip:ViT-B-32"], "dtype": "float16", "shares": "openai-vit-b32"},
    "clip-t": {"parts": ["open_clip:ViT-B-32"], "dtype": "float16", "shares": "openai-vit-b32"},
    "dino": {"parts": ["dino-vits16"], "dtype": "float16"},
    "blip-vqa": {"parts": ["blip-vqa"], "dtype": "float16", "shares": "blip-vqa"},
    "attribute_binding": {"parts": ["blip-vqa"], "dtype": "float16", "shares": "blip-vqa"},
    "text_alignment": {"parts": ["florence-2-large", "roberta-large"], "dtype": "float16"},
    "t2i-spatial-owlv2": {"parts": ["owlv2-base-patch16-ensemble"], "dtype": "float16", "shares": "owlv2"},
    "t2i-numeracy-owlv2": {"parts": ["owlv2-base-patch16-ensemble"], "dtype": "float16", "shares": "owlv2"},
    "t2i-complex-3in1-owlv2": {"parts": ["owlv2-base-patch16-ensemble"], "dtype": "float16", "shares": "owlv2"},  # with blip-vqa's and clip-b32's, loaded as those metrics
    "fid": {"parts": ["inception-v3"], "dtype": "float32", "shares": "inception"},  # FID's Inception runs in float32 on every device
    "kid": {"parts": ["inception-v3"], "dtype": "float32", "shares": "inception"},
}
WEIGHT_FREE = ("brightness", "contrast", "colorfulness", "jpeg_compressibility", "ref_color", "ref_layout")


def load_config(name: str) -> dict:
    path = CONFIG_DIR / f"{name}.json"
    if not path.is_file():
        raise UsageError(f"no architecture config {name} in {CONFIG_DIR}")
    return json.loads(path.read_text())


def public(config: dict) -> dict:
    """The constructor's keyword arguments: a config without its ``_`` notes."""
    return {k: v for k, v in config.items() if not k.startswith("_")}


@dataclass
class Component:
    """One network of a pipeline: what class it is and the keyword arguments that build it."""

    role: str  # unet, text_encoder, text_encoder_2, vae
    cls: str  # diffusers:UNet2DConditionModel, transformers:CLIPTextModel, ...
    config: dict
    name: str  # the config file's name, or tiny:<model>
    source: str = ""
    parameters: int | None = None  # the published count, where one is on file

    def key(self) -> str:
        return json.dumps({"cls": self.cls, "config": self.config}, sort_keys=True)


@dataclass
class Architecture:
    """Every component a model config loads, and the resolution it samples at."""

    model: str
    resolution: int
    components: dict[str, Component] = field(default_factory=dict)

    @property
    def unet(self) -> Component:
        return self.components["unet"]

    @property
    def latent_side(self) -> int:
        vae = self.components["vae"].config
        return self.resolution // 2 ** (len(vae["block_out_channels"]) - 1)

    def guidance_embedded(self) -> bool:
        return bool(self.unet.config.get("time_cond_proj_dim"))


def _component(role: str, name: str) -> Component:
    cfg = load_config(name)
    return Component(role, cfg["_class"], public(cfg), name, cfg.get("_source", ""), cfg.get("_parameters"))


def is_flow_model(model_cfg: dict) -> bool:
    """A rectified-flow transformer (its sampler a flow kind): no memory model here yet."""
    from bench.models.flow import FLOW_KINDS

    return str(model_cfg["sampler"]["kind"]) in FLOW_KINDS


def model_architecture(model_cfg: dict) -> Architecture:
    """The components ``bench.models.load_model`` would load for ``model_cfg``, without loading anything."""
    arch = Architecture(str(model_cfg["name"]), int(model_cfg["resolution"]))
    if is_flow_model(model_cfg):
        raise UsageError(f"bench plan has no memory model of the flow transformers yet (model '{model_cfg['name']}'): run the command itself, "
                         "or plan its UNet counterpart")
    if model_cfg["source"] == "tiny":
        spec = model_cfg["build"]
        arch.components["unet"] = Component("unet", "diffusers:UNet2DConditionModel", dict(spec["unet"]), f"tiny:{model_cfg['name']}")
        arch.components["vae"] = Component("vae", "diffusers:AutoencoderKL", dict(spec["vae"]), f"tiny:{model_cfg['name']}")
        arch.components["text_encoder"] = Component("text_encoder", "transformers:CLIPTextModel", dict(spec["text_encoder"]), f"tiny:{model_cfg['name']}")
        if spec.get("layout") == "sdxl":
            arch.components["text_encoder_2"] = Component("text_encoder_2", "transformers:CLIPTextModelWithProjection", dict(spec["text_encoder_2"]), f"tiny:{model_cfg['name']}")
        return arch
    source = str(model_cfg["source"])
    layout = PIPELINES.get(source)
    if layout is None:
        raise UsageError(
            f"bench plan knows no architecture for model '{model_cfg['name']}' (source {source}): add its component configs to "
            f"{CONFIG_DIR} and the pipeline to bench.plan.arch.PIPELINES"
        )
    for role, name in layout.items():
        arch.components[role] = _component(role, name)
    for role in ("unet", "vae"):
        spec = model_cfg.get(role)
        if not spec:
            continue
        if spec.get("file"):  # a weights file loaded into the pipeline's own architecture (DMD2)
            continue
        name = COMPONENTS.get(str(spec["repo"]))
        if name is None:
            raise UsageError(f"bench plan knows no architecture for model '{model_cfg['name']}''s {role} {spec['repo']}: add it to bench.plan.arch.COMPONENTS")
        arch.components[role] = _component(role, name)
    return arch


# ---- building on the meta device ---------------------------------------------------------------
def instantiate(cls: str, config: dict) -> torch.nn.Module:
    """The module of ``cls`` built from ``config`` on the current default device (call it under
    ``torch.device("meta")``: no memory, no initialization cost worth the name)."""
    library, _, name = cls.partition(":")
    if library == "diffusers":
        import diffusers

        return getattr(diffusers, name)(**config)
    if library == "transformers":
        import transformers

        model_cls = getattr(transformers, name)
        return model_cls(model_cls.config_class(**config))
    raise UsageError(f"unknown component class {cls}")


def build_part(part: str) -> torch.nn.Module:
    """A metric's network by its name in ``METRICS`` (config files, open_clip, or the harness's own)."""
    kind, _, name = part.partition(":")
    if kind == "open_clip":
        import open_clip

        from bench.metrics.clip import quiet_root_logger

        with quiet_root_logger():  # "No pretrained weights loaded": none are wanted
            return open_clip.create_model(name, pretrained=None, device="meta")
    if kind == "step-aware":
        from transformers import CLIPConfig

        from bench.metrics.step_aware import StepAwarePreferenceModel

        return StepAwarePreferenceModel(CLIPConfig(**public(load_config(name))))
    if part == "aesthetic-mlp":
        from bench.metrics.clip import AestheticMLP

        return AestheticMLP(768)
    if part == "blip-vqa":
        from transformers import BlipForQuestionAnswering

        from bench.metrics.vqa import blip_vqa_config

        return BlipForQuestionAnswering(blip_vqa_config())
    if part == "inception-v3":
        from torchvision.models import inception_v3

        return inception_v3(weights=None, aux_logits=False, init_weights=False)
    cfg = load_config(part)
    if cfg["_class"] == "bench:imagereward":
        from bench.metrics.imagereward import BLIP_VIT_LARGE, build_net

        return build_net(BLIP_VIT_LARGE, public(cfg), cfg["vocab_size"])
    return instantiate(cfg["_class"], public(cfg))


@lru_cache(maxsize=64)
def _counts(cls: str, config_json: str) -> tuple[int, tuple[tuple[str, tuple[int, ...]], ...]]:
    with torch.device("meta"):
        module = instantiate(cls, json.loads(config_json))
    return sum(p.numel() for p in module.parameters()), tuple((n, tuple(p.shape)) for n, p in module.named_parameters())


def parameter_count(component: Component) -> int:
    return _counts(component.cls, json.dumps(component.config, sort_keys=True))[0]


def parameter_shapes(component: Component) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return _counts(component.cls, json.dumps(component.config, sort_keys=True))[1]


@lru_cache(maxsize=64)
def metric_parameters(name: str) -> int | None:
    """Parameters of a metric's networks (0 for a weight-free one, None when its architecture is not on file)."""
    if name in WEIGHT_FREE:
        return 0
    spec = METRICS.get(name)
    if spec is None:
        return None
    total = 0
    for part in spec["parts"]:
        with torch.device("meta"):
            total += sum(p.numel() for p in build_part(part).parameters())
    return total


def metric_bytes(name: str, device: str) -> int | None:
    """Bytes of a metric's weights as ``bench.metrics`` holds them: float16 on CUDA (the step-aware
    model and FID's Inception in float32), float32 on CPU."""
    n = metric_parameters(name)
    if n is None:
        return None
    half = device == "cuda" and METRICS.get(name, {}).get("dtype") == "float16"
    return n * (2 if half else 4)


def shared_metric_bytes(names, device: str) -> tuple[int, list[str]]:
    """Bytes of the weights of several metrics loaded together (metrics on one backbone share one
    copy, as ``bench.metrics.LearnedMetric.backbone`` makes them), and the metrics not on file."""
    seen, total, unknown = set(), 0, []
    for name in dict.fromkeys(names):
        spec = METRICS.get(name) or {}
        key = spec.get("shares", name)
        if key in seen:
            continue
        seen.add(key)
        b = metric_bytes(name, device)
        if b is None:
            unknown.append(name)
        else:
            total += b
    return total, unknown


def lora_shapes(component: Component, rank: int, targets) -> tuple[tuple[int, ...], ...]:
    """The LoRA matrices ``bench.trainer.add_lora`` adds (peft's ``LoraConfig(target_modules=...)``: every
    linear layer whose name ends in a target): A (rank, in) and B (out, rank) per layer."""
    out = []
    for name, shape in parameter_shapes(component):
        module, _, leaf = name.rpartition(".")
        if leaf == "weight" and len(shape) == 2 and any(module == t or module.endswith("." + t) for t in targets):
            out += [(int(rank), shape[1]), (shape[0], int(rank))]
    return tuple(out)


def trainable_shapes(component: Component, lora_rank: int | None, targets) -> tuple[tuple[int, ...], ...]:
    """Shapes of the parameters the trainer trains: the LoRA adapters' (``bench.trainer.add_lora``), or every UNet weight."""
    if lora_rank:
        return lora_shapes(component, int(lora_rank), tuple(targets))
    return tuple(shape for _, shape in parameter_shapes(component))


def part_parameters(component: Component, prefixes) -> int:
    """Parameters of the UNet submodules whose names start with one of ``prefixes``."""
    return sum(_numel(shape) for name, shape in parameter_shapes(component) if name.split(".")[0] in set(prefixes))


def backbone_unet(location: str | None, default: Component) -> Component:
    """The UNet of a pipeline or UNet repo (LaSRO's ``rm_backbone``), or ``default`` for None."""
    if not location:
        return default
    if location in PIPELINES:
        return _component("unet", PIPELINES[location]["unet"])
    if location in COMPONENTS:
        return _component("unet", COMPONENTS[location])
    raise UsageError(f"bench plan knows no architecture for the UNet of {location}: add it to bench.plan.arch.COMPONENTS")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
