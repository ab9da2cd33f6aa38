"""Test setup: never touch the network, and share one cache of built tiny models per session."""

import ipaddress
import json
import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
NETWORK_BLOCKED = "tests must not reach the network (tests/conftest.py blocks every connection but localhost)"


def force_offline() -> None:
    """The hub libraries offline whatever the shell exported (HF_HUB_OFFLINE=0 included), also when
    one was imported before this file: they read the variables at import."""
    for name in OFFLINE_VARIABLES:
        os.environ[name] = "1"
    for module, name in (("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"), ("datasets.config", "HF_DATASETS_OFFLINE")):
        if module in sys.modules:
            setattr(sys.modules[module], name, True)


force_offline()

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of several pytest workers: one CPU thread each, or they oversubscribe the cores
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"


class NetworkBlockedError(ConnectionRefusedError):
    """An OSError, as a refused connection is: code under test reports it as it would a real one."""


def _local(host) -> bool:
    if isinstance(host, bytes):
        host = host.decode()
    if host is None or host in ("localhost", ""):  # None, "": the wildcard address a server binds
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _guarded(original, address_of):
    def guard(*args, **kwargs):
        address = address_of(*args, **kwargs)
        if isinstance(address, tuple) and not _local(address[0]):
            raise NetworkBlockedError(f"{NETWORK_BLOCKED}: connection to {address[0]}:{address[1]} refused")
        return original(*args, **kwargs)

    guard.blocks_network = True
    return guard


def pytest_configure(config):
    """Block every non-loopback connection for the whole session, before any test (or fixture) runs:
    one attempt fails at once with NETWORK_BLOCKED instead of waiting on DNS or a timeout. Unix
    sockets and localhost servers (tests serve files from a thread) are allowed."""
    socket.socket.connect = _guarded(socket.socket.connect, lambda self, address, *a, **k: address)
    socket.socket.connect_ex = _guarded(socket.socket.connect_ex, lambda self, address, *a, **k: address)
    socket.create_connection = _guarded(socket.create_connection, lambda address, *a, **k: address)
    socket.getaddrinfo = _guarded(socket.getaddrinfo, lambda host, port, *a, **k: (host, port))


