"""``bench perf``: speed measured against baselines taken in the same process.

1. Harness overhead: wall time of evaluating the suite over the time spent in
   model forwards (sampling and decoding). 1.0 would mean the harness costs nothing.
2. Cached re-run: wall time of the same evaluation again (every image in the
   store) as a fraction of the first run.
3. Batched generation: images per second at ``gen.batch_size`` over one image at a time.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from bench.config import compose
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

    rows = [
        ("harness overhead (eval wall time / model-forward time)", first.timings["total_s"] / first.timings["model_forward_s"],
         f"{first.timings['total_s']:.2f} s / {first.timings['model_forward_s']:.2f} s"),
        ("cached re-run time / first run time", again.timings["total_s"] / first.timings["total_s"],
         f"{again.timings['total_s']:.2f} s / {first.timings['total_s']:.2f} s ({again.timings['generated']} generated)"),
        (f"batched generation throughput (batch {batch}) / one image at a time", rates[batch] / rates[1],
         f"{rates[batch]:.1f} / {rates[1]:.1f} images/s"),
    ]
    return pd.DataFrame(rows, columns=["measure", "ratio", "detail"])


def main(args: list[str]) -> None:
    torch.set_grad_enabled(False)
    table = measure(args)
    print(f"bench perf ({torch.get_num_threads()} threads)\n")
    print(table.to_markdown(index=False, floatfmt=".3f"))
