"""Load a model by config: the embedded tiny builds, a hub id, or a local folder, through one path."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from bench.config import stable_hash
from bench.errors import UsageError, WeightsMissingError, writing
from bench.io import hub_offline
from bench.models.diffusion import SAMPLER_KINDS, DiffusionModel, Sampler, sampler_identity
from bench.models.flow import FLOW_KINDS, FLOW_LAYOUTS, LAYOUTS, FlowModel

__all__ = ["DiffusionModel", "FlowModel", "Sampler", "embedded_build_name", "embedded_builder", "embedded_build_path", "load_model", "make_sampler", "pipeline_location", "sampler_identity"]

log = logging.getLogger(__name__)


def make_sampler(sampler_cfg: dict, steps=None, guidance=None) -> Sampler:
    """The model's sampler, with the suite's or the user's step count and guidance on top. A card's
    explicit ``timesteps`` hold at their own length; another step count takes the scheduler's own
    ``set_timesteps`` (DMD2 at 1 step: LCMScheduler's [999]), as the pipeline would."""
    steps = int(steps or sampler_cfg["steps"])
    ts = tuple(int(t) for t in sampler_cfg.get("timesteps") or ())
    overrides = sampler_cfg.get("scheduler_config") or {}
    return Sampler(
        kind=sampler_cfg["kind"],
        steps=steps,
        guidance=float(sampler_cfg["guidance"] if guidance is None else guidance),
        eta=float(sampler_cfg.get("eta") or 0.0),
        timesteps=ts if len(ts) == steps else None,
        scheduler_config=tuple(sorted(dict(overrides).items())),
    )


def embedded_build_name(model_cfg: dict) -> str:
    """``tiny-<hash>`` (``world-<hash>``): an embedded model's build, the hash covering its build spec and the builder's
    source (the name of its cache folder and of its shipped weights, ``bench.models.prebuilt``); for
    the world model (``data: world``) also the source of the world it learns and of its pre-training."""
    import bench.models.tiny as builder

    sources = [Path(builder.__file__)]
    if model_cfg["build"].get("layout") in FLOW_LAYOUTS:
        sources.append(Path(builder.__file__).with_name("tiny_flow.py"))
    if model_cfg["build"].get("data") == "world":
        import bench.world as world

        sources += [Path(world.__file__).parent / f"{name}.py" for name in ("scene", "render", "model")]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()
    prefix = "world" if model_cfg["build"].get("data") == "world" else "tiny"
    return f"{prefix}-" + stable_hash({"spec": model_cfg["build"], "builder": digest})[:12]


def embedded_builder(spec: dict):
    """(build, pretrained_weights) of an embedded model's spec: the flow layouts' (``bench.models.tiny_flow``) or the UNet ones'."""
    if spec.get("layout") in FLOW_LAYOUTS:
        from bench.models.tiny_flow import build_flow_pipeline, flow_pretrained_weights

        return build_flow_pipeline, flow_pretrained_weights
    from bench.models.tiny import build_tiny_pipeline, pretrained_weights

    return build_tiny_pipeline, pretrained_weights


def embedded_build_path(model_cfg: dict, cache_dir: Path) -> Path:
    """``<cache>/models/tiny-<hash>``: where an embedded model's build lives."""
    return Path(cache_dir) / "models" / embedded_build_name(model_cfg)


def pipeline_location(model_cfg: dict, cache_dir: Path) -> tuple[str, str | None, dict]:
    """Where the pipeline lives (hub id or folder), its revision, and what identifies its weights.

    Embedded models are built on first use into ``<cache>/models/tiny-<hash>``, from the pre-trained
    weights the package ships for that hash (``bench.models.prebuilt``) or else by pre-training; the
    hash covers the whole build spec and the builder's source, so editing either rebuilds, and two
    names for one spec (``tiny`` and ``tiny-onestep``, the same weights with another sampler) share one build.
    Processes sharing a cache build it once: the others wait on its lock file and load it.
    """
    source = model_cfg["source"]
    if source == "tiny":
        spec = model_cfg["build"]
        path = embedded_build_path(model_cfg, cache_dir)
        digest = path.name.split("-", 1)[1]
        if not (path / "model_index.json").exists():
            from filelock import FileLock

            from bench.models.prebuilt import shipped_weights

            with writing(path.parent):
                path.parent.mkdir(parents=True, exist_ok=True)
                with FileLock(path.with_name(f".{path.name}.lock")):  # released by the kernel when its process dies
                    if not (path / "model_index.json").exists():  # not built by another process while this one waited
                        shipped = shipped_weights(path.name)
                        if shipped is None and (spec.get("pretrain") or spec.get("pretrain_vae") or spec.get("data")):
                            log.warning("%s: no shipped pre-training for this build; pre-training it from its seed (minutes; "
                                        "`python -m bench.models.prebuilt` ships it)", path.name)
                        embedded_builder(spec)[0](spec, path, shipped)
        return str(path), None, {"source": "tiny", "build_hash": digest}
    return source, model_cfg.get("revision"), {"source": source, "revision": model_cfg.get("revision")}


def _missing(model_cfg: dict, what: str, err: Exception) -> WeightsMissingError:
    return WeightsMissingError(
        f"weights for model '{model_cfg['name']}' ({what}) are not on disk and the hub is offline: run "
        f"`bench prefetch model={model_cfg['name']}` where there is network, or point the config at a local copy "
        f"(model.source=/path/to/pipeline) ({type(err).__name__})"
    )


def load_component(spec: dict, model_cfg: dict, cls_name: str):
    """A UNet or VAE replacing the pipeline's own: a diffusers folder (hub repo or local path), or
    one weights file in it (DMD2 ships ``dmd2_sdxl_4step_unet_fp16.bin``) loaded into the pipeline's
    architecture by the caller. Returns a module, or a state dict when ``file`` is given."""
    import diffusers

    repo, file, revision = spec["repo"], spec.get("file"), spec.get("revision")
    try:
        if file is None:
            return getattr(diffusers, cls_name).from_pretrained(repo, revision=revision, local_files_only=hub_offline())
        path = Path(repo) / file if Path(repo).is_dir() else None
        if path is None:
            from huggingface_hub import hf_hub_download

            path = Path(hf_hub_download(repo, file, revision=revision, local_files_only=hub_offline()))
    except (OSError, ValueError) as err:
        raise _missing(model_cfg, f"{repo}/{file or ''}", err) from None
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


def load_model(model_cfg: dict, cache_dir: Path, sampler: Sampler | None = None) -> DiffusionModel:
    """Load the pipeline through diffusers' ``from_pretrained`` (hub id or local folder alike).

    Stable-Diffusion and SDXL layouts both load; ``unet:`` / ``vae:`` in the model config replace
    the pipeline's own (DMD2's and LCM's distilled UNets on SDXL base, the fp16-safe SDXL VAE).
    """
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    for lib in (diffusers, transformers):  # loading bars and notices would drown the harness's own output
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()

    sampler = sampler or make_sampler(model_cfg["sampler"])
    if sampler.kind not in SAMPLER_KINDS + FLOW_KINDS:
        raise UsageError(
            f"model '{model_cfg['name']}' uses sampler kind '{sampler.kind}', which is not implemented "
            f"(implemented: {', '.join(SAMPLER_KINDS + FLOW_KINDS)})"
        )
    location, revision, identity = pipeline_location(model_cfg, cache_dir)
    try:
        pipe = DiffusionPipeline.from_pretrained(location, revision=revision, local_files_only=hub_offline())
    except (OSError, ValueError) as err:
        if Path(location).exists() and not hub_offline():
            raise
        raise _missing(model_cfg, location + (f"@{revision}" if revision else ""), err) from None
    if getattr(pipe, "transformer", None) is not None:  # a rectified-flow pipeline (SD3, FLUX)
        return load_flow_model(pipe, model_cfg, sampler, identity)
    if sampler.kind in FLOW_KINDS:
        raise UsageError(f"model '{model_cfg['name']}' is an epsilon model: sampler kind '{sampler.kind}' needs a flow model (SD3, FLUX)")
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, c, None) is None]
    if missing:
        raise WeightsMissingError(f"pipeline {location} lacks {', '.join(missing)}; only Stable-Diffusion- and SDXL-layout pipelines load here")
    for part, cls_name in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
        spec = model_cfg.get(part)
        if not spec:
            continue
        loaded = load_component(spec, model_cfg, cls_name)
        if isinstance(loaded, dict):
            getattr(pipe, part).load_state_dict(loaded)
        else:
            setattr(pipe, part, loaded)
        identity = {**identity, part: {k: spec.get(k) for k in ("repo", "file", "revision")}}
    model = DiffusionModel(
        name=model_cfg["name"],
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler_config=pipe.scheduler.config,
        sampler=sampler,
        resolution=model_cfg["resolution"],
        identity=identity,
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
        zero_uncond=bool(getattr(pipe.config, "force_zeros_for_empty_prompt", False)),
    )
    model.timesteps()  # an unsupported scheduler config fails here, in one line, before any work
    return model


def load_flow_model(pipe, model_cfg: dict, sampler: Sampler, identity: dict):
    """A loaded SD3- or FLUX-layout pipeline as a ``FlowModel``; another transformer pipeline is refused in one line."""
    kind = type(pipe.transformer).__name__
    if kind not in LAYOUTS:
        raise WeightsMissingError(f"pipeline of model '{model_cfg['name']}' has a {kind}; the flow models load SD3 and FLUX layouts ({', '.join(LAYOUTS)})")
    default_length = 512 if LAYOUTS[kind] == "flux" else 256  # the pipelines' max_sequence_length
    model = FlowModel(model_cfg["name"], pipe, sampler, model_cfg["resolution"], identity, model_cfg.get("max_sequence_length") or default_length)
    model.timesteps()  # an unsupported scheduler config fails here, in one line, before any work
    return model
