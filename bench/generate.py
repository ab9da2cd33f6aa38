"""Seeded, batch-size-invariant generation into a content-addressed image store.

* The seed of every image is a pure function of (suite, prompt index, image
  index, base seed), and every image draws its noise from its own generator,
  so outputs do not depend on batch size, device count or process.
* An image's key hashes everything that determines it (model weights identity,
  checkpoint, prompt, seed, sampler, resolution, dtype). A re-run generates only
  what is missing; a stored image that fails to decode is regenerated.
* The sampler enters as ``sampler_identity`` (its fields less those at their
  defaults), so a new sampler option keeps every stored image's key. Images stored
  under the keys of earlier versions (``legacy_image_common``) are adopted once.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.config import stable_hash
from bench.errors import DataError
from bench.io import progress as progress_bar
from bench.io import adopt_file, write_bytes
from bench.models.diffusion import DiffusionModel, Sampler, sampler_identity, to_uint8

log = logging.getLogger(__name__)


def derived_seed(*parts) -> int:
    """A 63-bit seed from sha256("part/part/..."): independent of order of work, batch or process."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def image_seed(suite: str, prompt_index: int, image_index: int, base_seed: int) -> int:
    return derived_seed(suite, prompt_index, image_index, base_seed)


class CheckpointId(str):
    """A checkpoint's id (``Trainer.train_id``) that also knows the id bench gave the same checkpoint
    before its keys were content keys (``legacy``), so images stored under the old one are found."""

    legacy: str | None

    def __new__(cls, value: str, legacy: str | None = None):
        obj = super().__new__(cls, value)
        obj.legacy = legacy if legacy != value else None
        return obj


@dataclass(frozen=True)
class ImageJob:
    prompt_index: int
    image_index: int
    prompt: str
    seed: int
    key: str
    legacy_key: str | None = None  # the key earlier versions stored it under (adopted once by ``ImageStore.adopt_legacy``)


class ImageStore:
    """PNG files under ``root/<key[:2]>/<key>.png``, written atomically."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.png"

    def save(self, key: str, image: np.ndarray) -> None:
        buf = io.BytesIO()
        Image.fromarray(image, "RGB").save(buf, format="PNG")
        write_bytes(self.path(key), buf.getvalue())

    def has(self, key: str, size: int) -> bool:
        """Whether a sound image is stored. Checks the header and every chunk's CRC without
        decompressing (truncation, garbage and bit flips all fail); a corrupt file is removed."""
        path = self.path(key)
        if not path.exists():
            return False
        try:
            with Image.open(path) as im:
                if im.format != "PNG" or im.mode != "RGB" or im.size != (size, size):
                    raise ValueError(f"{im.format} {im.mode} {im.size}, expected RGB PNG {size}x{size}")
                im.verify()
            return True
        except Exception as err:  # any failure means the file cannot be trusted
            log.warning("stored image %s is corrupt (%s); regenerating it", path, err)
            path.unlink(missing_ok=True)
            return False

    def adopt_legacy(self, jobs: list[ImageJob], size: int) -> int:
        """Give the sound images stored under their legacy keys (before content keys) their keys, once,
        so an existing store keeps serving them; one line says how many. Returns the count."""
        adopted = 0
        for job in jobs:
            if job.legacy_key and not self.path(job.key).exists() and self.path(job.legacy_key).exists() and self.has(job.legacy_key, size):
                adopted += adopt_file(self.path(job.legacy_key), self.path(job.key))
        if adopted:
            log.info("image store: %d stored images moved to their content keys (sampler options at their defaults left out), once; none regenerated", adopted)
        return adopted

    def load(self, key: str) -> np.ndarray:
        """The stored image as uint8 (H, W, 3)."""
        with Image.open(self.path(key)) as im:
            return np.asarray(im)


def image_key(common: dict, prompt: str, seed: int) -> str:
    return stable_hash({**common, "prompt": prompt, "seed": seed})[:40]


def legacy_image_common(model: DiffusionModel, sampler: Sampler, checkpoint: str | None, dtype: str) -> dict:
    """What an image key hashed before content keys: every sampler field (``asdict``) and the
    checkpoint's legacy id. Kept only to find the images an existing store holds under it."""
    return {
        "model": model.identity,
        "checkpoint": getattr(checkpoint, "legacy", None) or checkpoint,
        "sampler": asdict(sampler),
        "resolution": model.resolution,
        "dtype": dtype,
    }


def plan_images(suite_name, prompts, images_per_prompt, base_seed, model: DiffusionModel, sampler: Sampler, checkpoint: str | None, dtype: str) -> list[ImageJob]:
    common = {
        "model": model.identity,
        "checkpoint": None if checkpoint is None else str(checkpoint),
        "sampler": sampler_identity(sampler),
        "resolution": model.resolution,
        "dtype": dtype,
    }
    legacy = legacy_image_common(model, sampler, checkpoint, dtype)
    jobs = []
    for p, prompt in enumerate(prompts):
        for i in range(images_per_prompt):
            seed = image_seed(suite_name, p, i, base_seed)
            key, old = image_key(common, prompt, seed), image_key(legacy, prompt, seed)
            jobs.append(ImageJob(p, i, prompt, seed, key, old if old != key else None))
    return jobs


@dataclass
class GenerationStats:
    generated: int = 0
    cached: int = 0
    model_seconds: float = 0.0  # time inside sampling and decoding (model forwards)


@torch.no_grad()
def generate(model: DiffusionModel, jobs: list[ImageJob], store: ImageStore, batch_size: int, sampler: Sampler, progress: bool = True) -> GenerationStats:
    """Make sure every job's image is in the store; generate the missing ones in batches."""
    stats = GenerationStats()
    store.adopt_legacy(jobs, model.resolution)
    todo = [j for j in jobs if not store.has(j.key, model.resolution)]
    stats.cached = len(jobs) - len(todo)
    bar = progress_bar(None, progress and bool(todo), total=len(todo), desc=f"generate {model.name}", unit="img")
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        generators = [torch.Generator().manual_seed(j.seed) for j in batch]
        t0 = time.perf_counter()
        latents = model.sample([j.prompt for j in batch], generators, sampler)
        images = to_uint8(model.decode(latents)).numpy()
        stats.model_seconds += time.perf_counter() - t0
        for job, image in zip(batch, images):
            store.save(job.key, image)
        stats.generated += len(batch)
        bar.update(len(batch))
    bar.close()
    return stats


def load_images(store: ImageStore, jobs: list[ImageJob]) -> torch.Tensor:
    """uint8 (N, H, W, 3) for the jobs, from the store (``generate`` has just checked them)."""
    arrays = []
    for job in jobs:
        try:
            arrays.append(store.load(job.key))
        except (OSError, ValueError) as err:
            raise DataError(f"stored image {store.path(job.key)} became unreadable during the run ({err}); re-run the command to regenerate it") from None
    return torch.from_numpy(np.stack(arrays))
