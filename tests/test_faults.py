"""Fault injection: SIGKILL at seeded random moments of `bench run` (an offline and an online method),
two evaluations at once on one empty cache, a read-only cache folder and a full disk.

A killed run started again must end with the bytes of an uninterrupted one: run folders (scores.parquet,
summary.json, table.md), the image store and the checkpoint. The built models are shared through a link
into the session cache, so a restart costs the run's own work, not a model build.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bench.cli import main

REPO = Path(__file__).resolve().parents[1]
RUN_FILES = ["scores.parquet", "summary.json", "table.md"]  # manifest.json holds timings
KILLS = 10


def spawn(args: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as fh:
        return subprocess.Popen([sys.executable, "-m", "bench.cli", *args], cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT)


def linked_cache(root: Path, session_cache: Path) -> Path:
    """An empty cache whose models/ is the session's (built once, never written by a run)."""
    root.mkdir(parents=True)
    (root / "models").symlink_to((session_cache / "models").resolve())
    return root


def outcome(cache: Path, out: Path) -> dict[str, bytes]:
    """Every byte a run leaves that must not depend on a kill: run folders, images, the final checkpoint."""
    files = {f"runs/{d.name}/{f}": (d / f).read_bytes() for d in sorted(out.iterdir()) for f in RUN_FILES}
    files |= {f"runs/{d.name}/listing": "\n".join(sorted(p.name for p in d.iterdir() if not p.name.startswith("."))).encode() for d in out.iterdir()}
    files |= {f"images/{p.name}": p.read_bytes() for p in sorted((cache / "images").rglob("*.png"))}
    files |= {str(p.relative_to(cache)): p.read_bytes() for p in sorted((cache / "checkpoints").glob("*/final/*"))}
    return files


def differences(got: dict[str, bytes], want: dict[str, bytes]) -> list[str]:
    return sorted(k for k in got.keys() | want.keys() if got.get(k) != want.get(k))


def phase(cache: Path) -> str:
    """Where a killed `bench run` stood, from what it left in its cache."""
    images, final = len(list((cache / "images").rglob("*.png"))), list((cache / "checkpoints").glob("*/final"))
    steps = list((cache / "checkpoints").glob("*/step-*")) + list((cache / "checkpoints").glob("*/rounds/*"))
    if final:
        return "tuned images"
    return "training" if steps else "training data" if images == 64 else "base images" if images else "starting"


def kill_and_resume(tmp_path: Path, session_cache: Path, args: list[str], label: str) -> None:
    """The uninterrupted run (timed), then KILLS runs each killed at a seeded random moment of that time,
    one in each tenth of it, and run again to completion; every one must end with the uninterrupted run's bytes."""
    clean_cache, clean_out = linked_cache(tmp_path / "clean", session_cache), tmp_path / "clean-runs"
    start = time.monotonic()
    proc = spawn([*args, f"cache_dir={clean_cache}", f"out={clean_out}"], tmp_path / "clean.log")
    assert proc.wait(900) == 0, (tmp_path / "clean.log").read_text()[-3000:]
    wall = time.monotonic() - start
    want = outcome(clean_cache, clean_out)
    assert len([k for k in want if k.endswith("weights.safetensors")]) == 1 and len([k for k in want if k.startswith("images/")]) == 128

    moments = (np.arange(KILLS) + np.random.default_rng(17).uniform(size=KILLS)) / KILLS * wall
    killed, stages = 0, []
    for i, moment in enumerate(moments):
        cache, out, log = linked_cache(tmp_path / f"k{i}", session_cache), tmp_path / f"k{i}-runs", tmp_path / f"k{i}.log"
        proc = spawn([*args, f"cache_dir={cache}", f"out={out}"], log)
        try:
            proc.wait(moment)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(60)
            killed += 1
        stages.append((f"{moment:.1f} s", phase(cache) if proc.returncode == -signal.SIGKILL else f"exited {proc.returncode}"))
        assert main([*args, f"cache_dir={cache}", f"out={out}"]) == 0, log.read_text()[-3000:]  # run again, in this process
        diff = differences(outcome(cache, out), want)
        assert not diff, f"{label}: killed at {moment:.1f} of {wall:.1f} s, resumed: {diff[:5]} differ"
    print(f"{label}: uninterrupted {wall:.1f} s; killed at {stages}")
    assert killed >= KILLS - 2, f"{label}: only {killed} of {KILLS} runs were still running at their moment ({stages})"
    assert len({p for _, p in stages} - {"exited 0"}) >= 3, f"{label}: the kills hit fewer than 3 phases ({stages})"


@pytest.fixture(scope="module")
def built(cache_dir) -> Path:
    for model in ("tiny", "tiny-fewstep"):
        assert main(["prefetch", f"model={model}", f"cache_dir={cache_dir}"]) == 0
    return cache_dir


# ---- (a) SIGKILL at random moments ---------------------------------------------------------------
@pytest.mark.slow
def test_sft_run_killed_at_ten_random_moments_resumes_to_the_same_bytes(built, tmp_path):
    args = ["run", "suite=smoke", "method=sft", "train.steps=100", "train.save_every=5", "method.samples_per_prompt=4"]
    kill_and_resume(tmp_path, built, args, "sft")


@pytest.mark.slow
def test_online_d3po_run_killed_at_ten_random_moments_resumes_to_the_same_bytes(built, tmp_path):
    args = ["run", "suite=smoke", "method=d3po", "model=tiny-fewstep", "train.steps=12", "train.save_every=2"]
    kill_and_resume(tmp_path, built, args, "d3po")


