"""``bench perf``: speed measured against baselines taken in the same process.

1. Harness overhead: wall time of evaluating the suite over the time spent in
   model forwards (sampling and decoding). 1.0 would mean the harness costs nothing.
2. Cached re-run: wall time of the same evaluation again (every image in the
   store) as a fraction of the first run.
3. Batched generation: images per second at ``gen.batch_size`` over one image at a time.
4. Processes: ``bench eval`` of the suite as 2 processes under torchrun (half the cores each) over 1
   process (every core), each into a fresh image store: the time of the stages the ranks split
   (generation and scoring, as rank 0's manifest times them, waiting for the other included), then
   the whole evaluation (with each process loading the model) and the command's wall time (with the
   launcher and each process importing torch); and whether the two left the same scores.parquet.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from bench.config import compose
from bench.errors import BenchError
from bench.generate import ImageStore, generate
from bench.runner import Session


def measure(args: list[str]) -> pd.DataFrame:
    with tempfile.TemporaryDirectory(prefix="bench-perf-") as tmp:
        cfg = compose(["suite=smoke", *args])
        cfg.out = str(Path(tmp) / "runs")
        session = Session(cfg, progress=False)
        session.model()  # build the tiny model first: the evaluation below times the harness, not the build
        session.store = ImageStore(Path(tmp) / "images")  # a fresh image store, the user's cache untouched

        first = session.evaluate(None, "base")
        again = session.evaluate(None, "base")

        model = session.model().to(session.device, session.dtype)
        jobs = session.plan(model)
        batch = int(session.cfg["gen"]["batch_size"])
        rates = {}
        for size in (batch, 1):
            store = ImageStore(Path(tmp) / f"store-{size}")
            t0 = time.perf_counter()
            generate(model, jobs, store, size, session.sampler, progress=False)
            rates[size] = len(jobs) / (time.perf_counter() - t0)
        runs = process_speedup(args, Path(tmp), session.cache / "models")

    rows = [
        ("harness overhead (eval wall time / model-forward time)", first.timings["total_s"] / first.timings["model_forward_s"],
         f"{first.timings['total_s']:.2f} s / {first.timings['model_forward_s']:.2f} s"),
        ("cached re-run time / first run time", again.timings["total_s"] / first.timings["total_s"],
         f"{again.timings['total_s']:.2f} s / {first.timings['total_s']:.2f} s ({again.timings['generated']} generated)"),
        (f"batched generation throughput (batch {batch}) / one image at a time", rates[batch] / rates[1],
         f"{rates[batch]:.1f} / {rates[1]:.1f} images/s"),
        *process_rows(runs),
    ]
    return pd.DataFrame(rows, columns=["measure", "ratio", "detail"])


def process_speedup(args: list[str], tmp: Path, models: Path) -> dict[str, dict]:
    """``bench eval`` (suite=smoke and ``args``) as 2 processes under torchrun (half the cores each), as
    1 process with every core and as 1 with half of them, each with an image store of its own (the
    built models shared): per launch its manifest's timings, its wall time and its scores' bytes."""
    cores = os.cpu_count() or 2
    out = {}
    for name, n, threads in (("two", 2, max(1, cores // 2)), ("one", 1, cores), ("one-half", 1, max(1, cores // 2))):
        cache = tmp / f"procs-{name}"
        cache.mkdir()
        (cache / "models").symlink_to(models.resolve())
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 else []
        cmd = [sys.executable, *launcher, "-m", "bench", "eval", "suite=smoke", *args, f"out={cache / 'runs'}", f"cache_dir={cache}", "report.html=false", "-q"]
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode:
            raise BenchError(f"bench perf: `{' '.join(cmd[1:])}` failed: {done.stderr.strip().splitlines()[-1:]}")
        run = next((cache / "runs").iterdir())
        timings = json.loads((run / "manifest.json").read_text())["timings"]
        out[name] = {"split": timings["generate_s"] + timings["score_s"], "eval": timings["total_s"], "wall": wall,
                     "scores": (run / "scores.parquet").read_bytes(), "threads": threads}
    return out


def process_rows(runs: dict[str, dict]) -> list[tuple]:
    """The speed-up of 2 processes on generation and scoring (the stages they split), over one process
    with every core and over one with a rank's share of them."""
    two, same = runs["two"], runs["one"]["scores"] == runs["two"]["scores"] == runs["one-half"]["scores"]
    rows = []
    for name, what in (("one", "every core"), ("one-half", f"{runs['one-half']['threads']} thread(s), a rank's share")):
        base = runs[name]
        rows.append((f"bench eval generation and scoring: 2 processes (torchrun) over 1 process with {what}", base["split"] / two["split"],
                     f"{base['split']:.2f} s / {two['split']:.2f} s; whole evaluation {base['eval']:.2f} s / {two['eval']:.2f} s; "
                     f"with start-up {base['wall']:.2f} s / {two['wall']:.2f} s"))
    rows[-1] = (*rows[-1][:2], rows[-1][2] + f"; scores.parquet {'byte-identical in all three' if same else 'DIFFER'}")
    return rows


def main(args: list[str]) -> None:
    torch.set_grad_enabled(False)
    table = measure(args)
    print(f"bench perf ({torch.get_num_threads()} threads)\n")
    print(table.to_markdown(index=False, floatfmt=".3f"))
