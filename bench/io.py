"""Atomic file writes: a temp file in the same folder, fsync, then ``os.replace``.

Readers (and a run restarted after a kill) never see a half-written file.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_bytes(path, data: bytes) -> Path:
    from bench.errors import writing

    path = Path(path)
    with writing(path.parent):  # a full disk or a read-only folder: one line naming it
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


_SCRATCH: list[tempfile.TemporaryDirectory] = []


def scratch_dir(prefix: str) -> Path:
    """A temporary folder removed when the process exits: the tiny scorers write tokenizer and config
    files once per process, and these must not pile up in /tmp run after run."""
    folder = tempfile.TemporaryDirectory(prefix=prefix)
    _SCRATCH.append(folder)  # kept alive until exit, when its finalizer removes it
    return Path(folder.name)


_HUB_REACHABLE: bool | None = None


def hub_offline() -> bool:
    """Whether the hub must not be asked: HF_HUB_OFFLINE says so, or it cannot be reached.

    The reachability probe (one TCP connection, 3 s, once per process) replaces the hub libraries'
    five retries with back-off per missing file (about 23 s each) by one clear line; when the hub is
    unreachable the libraries are switched to their offline mode as if HF_HUB_OFFLINE were set.
    """
    global _HUB_REACHABLE
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return True
    if _HUB_REACHABLE is None:
        import socket
        import sys
        from urllib.parse import urlparse

        url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
            _HUB_REACHABLE = True
        except OSError:
            _HUB_REACHABLE = False
            os.environ["HF_HUB_OFFLINE"] = os.environ["HF_DATASETS_OFFLINE"] = os.environ["TRANSFORMERS_OFFLINE"] = "1"
            for module, name in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"), ("datasets.config", "HF_DATASETS_OFFLINE")):
                if module in sys.modules:  # already imported: they read the variable at import
                    setattr(sys.modules[module], name, True)
    return not _HUB_REACHABLE


def fetch_url(url: str, dest: Path, fix: str) -> Path:
    """Download ``url`` to ``dest`` once (atomically); offline, or on failure, one line ending in ``fix``."""
    from bench.errors import DataError

    if dest.is_file():
        return dest
    if hub_offline():
        raise DataError(f"{dest.name} is not in {dest.parent} and downloads are off or the network is unreachable: {fix}")
    import urllib.request

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        urllib.request.urlretrieve(url, tmp)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot download {url} ({err}): {fix}") from None
    tmp.replace(dest)
    return dest


def progress(iterable=None, enabled: bool = True, **kwargs):
    """A tqdm bar that stays quiet when disabled or when stderr is not a terminal (CI logs)."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=None if enabled else True, leave=False, dynamic_ncols=True, **kwargs)


def cache_root(cfg: dict | None = None) -> Path:
    """Models, images, data and checkpoints: ``cache_dir=``, else $BENCH_HOME, else ~/.cache/bench."""
    return Path((cfg or {}).get("cache_dir") or os.environ.get("BENCH_HOME") or Path.home() / ".cache" / "bench")