# The real data sets (prompt files, DreamBench photos): BENCH_TEST_DATA, relative to the repository root, default
# ../shared/data. The tests of their contents skip without them; the code paths they take are covered on the
# hand-written stand-ins in tests/data/mini (the `mini_data` fixture), so a clone of the repository alone tests them.
SHARED_DATA = (Path(__file__).resolve().parents[1] / os.environ.get("BENCH_TEST_DATA", "../shared/data")).resolve()
MINI_DATA = Path(__file__).resolve().parent / "data" / "mini"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"BENCH_TEST_DATA={SHARED_DATA} not found: the real prompt sets live in ../shared/data (set BENCH_TEST_DATA=DIR)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def mini_data(tmp_path_factory) -> Path:
    """A copy of tests/data/mini, the layout of ../shared/data, with each DreamBench subject's photos drawn from seeds."""
    import shutil

    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("mini-data") / "data"
    shutil.copytree(MINI_DATA, root)
    for i, subject in enumerate(["backpack", "backpack_dog", "cat", "dog"]):
        (root / "dreambench" / "dataset" / subject).mkdir()
        for k in range(2 + i % 2):
            pixels = np.random.default_rng([i, k]).integers(0, 256, (4, 4, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((48, 40), Image.Resampling.BILINEAR).save(root / "dreambench" / "dataset" / subject / f"{k:02d}.png")
    return root


def stand_in(suite: str, path) -> list[str]:
    """Overrides that run ``suite`` on the stand-in file or folder ``path``, recorded as its published set."""
    source = f"suite.source={path}"
    return [source, *published(f"suite={suite}", source)]


def published(*overrides: str) -> list[str]:
    """Overrides that make the suite's prompts (under ``overrides``, before any limit) its published set,
    so a stand-in file takes the code path of the real one (``canonical``: True in the manifest)."""
    from bench.config import compose, to_dict
    from bench.suite import load_suite, prompts_sha256

    prompts = load_suite(to_dict(compose(list(overrides)))["suite"] | {"canonical": None, "limit": None}).prompts
    return [f"suite.canonical.count={len(prompts)}", f"suite.canonical.sha256={prompts_sha256(prompts)}"]


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """One cache per test session; the first test that loads an embedded model builds it there, in
    seconds, from the pre-trained weights the package ships (``bench.models.prebuilt``). The pytest
    workers share one models folder (beside their own temporary folders; a build's file lock makes
    one of them build it). During development ``BENCH_TEST_CACHE=DIR`` keeps the built models (only
    they) across sessions; a build is keyed by the hash of its spec and builder source, so a stale one
    is never reused. CI leaves it unset."""
    cache = tmp_path_factory.mktemp("bench-cache")
    keep = os.environ.get("BENCH_TEST_CACHE")
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    models = Path(keep) / "models" if keep else tmp_path_factory.getbasetemp().parent / "bench-models" if worker else None
    if models is not None:
        models.mkdir(parents=True, exist_ok=True)
        (cache / "models").symlink_to(models)
    return cache


@pytest.fixture
def cli(cache_dir, tmp_path, capsys):
    """Run ``bench`` in-process: returns (exit code, stdout, stderr); out= defaults to tmp_path/runs, and
    report.html to false (0.5 s an evaluation; the tests that read the page ask for it)."""
    from bench.cli import main

    def run(*args: str, cache: Path | None = None):
        argv = list(args)
        if argv and argv[0] in ("run", "eval", "train", "prefetch", "perf", "plan"):
            keys = {a.split("=", 1)[0] for a in argv[1:]}
            if "cache_dir" not in keys:
                argv.append(f"cache_dir={cache or cache_dir}")
            if "out" not in keys and argv[0] in ("run", "eval"):
                argv.append(f"out={tmp_path / 'runs'}")
            if "report.html" not in keys and argv[0] in ("run", "eval"):  # its own tests write it (tests/test_report_html.py)
                argv.append("report.html=false")
        code = main(argv)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def model_cfg():
    """The resolved config of a registered model, by name."""
    from bench.config import compose, to_dict

    return lambda name: to_dict(compose([f"model={name}"]))["model"]


@pytest.fixture(scope="session")
def tiny_cfg(model_cfg) -> dict:
    return model_cfg("tiny")


@pytest.fixture(scope="session")
def loaded(tiny_cfg, cache_dir):
    """The tiny model, built once into the session cache and loaded through ``load_model``."""
    from bench.models import load_model

    return load_model(tiny_cfg, cache_dir)


@pytest.fixture(scope="session")
def fewstep_lora(model_cfg, cache_dir):
    """tiny-fewstep in float64 with a fresh rank-4 LoRA (B = 0: the model is its own reference).
    Tests deep-copy it before training."""
    import torch

    from bench.models import load_model
    from bench.trainer import add_lora

    model = load_model(model_cfg("tiny-fewstep"), cache_dir).to(dtype=torch.float64)
    add_lora(model.unet, 4, 4, seed=0)
    return model


@pytest.fixture
def model(loaded):
    """The tiny model in float32 (float32 -> float64 -> float32 round-trips the weights exactly)."""
    import torch

    return loaded.to(dtype=torch.float32)


def jpeg(color, size=(40, 30)) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def pairs_parquet(tmp_path) -> Path:
    """Six Pick-a-Pic-schema rows (caption, jpg_0, jpg_1, label_0): light preferred, two ties."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    labels = [1.0, 0.0, 0.5, 1.0, 0.5, 0.0]
    table = pa.table(
        {
            "caption": [f"a photo number {i}" for i in range(6)],
            "jpg_0": [jpeg((230, 230, 230)) if l == 1.0 else jpeg((20, 20, 20)) for l in labels],
            "jpg_1": [jpeg((20, 20, 20)) if l == 1.0 else jpeg((230, 230, 230)) for l in labels],
            "label_0": labels,
        }
    )
    path = tmp_path / "pairs.parquet"
    pq.write_table(table, path)
    return path


# ---- an MJHQ-30K stand-in (tests of set-level metrics) ------------------------------------------------
def photo(seed: int, size) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize(size, Image.Resampling.BILINEAR)


MJHQ = {  # MJHQ-30K's meta_data.json layout: {image_id: {prompt, category}}
    "a1f0": {"prompt": "a red fox in the snow", "category": "animals"},
    "f9c2": {"prompt": "a bowl of ramen, studio light", "category": "food"},
    "a7b3": {"prompt": "an owl on a branch at night", "category": "animals"},
    "f0d1": {"prompt": "a slice of cake", "category": "food"},
    "p5e5": {"prompt": "portrait of an old sailor", "category": "people"},
}


def synth_mjhq(root, wrap: str | None = None):
    """meta_data.json and reference images at <category>/<image_id>.jpg (the zip's layout), optionally under one top folder."""
    meta = root / "meta_data.json"
    meta.write_text(json.dumps(MJHQ))
    refs = root / "mjhq_refs"
    for i, (image_id, row) in enumerate(MJHQ.items()):
        path = (refs / wrap if wrap else refs) / row["category"] / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        photo(i, [(96, 96), (80, 64), (64, 80)][i % 3]).save(path)
    return meta, refs


def with_lora(model, dtype=None, noise: float = 0.0, rank: int = 4):
    """A copy of ``model`` with a trainable LoRA adapter on its own targets (rank and alpha ``rank``), its
    weights moved by ``noise`` (``nudge``); returns the copy and the LoRA weights."""
    import copy

    from bench.trainer import add_lora

    model = copy.deepcopy(model)
    if dtype is not None:
        model = model.to(dtype=dtype)
    add_lora(model.unet, rank, float(rank), 0, model.lora_targets)
    params = [p for n, p in model.unet.named_parameters() if "lora" in n]
    for p in params:
        p.requires_grad_(True)
    nudge(params, noise)
    return model, params


def nudge(params, scale: float, seed: int = 0) -> None:
    """Add ``scale`` times seeded normal noise (one generator per weight, by its size) to ``params``."""
    import torch

    with torch.no_grad():
        for p in params:
            if scale:
                p.add_(scale * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel() + seed), dtype=p.dtype))


def trained_weights(out: str) -> dict:
    """The final weights of a ``bench train`` run from what it printed (``checkpoint: PATH``)."""
    from safetensors.torch import load_file

    return load_file(Path(out.split("checkpoint: ")[1].strip()) / "weights.safetensors")


def uninterrupted_weights(cli, cache_dir, tmp_path, args: list[str]) -> dict:
    """``bench train ARGS`` run through in a cache of its own (the built models shared), then the shared
    cache's checkpoints cleared, so the run under test starts from nothing: its final weights."""
    import shutil

    other = tmp_path / "other-cache"
    other.mkdir()
    (other / "models").symlink_to(Path(cache_dir) / "models")
    code, out, err = cli("train", *args, cache=other)
    assert code == 0, err
    shutil.rmtree(Path(cache_dir) / "checkpoints", ignore_errors=True)
    return trained_weights(out)


def interrupt_at(monkeypatch, method_cls, step: int):
    """Make ``method_cls.loss`` raise KeyboardInterrupt at optimizer step ``step`` (a kill); returns the undo."""
    real = method_cls.loss

    def killed(self, ctx, data, generator):
        if ctx.step == step:
            raise KeyboardInterrupt
        return real(self, ctx, data, generator)

    monkeypatch.setattr(method_cls, "loss", killed)
    return lambda: monkeypatch.setattr(method_cls, "loss", real)
