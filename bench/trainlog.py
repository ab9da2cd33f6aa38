"""train.jsonl: one JSON line per optimizer step (step, loss, learning rate, the method's logs).

The trainer writes it beside the checkpoint's step folders (``<checkpoint root>/train.jsonl``), so the
report can draw training curves. It is a side file: no hash, key or weight depends on it. A resumed run
first cuts it back to the step it resumes from (atomically), so it never holds a step twice; a line a
kill cut short is dropped on reading. ``train.log_with`` also sends every line through accelerate's
trackers (TensorBoard, W&B) where the package is installed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
from pathlib import Path

from bench.errors import writing
from bench.io import write_text

log = logging.getLogger(__name__)
FILE = "train.jsonl"
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}  # train.log_with -> the package it needs


def train_log_path(checkpoint_path) -> Path:
    """Where the training log of a checkpoint folder is: its training root (``<root>/final``, ``<root>/kept/step-N``)."""
    path = Path(checkpoint_path)
    return (path.parent.parent if path.parent.name == "kept" else path.parent) / FILE


def read_train_log(path) -> list[dict]:
    """The complete lines of a train.jsonl, in step order; a line cut short by a kill is skipped."""
    rows = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def finite_number(value) -> float | None:
    """A value as a plain float (tensors, numpy scalars), None where it is not a finite number."""
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


class TrainLog:
    """Appends one line per optimizer step to ``root/train.jsonl``, starting after step ``start``."""

    def __init__(self, root: Path, start: int, trackers=None, writes: bool = True):
        self.path = Path(root) / FILE
        self.trackers = trackers  # an accelerate Accelerator with trackers initialised, or None
        self.writes = writes  # False: a rank other than 0 (rank 0 writes the log of the step they share)
        if writes:
            kept = [r for r in read_train_log(self.path) if r["step"] <= start]
            with writing(self.path.parent):
                write_text(self.path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def write(self, step: int, loss: float, lr: float, logs: dict) -> None:
        """The line of optimizer step ``step`` (1-based: the steps done), flushed at once."""
        if not self.writes:
            return
        row = {"step": int(step), "loss": finite_number(loss), "lr": finite_number(lr)}
        row |= {str(k): x for k, v in logs.items() if (x := finite_number(v)) is not None}
        with writing(self.path.parent), open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row, sort_keys=True) + "\n")
        if self.trackers is not None:
            self.trackers.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=int(step))

    def close(self) -> None:
        if self.trackers is not None:
            self.trackers.end_training()


def tracker_kwargs(log_with: str | None, root: Path) -> dict:
    """``Accelerator`` arguments for ``train.log_with``: {} when unset or when its package is missing
    (one warning line; train.jsonl is written either way)."""
    if not log_with:
        return {}
    package = TRACKER_PACKAGES[log_with]
    if importlib.util.find_spec(package) is None:
        log.warning("train.log_with=%s: the %s package is not installed (pip install %s); logging to train.jsonl only", log_with, package, package)
        return {}
    return {"log_with": log_with, "project_dir": str(Path(root) / "trackers")}
