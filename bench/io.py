"""Atomic file writes: a temp file in the same folder, fsync, then ``os.replace``.

Readers (and a run restarted after a kill) never see a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_bytes(path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path, obj) -> Path:
    """Deterministic JSON (sorted keys, indent 2, trailing newline), written atomically."""
    return write_text(path, json.dumps(obj, sort_keys=True, indent=2, allow_nan=False) + "\n")


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE asks for no network (read now, not at import as the hub libraries do)."""
    return os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")


def progress(iterable=None, enabled: bool = True, **kwargs):
    """A tqdm bar that stays quiet when disabled or when stderr is not a terminal (CI logs)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if enabled else True, leave=False, dynamic_ncols=True, **kwargs)


def cache_root(cfg: dict | None = None) -> Path:
    """Models, images, data and checkpoints: ``cache_dir=``, else $BENCH_HOME, else ~/.cache/bench."""
    return Path((cfg or {}).get("cache_dir") or os.environ.get("BENCH_HOME") or Path.home() / ".cache" / "bench")