# ---- (b) two processes on one empty cache ---------------------------------------------------------
@pytest.mark.slow
def test_two_evals_at_once_on_an_empty_cache_leave_what_one_leaves(built, tmp_path):
    """Both build the tiny model, generate and score into one cache: the model folder, images and run
    folders equal those of one process (the session cache's build and a single evaluation)."""
    cache = tmp_path / "cache"
    procs = [spawn(["eval", "suite=smoke", "model=tiny", f"cache_dir={cache}", f"out={tmp_path / f'runs{i}'}"], tmp_path / f"p{i}.log") for i in range(2)]
    for i, proc in enumerate(procs):
        assert proc.wait(900) == 0, (tmp_path / f"p{i}.log").read_text()[-3000:]
    single = linked_cache(tmp_path / "single", built)
    assert main(["eval", "suite=smoke", "model=tiny", f"cache_dir={single}", f"out={tmp_path / 'runs-single'}"]) == 0
    want = outcome(single, tmp_path / "runs-single")
    for i in range(2):
        assert not differences(outcome(cache, tmp_path / f"runs{i}"), want)
    (model,) = [p for p in (cache / "models").iterdir() if p.is_dir()]
    files = sorted(p.relative_to(model) for p in model.rglob("*") if p.is_file())
    assert files and all((model / f).read_bytes() == (built / "models" / model.name / f).read_bytes() for f in files)
    assert sorted(p.name for p in (cache / "models").iterdir()) == [f".{model.name}.lock", model.name]  # no half-built folder left



@pytest.mark.slow
def test_two_trainings_at_once_train_one_checkpoint(built, tmp_path):
    """The second waits on the checkpoint's lock and reuses what the first trained (without the lock both
    would write the same temporary data file and step folders)."""
    args = ["train", "suite=smoke", "method=sft", "train.steps=10", "train.save_every=2", "method.samples_per_prompt=2"]
    cache = linked_cache(tmp_path / "cache", built)
    procs = [spawn([*args, f"cache_dir={cache}"], tmp_path / f"t{i}.log") for i in range(2)]
    for i, proc in enumerate(procs):
        assert proc.wait(900) == 0, (tmp_path / f"t{i}.log").read_text()[-3000:]
    assert sum("reusing trained checkpoint" in (tmp_path / f"t{i}.log").read_text() for i in range(2)) == 1
    single = linked_cache(tmp_path / "single", built)
    assert main([*args, f"cache_dir={single}"]) == 0
    files = lambda c: {str(p.relative_to(c)): p.read_bytes() for p in sorted([*c.glob("checkpoints/*/final/*"), *c.glob("data/*")])}  # noqa: E731
    assert files(cache) == files(single) and len(files(single)) == 3  # weights, train.json, the sampled data


# ---- (c) a read-only cache, a full disk -----------------------------------------------------------
def writable(folder: Path) -> bool:
    try:
        (folder / ".probe").touch()
    except OSError:
        return False
    (folder / ".probe").unlink()
    return True


@pytest.fixture
def read_only(tmp_path):
    """Make a folder read-only: chmod 555, and where that does not stop writes (root) chattr +i."""
    frozen = []

    def make(folder: Path) -> Path:
        folder.chmod(0o555)
        frozen.append(folder)
        if writable(folder) and shutil.which("chattr") and subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0:
            frozen.append("chattr")
        if writable(folder):
            pytest.skip("running as root, where chmod 555 does not stop writes, and chattr +i is not available: no read-only folder to test")
        return folder

    yield make
    if "chattr" in frozen:
        subprocess.run(["chattr", "-i", str(frozen[0])], check=True)
    for folder in frozen[:1]:
        folder.chmod(0o755)


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("bench: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("models", [False, True], ids=["empty", "with-built-models"])
def test_a_read_only_cache_is_one_line_naming_it_and_the_fix(cache_dir, tmp_path, capsys, read_only, models):
    """An empty read-only cache fails at the model build, one holding the built models at the image store."""
    cache = linked_cache(tmp_path / "cache", cache_dir) if models else tmp_path / "cache"
    cache.mkdir(exist_ok=True)
    read_only(cache)
    assert main(["eval", "suite=smoke", "suite.limit=2", f"cache_dir={cache}", f"out={tmp_path / 'runs'}"]) == 6
    line = one_line(capsys)
    assert line.startswith(f"bench: error: cannot write in {cache} (") and "make it writable, or set cache_dir=DIR" in line
    assert ("Permission denied" in line) or ("Operation not permitted" in line)  # chmod, or chattr +i as root
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # fault injection (about 17 s)
def test_a_full_disk_is_one_line_naming_the_folder_and_the_fix(cache_dir, tmp_path, capsys, monkeypatch):
    """ENOSPC where a write reaches the disk: at the image store's fsync, and in a checkpoint that
    safetensors writes (it reports the OS error in its message)."""
    cache = linked_cache(tmp_path / "cache", cache_dir)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    with monkeypatch.context() as m:
        m.setattr(os, "fsync", full)
        assert main(["eval", "suite=smoke", "suite.limit=2", f"cache_dir={cache}", f"out={tmp_path / 'runs'}"]) == 6
    line = one_line(capsys)
    assert line.startswith(f"bench: error: no space left in {cache / 'images'}/") and "(No space left on device): free space on its disk, or set cache_dir=DIR" in line
    assert not [p for p in (cache / "images").rglob("*") if p.is_file()]  # no half-written or temporary file left

    from safetensors import SafetensorError

    def full_safetensors(tensors, path, *args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr("bench.trainer.save_file", full_safetensors)
    assert main(["train", "suite=smoke", "method=sft", "train.steps=2", "method.samples_per_prompt=2", "suite.limit=2", f"cache_dir={cache}"]) == 6
    line = one_line(capsys)
    assert line.startswith(f"bench: error: no space left in {cache / 'data'} (No space left on device)") and "a re-run keeps the finished work" in line
