"""Target images with captions: a DreamBench subject's photos or a style set.

Methods that fine-tune toward given images (DreamBooth, PSO for concept customization and
style transfer) get them as one ``TargetImages``: uint8 pixels at the model's resolution and one
caption per image. Images are resized on the short side and center-cropped, as the diffusers
DreamBooth and text-to-image scripts do (``Resize`` + ``CenterCrop``).

A style set is any captioned image dataset in the Hugging Face ``imagefolder`` layout (a folder
of images with ``metadata.jsonl`` or ``metadata.csv`` naming ``file_name`` and a caption column)
or a hub dataset with an image and a caption column.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bench.errors import DataError

CAPTION_COLUMNS = ("text", "caption", "prompt")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # the image files a folder is read for
PREPROCESS_THREADS = 8  # thread_map's most threads


def thread_map(fn: Callable, items: Sequence) -> list:
    """``[fn(x) for x in items]`` on up to ``PREPROCESS_THREADS`` threads, for per-image CPU work
    (decoding, PIL resizing, the official preprocessing transforms): PIL releases the GIL while it
    resizes, and each item is processed alone, so the results are the serial ones, bit for bit. A
    scorer on a GPU is otherwise bound by this one-core loop (PickScore on an H200: 65 img/s on one
    thread, 205 on eight; ``benchmarks/scoring.py threads=1``)."""
    workers = min(PREPROCESS_THREADS, os.cpu_count() or 1, len(items))
    if workers <= 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(fn, items))


def open_rgb(path: str | Path) -> Image.Image:
    """An image file as RGB; a missing or undecodable file is one DataError line."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"cannot read image {path}: {err} (replace or remove the file)") from None


def square(img: Image.Image, size: int) -> torch.Tensor:
    """Resize the short side to ``size`` (bicubic) and center-crop: uint8 ``(3, size, size)``."""
    w, h = img.size
    scale = size / min(w, h)
    img = img.convert("RGB").resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.Resampling.BICUBIC)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return torch.from_numpy(np.asarray(img.crop((left, top, left + size, top + size))).copy()).permute(2, 0, 1)


@dataclass
class TargetImages:
    pixels: torch.Tensor  # uint8 (N, 3, R, R)
    captions: list[str]
    source: str
    prior_prompt: str | None = None  # the class prompt of DreamBooth's prior preservation ("a photo of dog")

    def __post_init__(self):
        if len(self.captions) != self.pixels.shape[0]:
            raise ValueError("one caption per target image")
        if not self.captions:
            raise DataError(f"no target images in {self.source}")

    @cached_property
    def sha256(self) -> str:
        h = hashlib.sha256(self.pixels.contiguous().numpy().tobytes())
        h.update("\n".join(self.captions).encode())
        return h.hexdigest()

    def manifest(self) -> dict:
        return {"source": self.source, "images": len(self.captions), "unique_captions": len(set(self.captions)), "sha256": self.sha256}


def images_from_files(paths: list[Path], captions: list[str], size: int, source: str, prior_prompt: str | None = None) -> TargetImages:
    return TargetImages(torch.stack([square(open_rgb(p), size) for p in paths]), list(captions), source, prior_prompt)


def read_captioned_images(data_cfg: dict, size: int) -> TargetImages:
    """A captioned image dataset (``kind: images``): a local imagefolder or a hub dataset."""
    import datasets

    from bench.io import hub_offline

    source = str(data_cfg["source"])
    local = Path(source).exists()
    if local and not (Path(source) / "metadata.jsonl").is_file() and not (Path(source) / "metadata.csv").is_file():
        raise DataError(f"{source} has no metadata.jsonl or metadata.csv: write one line per image with file_name and text (the Hugging Face imagefolder layout)")
    try:
        if local:
            ds = datasets.load_dataset("imagefolder", data_dir=source, split="train")
        else:
            ds = datasets.load_dataset(source, split=data_cfg.get("split") or "train", revision=data_cfg.get("revision"))
    except Exception as err:  # datasets raises many types for a missing dataset offline
        hint = "run once with network (or `bench prefetch`), or give data=FOLDER in the imagefolder layout" if hub_offline() or not local else "check the folder"
        raise DataError(f"cannot load the image dataset {source}: {type(err).__name__}: {str(err).splitlines()[0][:200]} ({hint})") from None
    image_col = data_cfg.get("image_column") or "image"
    caption_col = data_cfg.get("caption_column") or next((c for c in CAPTION_COLUMNS if c in ds.column_names), None)
    if image_col not in ds.column_names or caption_col not in ds.column_names:
        raise DataError(f"image dataset {source} has columns {ds.column_names}: set data.image_column and data.caption_column")
    if data_cfg.get("limit"):
        ds = ds.select(range(min(int(data_cfg["limit"]), len(ds))))
    pixels = torch.stack([square(row[image_col], size) for row in ds])
    return TargetImages(pixels, [str(c) for c in ds[caption_col]], source)
