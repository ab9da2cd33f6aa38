"""Half precision on a GPU: every learned metric scored on CUDA in float16 against the CPU in float32,
on the same images and the same (seeded, tiny) weights, with the time each took.

    python benchmarks/half_precision.py                      # every registered learned metric
    python benchmarks/half_precision.py pickscore,dino,fid   # some of them

It checks that each metric's float16 path runs on CUDA and how far it moves the numbers; the real
architectures' float16 differences are those of the scoring benchmark (``benchmarks/scoring.py
device=cuda arch=real``).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.metrics import ReferenceSet
from bench.registry import METRICS
from bench.scoring import make_metric


WEIGHT_FREE = ("bench.metrics.weightfree", "bench.metrics.reference")


def main(argv: list[str]) -> None:
    if not torch.cuda.is_available():
        sys.exit("benchmarks/half_precision.py needs a CUDA device")
    names = argv[0].split(",") if argv else [n for n in METRICS.names() if METRICS.entry(n).target.split(":")[0] not in WEIGHT_FREE]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (4, 3, 256, 256), generator=g, dtype=torch.uint8).float() / 255
    pils = [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]
    prompts = ["a green bench and a red car", "a girl on the left of a brown chair", "three apples on a table", "a photo of sks dog"]
    photos = Path(tempfile.mkdtemp())
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (200, 200, 3), dtype=np.uint8)).save(photos / f"{i}.jpg")
    refs = [ReferenceSet("dog", tuple(sorted(photos.glob("*.jpg"))))] * len(prompts)
    print(f"{torch.cuda.get_device_name()}, tiny seeded scorers, {len(prompts)} images of 256 px")
    print("| metric | float16 on CUDA | largest difference from float32 on CPU | largest value | time |")
    print("|---|---|---|---|---|")
    for name in names:
        start = time.perf_counter()
        try:
            cpu, gpu = make_metric(name, "tiny").to("cpu"), make_metric(name, "tiny").to("cuda")
            if hasattr(cpu, "features"):  # set-level metrics: compare the features
                a, b = cpu.features(pils).double().cpu(), gpu.features(pils).double().cpu()
            else:
                kw = {"refs": refs} if cpu.needs_refs else {}
                a, b = cpu.score(images, prompts, **kw), gpu.score(images.cuda(), prompts, **kw).cpu()
            print(f"| {name} | ok | {float((a - b).abs().max()):.2e} | {float(a.abs().max()):.3g} | {time.perf_counter() - start:.1f} s |", flush=True)
        except Exception as err:  # report every metric, then fail
            print(f"| {name} | FAILED: {type(err).__name__}: {str(err).splitlines()[0][:160]} | | | |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
