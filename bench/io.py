"""Atomic file writes (a temp file in the same folder, fsync, then ``os.replace``), hash-checked
downloads and weights-only checkpoint loading.

Readers (and a run restarted after a kill) never see a half-written file, and nothing downloaded
or unpickled is trusted beyond its pinned sha256 and torch's weights-only unpickler.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


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


def adopt_file(old, new) -> bool:
    """Give the file ``old`` (a cache entry under a key of an earlier bench version) the name ``new``,
    once: a hard link, so an older checkout sharing the cache still finds its own name and nothing is
    copied, else (a file system without links) an atomic copy. False when ``new`` is there already."""
    old, new = Path(old), Path(new)
    if new.exists():
        return False
    from bench.errors import writing

    with writing(new.parent):
        new.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(old, new)
    except FileExistsError:  # another process adopted it meanwhile
        return False
    except OSError:
        write_bytes(new, old.read_bytes())
    return True


def write_json(path, obj) -> Path:
    """Deterministic JSON (sorted keys, indent 2, trailing newline), written atomically."""
    return write_text(path, json.dumps(obj, sort_keys=True, indent=2, allow_nan=False) + "\n")


_SCRATCH: list[tempfile.TemporaryDirectory] = []


@contextmanager
def folder_written_whole(directory: Path):
    """Yield a temporary sibling of ``directory`` to write into; on success it becomes ``directory``
    (unless another process made that first: then it goes), on failure it goes, so a killed build
    never leaves a half-written folder behind. (``bench.models.tiny`` spells the same steps out: its
    source is in its builds' hashes.)"""
    import shutil

    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=directory.name + ".tmp-", dir=directory.parent))
    try:
        yield tmp
        if directory.exists():
            shutil.rmtree(tmp)
        else:
            tmp.rename(directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


DOWNLOAD_TIMEOUT = 60.0  # seconds without a byte before a download gives up
UNPINNED_OPT_IN = "BENCH_ALLOW_UNPINNED"


def split_pin(url: str) -> tuple[str, str | None]:
    """``URL#sha256=HEX`` -> (URL, hex): how a config or command line pins the bytes of a URL."""
    from bench.errors import DataError

    base, sep, fragment = url.partition("#")
    if not sep:
        return url, None
    digest = fragment.removeprefix("sha256=").lower()
    if not fragment.startswith("sha256=") or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise DataError(f"malformed pin in {url}: a URL may end in #sha256= and the 64 hex digits of the file's sha256, nothing else")
    return base, digest


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def is_local_url(url: str) -> bool:
    """file:// and loopback URLs need no network (tests serve files from a thread on localhost)."""
    from urllib.parse import urlparse

    parts = urlparse(url)
    return parts.scheme == "file" or parts.hostname in ("localhost", "127.0.0.1", "::1")


def fetch_url(url: str, dest: Path, fix: str, sha256: str | None = None, timeout: float = DOWNLOAD_TIMEOUT, show_progress: bool = True) -> Path:
    """``url`` (``#sha256=`` pins it too) at ``dest``, downloaded once and checked against its sha256.

    The bytes stream into a temp file of this process in ``dest``'s folder (parallel workers never
    share one) and are renamed onto ``dest`` only when their sha256 is the pinned one, so a tampered
    or truncated file never lands. A file already at ``dest`` is checked too (a copy saved by hand).
    A URL without a pin is refused unless BENCH_ALLOW_UNPINNED=1, which downloads it and logs its
    sha256 to pin. Every failure is one DataError line ending in ``fix``."""
    from bench.errors import DataError

    url, pinned = split_pin(url)
    expected = (sha256 or pinned or "").lower() or None
    dest = Path(dest)
    if dest.is_file():
        if expected and (actual := sha256_file(dest)) != expected:
            dest.unlink(missing_ok=True)
            raise DataError(f"{dest} does not match the pinned sha256 of {url} (expected {expected}, actual {actual}); removed it: {fix}")
        return dest
    if expected is None and os.environ.get(UNPINNED_OPT_IN) != "1":
        raise DataError(f"{url} has no pinned sha256, so bench does not download it: set {UNPINNED_OPT_IN}=1 to download it once and log its sha256 to pin, or {fix}")
    if not is_local_url(url) and hub_offline():
        raise DataError(f"{dest.name} is not in {dest.parent} and downloads are off or the network is unreachable: {fix}")
    actual = _download(url, dest, expected, timeout, show_progress, fix)
    if expected is None:
        log.warning("downloaded %s without a pinned sha256 (%s=1); pin it: %s#sha256=%s", url, UNPINNED_OPT_IN, url, actual)
    return dest


def _download(url: str, dest: Path, expected: str | None, timeout: float, show_progress: bool, fix: str) -> str:
    """Stream ``url`` into a temp file next to ``dest`` (sha256 on the fly), then rename it onto ``dest``."""
    import http.client
    import urllib.error
    import urllib.request

    from bench.errors import DataError

    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                with progress(enabled=show_progress, total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=dest.name) as bar:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if expected is not None and actual != expected:
            raise DataError(f"{dest.name} downloaded from {url} does not match its pinned sha256 (expected {expected}, actual {actual}); removed it: {fix}")
        os.replace(tmp, dest)
        return actual
    except (OSError, ValueError, http.client.HTTPException) as err:
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
        if isinstance(reason, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        reason = (str(reason).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"cannot download {url} ({reason}): {fix}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


def load_torch(path, allowed: tuple = ()):
    """``torch.load`` through the weights-only unpickler, the ``allowed`` classes added for this one
    load. A checkpoint that pickles anything else is refused in one line naming what it pickles:
    it is never unpickled, whatever its source."""
    import pickle

    import torch

    from bench.errors import DataError

    try:
        with torch.serialization.safe_globals(list(allowed)):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(path)  # reads the pickle's opcodes, runs none
        except Exception:  # a legacy (pre-zip) file: its classes are not listed, and still not unpickled
            names = []
        raise DataError(
            f"{path} pickles {', '.join(names) or 'objects'} besides tensors, which bench never unpickles: "
            "it is not the published checkpoint; delete it and download the official file again"
        ) from None


PROGRESS_EVERY = 30.0  # seconds between progress lines when stderr is not a terminal ($BENCH_PROGRESS_EVERY)
QUIET = False  # `bench -q`: no progress at all


class _Lines:
    """A file for tqdm that turns its carriage-return redraws into whole lines on stderr: a batch log
    gets one line per update instead of one endless line (or none)."""

    def write(self, text: str) -> None:
        line = text.replace("\r", "").strip()
        if line:
            print(line, file=sys.stderr, flush=True)

    def flush(self) -> None:
        pass


def progress(iterable=None, enabled: bool = True, **kwargs):
    """A tqdm bar in a terminal; elsewhere (a batch job, a pipe) one line every ``$BENCH_PROGRESS_EVERY``
    seconds (30) for work that lasts longer than that, and nothing for work that does not."""
    from tqdm.auto import tqdm

    if QUIET or not enabled:
        return tqdm(iterable, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, leave=False, dynamic_ncols=True, **kwargs)
    every = float(os.environ.get("BENCH_PROGRESS_EVERY", PROGRESS_EVERY))
    return tqdm(iterable, file=_Lines(), mininterval=every, maxinterval=max(every, 1.0), delay=every, ascii=True, ncols=100, **kwargs)


def cache_root(cfg: dict | None = None) -> Path:
    """Models, images, data and checkpoints: ``cache_dir=``, else $BENCH_HOME, else ~/.cache/bench."""
    return Path((cfg or {}).get("cache_dir") or os.environ.get("BENCH_HOME") or Path.home() / ".cache" / "bench")
