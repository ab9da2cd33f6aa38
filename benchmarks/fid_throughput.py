"""Throughput of the set-level metrics (FID, KID) on a synthetic real set, with the official loading
path: the Inception-v3 architecture (torchvision, random weights) scripted to TorchScript under the
official file name ``inception-2015-12-05.pt`` in a temporary ``BENCH_HOME``. No download.

    python benchmarks/fid_throughput.py [device=cuda] [n=200] [size=1024] [batch=64] [cpu_check=32]

Prints the images/s of the first (uncached) reference pass and the time of the cached one, and, on a
GPU, the FID of the same two folders computed on the GPU and on the CPU.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def images(folder: Path, n: int, size: int, seed: int, categories=10) -> dict:
    rng = np.random.default_rng(seed)
    meta = {}
    for i in range(n):
        category = f"c{i % categories}"
        path = folder / category / f"{seed}-{i:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize((size, size), Image.Resampling.BILINEAR).save(path, quality=90)
        meta[f"{seed}-{i:05d}"] = {"prompt": f"prompt {i}", "category": category}
    return meta


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    device = args.get("device", "cuda" if torch.cuda.is_available() else "cpu")
    n, size, batch, cpu_n = int(args.get("n", 200)), int(args.get("size", 1024)), int(args.get("batch", 64)), int(args.get("cpu_check", 32))
    root = Path(tempfile.mkdtemp(prefix="bench-fid-"))
    os.environ["BENCH_HOME"] = str(root / "home")
    t0 = time.perf_counter()
    from bench.metrics.fid import random_inception_pool3, save_stand_in

    save_stand_in(root / "home" / "weights" / "inception-2015-12-05.pt", random_inception_pool3(), 2048)
    meta = images(root / "real", n, size, 0)
    images(root / "fake", n, size, 1)
    (root / "meta_data.json").write_text(json.dumps(meta))
    print(f"setup (script the Inception, write {2 * n} JPEGs of {size}px): {time.perf_counter() - t0:.1f} s")

    from bench import distribution
    from bench.config import compose, to_dict
    from bench.metrics.fid import FID, KID
    from bench.suite import load_suite

    cfg = to_dict(compose(["suite=mjhq30k", f"suite.source={root / 'meta_data.json'}", f"suite.references={root / 'real'}"]))["suite"]
    suite = load_suite(cfg)
    real = distribution.real_set(suite, root / "cache")
    metrics = {"fid": FID().to(device), "kid": KID().to(device)}
    metrics["fid"].loaded()
    for attempt in ("first (computes)", "second (cached)"):
        scorer = distribution.SetScorer(metrics, suite.groups, real, root / "cache", suite.name, batch, progress=False)
        t0 = time.perf_counter()
        key = next(iter(scorer.extractors))
        sets = scorer.reference(key)
        dt = time.perf_counter() - t0
        print(f"{device} reference pass, {attempt}: {dt:.2f} s" + (f", {n / dt:.1f} img/s" if scorer.computed[key] else "") + f" (groups: {len(sets) - 1}, rows kept: {sets[None].feats.shape})")
    t0 = time.perf_counter()
    got = distribution.compare_folders(root / "fake", root / "real", metrics, suite.real_images.resolution, batch)
    print(f"{device} folder vs folder, {2 * n} images: {time.perf_counter() - t0:.2f} s, fid {got['fid']:.6g} kid {got['kid']:.6g}")
    if device != "cpu" and cpu_n:
        sub = root / "sub"
        for name in ("fake", "real"):
            files = sorted((root / name).rglob("*.jpg"))[:cpu_n]
            for f in files:
                (sub / name / f.name).parent.mkdir(parents=True, exist_ok=True)
                (sub / name / f.name).write_bytes(f.read_bytes())
        on = {d: distribution.compare_folders(sub / "fake", sub / "real", {"fid": FID().to(d)}, suite.real_images.resolution, batch)["fid"] for d in (device, "cpu")}
        print(f"{cpu_n} vs {cpu_n} images: fid on {device} {on[device]!r}, on cpu {on['cpu']!r}, relative difference {abs(on[device] - on['cpu']) / on['cpu']:.2e}")


if __name__ == "__main__":
    main(sys.argv[1:])
