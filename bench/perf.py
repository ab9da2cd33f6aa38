"""``bench perf``: speed measured against baselines taken in the same process.

1. Harness overhead: wall time of evaluating the suite over the time spent in
   model forwards (sampling and decoding). 1.0 would mean the harness costs nothing.
2. Cached re-run: wall time of the same evaluation again (every image in the
   store) as a fraction of the first run.
3. Batched generation: images per second at ``gen.batch_size`` over one image at a time.
4. Processes: ``bench eval`` of the suite as 2 processes under torchrun (half the cores each) over 1
   process (every core), each into a fresh image store: the evaluation's time (its manifest's, from
   planning to the written folder) and the command's wall time with start-up (the launcher and each
   process importing torch); and whether the two left the same scores.parquet, byte for byte.
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
        cfg = compose(["suite=micro", *args])
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
        evals, walls, same = process_speedup(args, Path(tmp), session.cache / "models")

    rows = [
        ("harness overhead (eval wall time / model-forward time)", first.timings["total_s"] / first.timings["model_forward_s"],
         f"{first.timings['total_s']:.2f} s / {first.timings['model_forward_s']:.2f} s"),
        ("cached re-run time / first run time", again.timings["total_s"] / first.timings["total_s"],
         f"{again.timings['total_s']:.2f} s / {first.timings['total_s']:.2f} s ({again.timings['generated']} generated)"),
        (f"batched generation throughput (batch {batch}) / one image at a time", rates[batch] / rates[1],
         f"{rates[batch]:.1f} / {rates[1]:.1f} images/s"),
        ("bench eval speed-up, 2 processes (torchrun) over 1", evals[1] / evals[2],
         f"evaluation {evals[1]:.2f} s / {evals[2]:.2f} s; with start-up {walls[1]:.2f} s / {walls[2]:.2f} s; scores.parquet {'byte-identical' if same else 'DIFFERS'}"),
    ]
    return pd.DataFrame(rows, columns=["measure", "ratio", "detail"])


def process_speedup(args: list[str], tmp: Path, models: Path) -> tuple[dict[int, float], dict[int, float], bool]:
    """``bench eval`` (suite=micro and ``args``) as 1 process and as 2 under torchrun, the cores split
    evenly, each with an image store of its own (the built models shared): the evaluation's time, the
    command's wall time, and whether their scores.parquet are the same bytes."""
    cores = os.cpu_count() or 2
    walls = {}
    for n in (1, 2):
        cache = tmp / f"procs-{n}"
        cache.mkdir()
        (cache / "models").symlink_to(models.resolve())
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}"] if n > 1 else []
        cmd = [sys.executable, *launcher, "-m", "bench", "eval", "suite=micro", *args, f"out={cache / 'runs'}", f"cache_dir={cache}", "report.html=false", "-q"]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // n))}
        t0 = time.perf_counter()
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        walls[n] = time.perf_counter() - t0
        if done.returncode:
            raise BenchError(f"bench perf: `{' '.join(cmd[1:])}` failed: {done.stderr.strip().splitlines()[-1:]}")
    runs = {n: next((tmp / f"procs-{n}" / "runs").iterdir()) for n in (1, 2)}
    evals = {n: json.loads((run / "manifest.json").read_text())["timings"]["total_s"] for n, run in runs.items()}
    return evals, walls, (runs[1] / "scores.parquet").read_bytes() == (runs[2] / "scores.parquet").read_bytes()


def main(args: list[str]) -> None:
    torch.set_grad_enabled(False)
    table = measure(args)
    print(f"bench perf ({torch.get_num_threads()} threads)\n")
    print(table.to_markdown(index=False, floatfmt=".3f"))
