"""The pre-trained weights of the embedded tiny models, shipped with the package.

A tiny model is built from its spec: weights drawn from a seed, then a short pre-training on one CPU
thread (minutes: about 2 for ``tiny``, 6 for the few-step ones). The draw is cheap and the same
everywhere, the pre-training is neither: float32 CPU kernels pick their blocking by instruction set,
so another CPU could end in other bits. So the weights the pre-trainings produced are shipped here,
one file per build hash (``tiny-<hash>.safetensors``, the name of the build's cache folder; the
world model's ``world-<hash>``, 25 minutes of pre-training on 2 cores, see ``bench.world.model``), and a
build with a shipped file draws the rest from the seed and loads them: the same bytes as a full build
(tested), on any machine, in seconds. A spec or builder edit changes the hash, so a stale file is
never used: that build pre-trains, and ``python -m bench.models.prebuilt`` writes the new files.
The micro world's learned scorers ship here too (``world-scorers-<hash>``, ``bench.world.scorers``).
"""

from __future__ import annotations

from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

SHIPPED = Path(__file__).parent / "prebuilt"


def shipped_weights(build_name: str) -> dict | None:
    """The shipped pre-training result of the build ``tiny-<hash>`` (``world-<hash>``), or None."""
    from safetensors import safe_open

    path = SHIPPED / f"{build_name}.safetensors"
    if not path.exists():
        return None
    with safe_open(path, "pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors = {k: v.float() if v.dtype == torch.float16 else v for k, v in tensors.items()}
    weights = {"tensors": tensors, "vae_scaling_factor": float(metadata["vae_scaling_factor"]) if metadata.get("vae_scaling_factor") else None}
    if metadata.get("vae_shift_factor"):  # the flow models' VAEs also shift their latents
        weights["vae_shift_factor"] = float(metadata["vae_shift_factor"])
    return weights


def save_shipped(build_name: str, weights: dict) -> None:
    """Write ``pretrained_weights`` as ``shipped_weights`` reads them: the scaling factor exact (as
    repr), and a float32 tensor that float16 holds exactly (the world model rounds its weights so)
    as float16, half the bytes and read back to the same float32 values."""
    from safetensors.torch import save_file

    scaling = weights["vae_scaling_factor"]
    metadata = {"vae_scaling_factor": repr(scaling)} if scaling is not None else {}
    if weights.get("vae_shift_factor") is not None:
        metadata["vae_shift_factor"] = repr(weights["vae_shift_factor"])
    tensors = {k: v.half() if v.dtype == torch.float32 and torch.equal(v.half().float(), v) else v for k, v in weights["tensors"].items()}
    save_file(tensors, SHIPPED / f"{build_name}.safetensors", metadata=metadata)


def embedded_builds() -> dict[str, dict]:
    """Every registered embedded model's build, by build folder name (two names for one spec, such
    as ``tiny`` and ``tiny-onestep``, share one)."""
    from bench.config import compose, to_dict
    from bench.models import embedded_build_name
    from bench.registry import MODELS

    builds = {}
    for name in MODELS.names():
        model = to_dict(compose([f"model={name}"]))["model"]
        if model["source"] == "tiny":
            builds.setdefault(embedded_build_name(model), model["build"])
    return builds


def world_scorers_build() -> str:
    """The build name of the micro world's learned scorers (``bench.world.scorers``), shipped here too."""
    from bench.world.scorers import build_name, world_build

    return build_name(world_build())


def _pretrain_and_extract(build_name: str, spec: dict, scratch: str) -> tuple[str, dict]:
    from bench.models import embedded_builder

    build, pretrained_weights = embedded_builder(spec)
    folder = Path(scratch) / build_name
    build(spec, folder)
    return build_name, pretrained_weights(folder, spec)


def write_shipped(workers: int = 2) -> list[str]:
    """Pre-train every embedded build that has no shipped file (``workers`` at once, each on one
    thread; then the world builds, one at a time on every thread, and the world's scorers), write
    their files and remove the files no build names any more."""
    import tempfile

    builds = embedded_builds()
    missing = {n: s for n, s in builds.items() if not (SHIPPED / f"{n}.safetensors").exists()}
    synthetic = {n: s for n, s in missing.items() if s.get("data") != "world"}
    SHIPPED.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        with ProcessPoolExecutor(workers) as pool:
            results = list(pool.map(_pretrain_and_extract, synthetic, synthetic.values(), [scratch] * len(synthetic)))
        results += [_pretrain_and_extract(n, s, scratch) for n, s in missing.items() if n not in synthetic]
        for name, weights in results:
            save_shipped(name, weights)
            print(f"wrote {SHIPPED / name}.safetensors", flush=True)
    scorers = world_scorers_build()
    if not (SHIPPED / f"{scorers}.safetensors").exists():
        from bench.world.scorers import write_scorers

        write_scorers(SHIPPED / f"{scorers}.safetensors")
        print(f"wrote {SHIPPED / scorers}.safetensors", flush=True)
        missing[scorers] = {}
    for stale in sorted(set(p.stem for p in SHIPPED.glob("*.safetensors")) - set(builds) - {scorers}):
        (SHIPPED / f"{stale}.safetensors").unlink()
        print(f"removed {stale}.safetensors (no registered model builds it)", flush=True)
    return sorted(missing)


def rebuild(model_cfg: dict, out: Path) -> float:
    """Pre-train the embedded model of ``model_cfg`` from its seed into ``out`` (a pipeline folder,
    loadable as ``model.source=out``), ignoring the shipped weights; returns the seconds it took."""
    import time

    from bench.models import embedded_builder

    start = time.perf_counter()
    embedded_builder(model_cfg["build"])[0](model_cfg["build"], Path(out))
    return time.perf_counter() - start


if __name__ == "__main__":  # python -m bench.models.prebuilt: after editing a tiny spec or bench/models/tiny.py
    write_shipped()
