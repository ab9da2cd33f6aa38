"""Score every stored image with every metric of a suite in one pass over decoded batches."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench.errors import DataError, UsageError
from bench.generate import ImageJob, ImageStore, load_images
from bench.images import IMAGE_SUFFIXES, open_rgb
from bench.io import progress as progress_bar
from bench.io import write_bytes
from bench.metrics import Metric, ReferenceSet
from bench.models.diffusion import from_uint8
from bench.registry import METRICS

ID_COLUMNS = ["prompt_index", "image_index", "prompt", "seed", "image_key"]


def make_metric(name: str, scorers: str = "official") -> Metric:
    """A metric by name; ``scorers=tiny`` gives learned metrics random tiny weights (smoke tests)."""
    return METRICS.get(name)(scorers)


def load_metrics(names: list[str], device: torch.device | str = "cpu", scorers: str = "official") -> dict[str, Metric]:
    """Instantiate metrics once; unknown names fail before any work is done (weights load on first use)."""
    return {name: make_metric(name, scorers).to(device) for name in names}


@torch.no_grad()
def score_images(
    jobs: list[ImageJob],
    store: ImageStore,
    metrics: dict[str, Metric],
    batch_size: int,
    device="cpu",
    progress=True,
    references: list[ReferenceSet] | None = None,
    scope: dict[str, list[bool]] | None = None,
    sets=None,
) -> pd.DataFrame:
    """Per-image scores: the id columns, then one float64 column per metric. Metrics that compare
    with real images get each image's reference set (``references`` is indexed by prompt). A metric
    in ``scope`` (indexed by prompt) scores only the images of its prompts; the others get NaN.
    ``sets`` (a ``bench.distribution.SetScorer``) gets every decoded batch for the set-level metrics."""
    columns: dict[str, list] = {name: [] for name in metrics}
    for start in progress_bar(range(0, len(jobs), batch_size), progress, desc="score", unit="batch"):
        batch = jobs[start : start + batch_size]
        pixels = load_images(store, batch)
        if sets is not None:
            sets.add(batch, pixels)
        images = from_uint8(pixels).to(device)
        for name, metric in metrics.items():
            rows = [i for i, j in enumerate(batch) if scope is None or name not in scope or scope[name][j.prompt_index]]
            values = [float("nan")] * len(batch)
            if rows:
                chosen = [batch[i] for i in rows]
                prompts = [j.prompt for j in chosen]
                subset = images if len(rows) == len(batch) else images[rows]
                if metric.needs_refs:
                    if references is None:
                        raise ValueError(f"metric {name} compares with reference images and this suite has none")
                    out = metric.score(subset, prompts, [references[j.prompt_index] for j in chosen])
                else:
                    out = metric.score(subset, prompts)
                for i, value in zip(rows, out.double().cpu().tolist()):
                    values[i] = value
            columns[name].extend(values)
    return score_frame(jobs, columns)


def score_frame(jobs: list[ImageJob], columns: dict[str, list[float]]) -> pd.DataFrame:
    """The scores table: the id columns of ``jobs``, then one float64 column per metric, in job order."""
    frame = pd.DataFrame(
        {
            "prompt_index": pd.array([j.prompt_index for j in jobs], dtype="int64"),
            "image_index": pd.array([j.image_index for j in jobs], dtype="int64"),
            "prompt": [j.prompt for j in jobs],
            "seed": pd.array([j.seed for j in jobs], dtype="int64"),
            "image_key": [j.key for j in jobs],
        }
    )
    for name, values in columns.items():
        frame[name] = pd.array(values, dtype="float64")
    return frame


def write_scores(frame: pd.DataFrame, path) -> None:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    write_bytes(path, buf.getvalue())


def image_files(folder) -> list:
    """The image files of a folder, sorted by name."""
    return sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def reference_folder(folder) -> ReferenceSet:
    """``bench score refs=FOLDER``: the photos every image is compared with (one DreamBench subject)."""
    root = Path(folder)
    paths = image_files(root) if root.is_dir() else []
    if not paths:
        raise DataError(f"refs={folder} is not a folder of images ({', '.join(IMAGE_SUFFIXES)}): give the folder of the reference photos")
    return ReferenceSet(str(root.resolve()), tuple(paths))


def folder_images(images_dir, prompts_file=None, readers=("its metrics",)) -> tuple[list, list[str]]:
    """The images of a folder (sorted by name) and one prompt each: ``prompts_file`` line i for image
    i, or the folder's ``metadata.jsonl`` (``file_name``, ``text``/``prompt``, the imagefolder layout).
    Without either, every image gets the empty prompt when no metric reads it (``readers`` is empty)."""
    import json

    from bench.suite import prompts_of, read_prompt_rows

    root = Path(images_dir)
    if not root.is_dir():
        raise DataError(f"image folder not found: {root} (images=DIR)")
    if prompts_file is None and not (root / "metadata.jsonl").is_file() and not readers:
        files = image_files(root)
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
        return files, [""] * len(files)
    if prompts_file is None:
        meta = root / "metadata.jsonl"
        if not meta.is_file():
            raise UsageError(
                f"prompts= is missing and {root} has no metadata.jsonl, and the prompt is read by {', '.join(readers)}: "
                "pass prompts=FILE (one prompt per image, in file-name order) or put a metadata.jsonl (file_name, text) in the folder"
            )
        rows = [json.loads(line) for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()]
        files = [root / r["file_name"] for r in rows]
        prompts = prompts_of(rows, str(meta))
    else:
        files = image_files(root)
        prompts = prompts_of(read_prompt_rows(prompts_file), str(prompts_file))
        if len(prompts) != len(files):
            raise DataError(f"{prompts_file} holds {len(prompts)} prompts for {len(files)} images in {root}: give one prompt per image, in file-name order")
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {root}")
    return files, prompts


@torch.no_grad()
def score_files(files: list, prompts: list[str], metrics: dict[str, Metric], batch_size: int, device="cpu", progress=True, refs: ReferenceSet | None = None) -> pd.DataFrame:
    """Score image files: images of one size are batched together, rows come back in file order.
    Metrics that compare with reference photos compare every image with ``refs``."""
    missing = [name for name, metric in metrics.items() if metric.needs_refs and refs is None]
    if missing:
        raise UsageError(f"metric {missing[0]} compares each image with reference photos: add refs=FOLDER (e.g. the DreamBench subject's photos), or run it in a dreambench suite")

    pictures = [open_rgb(f) for f in files]
    by_size: dict[tuple, list[int]] = {}
    for i, picture in enumerate(pictures):
        by_size.setdefault(picture.size, []).append(i)
    batches = [idx[k : k + batch_size] for idx in by_size.values() for k in range(0, len(idx), batch_size)]
    columns = {name: [0.0] * len(files) for name in metrics}
    for batch in progress_bar(batches, progress, desc="score", unit="batch"):
        images = from_uint8(torch.from_numpy(np.stack([np.asarray(pictures[i]) for i in batch]))).to(device)
        for name, metric in metrics.items():
            kw = {"refs": [refs] * len(batch)} if metric.needs_refs else {}
            for i, value in zip(batch, metric.score(images, [prompts[i] for i in batch], **kw).double().cpu().tolist()):
                columns[name][i] = value
    frame = pd.DataFrame({"file": [str(f) for f in files], "prompt": prompts})
    for name, values in columns.items():
        frame[name] = pd.array(values, dtype="float64")
    return frame
