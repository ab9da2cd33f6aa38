"""Seeded, batch-size-invariant generation into a content-addressed image store.

* The seed of every image is a pure function of (suite, prompt index, image
  index, base seed), and every image draws its noise from its own generator,
  so outputs do not depend on batch size, device count or process.
* An image's key hashes everything that determines it (model weights identity,
  checkpoint, prompt, seed, sampler, resolution, dtype). A re-run generates only
  what is missing; a stored image that fails to decode is regenerated.
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
from bench.io import write_bytes
from bench.models.diffusion import DiffusionModel, Sampler, to_uint8

log = logging.getLogger(__name__)


def derived_seed(*parts) -> int:
    """A 63-bit seed from sha256("part/part/..."): independent of order of work, batch or process."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def image_seed(suite: str, prompt_index: int, image_index: int, base_seed: int) -> int:
    return derived_seed(suite, prompt_index, image_index, base_seed)


@dataclass(frozen=True)
class ImageJob:
    prompt_index: int
    image_index: int
    prompt: str
    seed: int
    key: str


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

    def load(self, key: str) -> np.ndarray:
        """The stored image as uint8 (H, W, 3)."""
        with Image.open(self.path(key)) as im:
            return np.asarray(im)


def plan_images(suite_name, prompts, images_per_prompt, base_seed, model: DiffusionModel, sampler: Sampler, checkpoint: str | None, dtype: str) -> list[ImageJob]:
    common = {
        "model": model.identity,
        "checkpoint": checkpoint,
        "sampler": asdict(sampler),
        "resolution": model.resolution,
        "dtype": dtype,
    }
    jobs = []
    for p, prompt in enumerate(prompts):
        for i in range(images_per_prompt):
            seed = image_seed(suite_name, p, i, base_seed)
            key = stable_hash({**common, "prompt": prompt, "seed": seed})[:40]
            jobs.append(ImageJob(p, i, prompt, seed, key))
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
