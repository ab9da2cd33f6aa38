"""Score every stored image with every metric of a suite in one pass over decoded batches."""

from __future__ import annotations

import io

import pandas as pd
import torch

from bench.generate import ImageJob, ImageStore, load_images
from bench.io import progress as progress_bar
from bench.io import write_bytes
from bench.metrics import LearnedMetric, Metric, ReferenceSet
from bench.models.diffusion import from_uint8
from bench.registry import METRICS

ID_COLUMNS = ["prompt_index", "image_index", "prompt", "seed", "image_key"]


def make_metric(name: str, scorers: str = "official") -> Metric:
    """A metric by name; ``scorers=tiny`` gives learned metrics random tiny weights (smoke tests)."""
    cls = METRICS.get(name)
    return cls(scorers) if issubclass(cls, LearnedMetric) else cls()


def load_metrics(names: list[str], device: torch.device | str = "cpu", scorers: str = "official") -> dict[str, Metric]:
    """Instantiate metrics once; unknown names fail before any work is done (weights load on first use)."""
    return {name: make_metric(name, scorers).to(device) for name in names}


@torch.no_grad()
def score_images(
    jobs: list[ImageJob], store: ImageStore, metrics: dict[str, Metric], batch_size: int, device="cpu", progress=True, references: list[ReferenceSet] | None = None
) -> pd.DataFrame:
    """Per-image scores: the id columns, then one float64 column per metric. Metrics that compare
    with real images get each image's reference set (``references`` is indexed by prompt)."""
    columns: dict[str, list] = {name: [] for name in metrics}
    for start in progress_bar(range(0, len(jobs), batch_size), progress, desc="score", unit="batch"):
        batch = jobs[start : start + batch_size]
        images = from_uint8(load_images(store, batch)).to(device)
        prompts = [j.prompt for j in batch]
        for name, metric in metrics.items():
            if metric.needs_refs:
                if references is None:
                    raise ValueError(f"metric {name} compares with reference images and this suite has none")
                values = metric.score(images, prompts, [references[j.prompt_index] for j in batch])
            else:
                values = metric.score(images, prompts)
            columns[name].extend(values.double().cpu().tolist())
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
