"""Cost and behaviour of the set-level intervals (``bench.distribution``) on synthetic features.

    python benchmarks/set_intervals.py [n=30000] [dim=2048] [halves=5] [kid=10000] [check=0]

Times, on n generated against n real float32 features, ``FrechetToReal``'s setup and one half (the
FID of n/2 rows), and ``kid_replicates`` for 200 halves of ``kid`` rows against ``kid`` real rows
(its cost grows as kid^2). With ``check=N`` it draws Gaussian features (a 1/k^0.9 spectrum, a
generated set with other variances and a shifted mean) and prints the FID of one set, the central
95% of FID over N new generated sets of the same size (the spread an interval should have), and the
95% intervals of N halves (centred on the value, what a run reports) and of N bootstrap resamples.
"""

from __future__ import annotations

import sys
import time

import numpy as np


def timings(n: int, dim: int, halves: int, n_kid: int) -> None:
    from bench.distribution import half_samples
    from bench.metrics.fid import FeatureStats, FrechetToReal, kid_replicates

    rng = np.random.default_rng(0)
    gen, real = rng.random((n, dim), dtype=np.float32), rng.random((n, dim), dtype=np.float32)
    ref = FeatureStats(dim).update(real)
    t = time.perf_counter()
    fast = FrechetToReal(gen, ref)
    setup = time.perf_counter() - t
    masks = half_samples(np.arange(n), halves, 0)
    t = time.perf_counter()
    for mask in masks:
        fast(np.flatnonzero(mask))
    print(f"FID, {n} x {dim}: setup {setup:.1f} s, {(time.perf_counter() - t) / halves:.2f} s per half")
    t = time.perf_counter()
    kid_replicates(gen[:n_kid], real[:n_kid], half_samples(np.arange(n_kid), 200, 0))
    print(f"KID, {n_kid} x {dim} against {n_kid} real: {time.perf_counter() - t:.1f} s for 200 halves")


def check(n: int, dim: int, reps: int) -> None:
    from bench.distribution import centered_interval, half_samples
    from bench.metrics.fid import FeatureStats, FrechetToReal

    rng = np.random.default_rng(0)
    spectrum = np.arange(1, dim + 1) ** -0.9
    spectrum *= 150 / spectrum.sum()
    basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    gen_spectrum, shift = spectrum * np.exp(rng.normal(0, 0.3, dim)), rng.normal(0, 0.04, dim)
    ref = FeatureStats(dim).update((rng.normal(size=(max(n, 10_000), dim)) * np.sqrt(spectrum)) @ basis.T)

    def generated(k):
        return (rng.normal(size=(k, dim)) * np.sqrt(gen_spectrum)) @ basis.T + shift

    fast = FrechetToReal(generated(n), ref)
    value = fast(np.arange(n))
    halves = np.array([fast(np.flatnonzero(m)) for m in half_samples(np.arange(n), reps, 1)])
    boot = np.array([fast(rows) for rows in rng.integers(0, n, (reps, n))])
    new = np.array([FrechetToReal(generated(n), ref)(np.arange(n)) for _ in range(reps)])
    q = [0.025, 0.975]
    print(f"FID of one set of {n} x {dim}: {value:.3f}; over {reps} new sets: mean {new.mean():.3f}, central 95% {np.round(np.quantile(new, q), 3)}, std {new.std(ddof=1):.4f}")
    print(f"  halves, centred:   {np.round(centered_interval(value, halves, 0.95), 3)} (std {halves.std(ddof=1):.4f})")
    print(f"  bootstrap:         {np.round(np.quantile(boot, q), 3)} (std {boot.std(ddof=1):.4f}, mean {boot.mean():.3f})")


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    n, dim = int(args.get("n", 30_000)), int(args.get("dim", 2048))
    if int(args.get("check", 0)):
        check(n, dim, int(args["check"]))
    else:
        timings(n, dim, int(args.get("halves", 5)), int(args.get("kid", 10_000)))


if __name__ == "__main__":
    main(sys.argv[1:])
