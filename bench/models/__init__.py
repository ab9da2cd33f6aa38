"""Load a model by config: the embedded tiny builds, a hub id, or a local folder, through one path."""

from __future__ import annotations

import os
from pathlib import Path

from bench.config import stable_hash
from bench.errors import UsageError, WeightsMissingError
from bench.models.diffusion import DiffusionModel, Sampler

__all__ = ["DiffusionModel", "Sampler", "load_model", "make_sampler", "pipeline_location"]


def make_sampler(sampler_cfg: dict, steps=None, guidance=None) -> Sampler:
    """The model's sampler, with the suite's or the user's step count and guidance on top."""
    ts = sampler_cfg.get("timesteps")
    return Sampler(
        kind=sampler_cfg["kind"],
        steps=int(steps or sampler_cfg["steps"]),
        guidance=float(sampler_cfg["guidance"] if guidance is None else guidance),
        eta=float(sampler_cfg.get("eta") or 0.0),
        timesteps=tuple(int(t) for t in ts) if ts else None,
    )


def pipeline_location(model_cfg: dict, cache_dir: Path) -> tuple[str, str | None, dict]:
    """Where the pipeline lives (hub id or folder), its revision, and what identifies its weights.

    Embedded models are built on first use into ``<cache>/models/<name>-<hash>``;
    the hash covers the whole build spec, so editing the spec rebuilds.
    """
    source = model_cfg["source"]
    if source == "tiny":
        spec = model_cfg["build"]
        digest = stable_hash(spec)[:12]
        path = Path(cache_dir) / "models" / f"{model_cfg['name']}-{digest}"
        if not (path / "model_index.json").exists():
            from bench.models.tiny import build_tiny_pipeline

            build_tiny_pipeline(spec, path)
        return str(path), None, {"source": "tiny", "build_hash": digest}
    return source, model_cfg.get("revision"), {"source": source, "revision": model_cfg.get("revision")}


def load_model(model_cfg: dict, cache_dir: Path, sampler: Sampler | None = None) -> DiffusionModel:
    """Load the pipeline through diffusers' ``from_pretrained`` (hub id or local folder alike)."""
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    for lib in (diffusers, transformers):  # loading bars and notices would drown the harness's own output
        lib.utils.logging.set_verbosity_error()
        lib.utils.logging.disable_progress_bar()

    if model_cfg.get("layout") == "sdxl":
        raise UsageError(
            f"model '{model_cfg['name']}' is an SDXL-layout pipeline (two text encoders, size conditioning), which this "
            "version cannot run yet: use a Stable-Diffusion-1.x-layout model (sd15, tiny, tiny-fewstep)"
        )
    location, revision, identity = pipeline_location(model_cfg, cache_dir)
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    try:
        pipe = DiffusionPipeline.from_pretrained(location, revision=revision, local_files_only=offline)
    except (OSError, ValueError) as err:
        if Path(location).exists() and not offline:
            raise
        raise WeightsMissingError(
            f"weights for model '{model_cfg['name']}' ({location}"
            + (f"@{revision}" if revision else "")
            + f") are not on disk and the hub is offline: run `bench prefetch model={model_cfg['name']}` "
            f"where there is network, or set model.source=/path/to/pipeline ({type(err).__name__})"
        ) from None
    missing = [c for c in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, c, None) is None]
    if missing:
        raise WeightsMissingError(f"pipeline {location} lacks {', '.join(missing)}; only Stable-Diffusion-layout pipelines load here")
    return DiffusionModel(
        name=model_cfg["name"],
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler_config=pipe.scheduler.config,
        sampler=sampler or make_sampler(model_cfg["sampler"]),
        resolution=model_cfg["resolution"],
        identity=identity,
    )
