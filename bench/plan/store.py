"""Measured activation profiles, kept so that ``bench plan`` answers in a second.

A profile (``bench.plan.profile``) takes from a fraction of a second (the tiny models) to about 20 s
(a gradient-carrying SDXL pass at 1024 px) on two CPU cores. Each is keyed by everything it depends
on (the network's class and config, the resolution, the dtypes, LoRA or full fine-tuning, gradient
checkpointing, the version of the measurement below) and kept in two places: ``profiles.json`` next
to this file holds the profiles of every paper and official preset (written by
``python -m bench.plan.store``, which re-measures them), and ``<cache_dir>/plan/profiles.json`` the
ones measured on this machine. A profile found in neither is measured and added to the latter.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from bench.config import stable_hash

SHIPPED = Path(__file__).parent / "profiles.json"
VERSION = 2  # of the measurement (bench.plan.profile); a change re-measures every profile


def profile_key(kind: str, component: str, config: dict, **settings) -> tuple[str, dict]:
    """The key of a profile and the readable record stored beside its result."""
    record = {"kind": kind, "component": component, **{k: v for k, v in settings.items() if v is not None}}
    return stable_hash({"version": VERSION, "kind": kind, "config": config, **settings})[:20], record


class Profiles:
    """The profiles on file, measuring (and keeping) the missing ones."""

    def __init__(self, cache_dir: Path | None = None, measure: bool = True):
        self.local = Path(cache_dir) / "plan" / "profiles.json" if cache_dir else None
        self.shipped = self._read(SHIPPED)
        self.cached = self._read(self.local) if self.local else {}
        self.measure = measure
        self.used: dict[str, dict] = {}  # every profile this planner read: what `python -m bench.plan.store` ships
        self.measured: list[str] = []

    @staticmethod
    def _read(path: Path | None) -> dict:
        if path is None or not path.is_file():
            return {}
        try:
            return json.loads(path.read_text()).get("profiles", {})
        except (OSError, ValueError):
            return {}

    def get(self, key: str, record: dict, measure) -> dict:
        entry = self.shipped.get(key) or self.cached.get(key)
        if entry is None:
            if not self.measure:
                raise KeyError(f"profile {record} is not on file")
            entry = {**record, "result": measure()}
            self.measured.append(key)
            self.cached[key] = entry
            if self.local is not None:
                write(self.local, self.cached)
        self.used[key] = entry
        return entry["result"]


# ---- the profiles a plan reads, by what they measure ---------------------------------------------
def _lookup(profiles: Profiles, kind: str, component, measure, **settings) -> dict:
    key, record = profile_key(kind, component.name, {"cls": component.cls, "config": component.config}, **settings)
    return profiles.get(key, record, measure)


def unet_training(profiles: Profiles, unet, side: int, setting, lora: int | None, targets, checkpointing: bool) -> dict:
    """``bench.plan.profile.unet_training`` of a model's UNet (an ``arch.Component``) as the trainer runs it."""
    from bench.plan import profile

    return _lookup(
        profiles, "unet-train", unet, lambda: profile.unet_training(unet.config, side, setting, lora, targets, checkpointing),
        side=side, weights=setting.weights, autocast=setting.autocast, lora=int(lora or 0), targets=list(targets) if lora else None, checkpointing=bool(checkpointing),
    )


def unet_encoder_training(profiles: Profiles, unet, side: int, setting, checkpointing: bool) -> dict:
    from bench.plan import profile

    return _lookup(
        profiles, "unet-encoder-train", unet, lambda: profile.unet_encoder_training(unet.config, side, setting, checkpointing),
        side=side, weights=setting.weights, autocast=setting.autocast, checkpointing=bool(checkpointing),
    )


def unet_forward(profiles: Profiles, unet, side: int, setting) -> dict:
    from bench.plan import profile

    return _lookup(profiles, "unet-forward", unet, lambda: profile.unet_forward(unet.config, side, setting), side=side, weights=setting.weights, autocast=setting.autocast)


def vae_decode(profiles: Profiles, vae, side: int, setting) -> dict:
    from bench.plan import profile

    return _lookup(profiles, "vae-decode", vae, lambda: profile.vae_decode(vae.config, side, setting), side=side, weights=setting.weights, autocast=setting.autocast)


def vae_encode(profiles: Profiles, vae, resolution: int, setting) -> dict:
    from bench.plan import profile

    return _lookup(profiles, "vae-encode", vae, lambda: profile.vae_encode(vae.config, resolution, setting), resolution=resolution, weights=setting.weights, autocast=setting.autocast)


def write(path: Path, profiles: dict) -> None:
    import diffusers
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    body = {
        "about": "activation profiles of bench.plan.profile (bytes); keys hash the network's config and the settings",
        "version": VERSION,
        "measured_with": {"torch": torch.__version__.split("+")[0], "diffusers": diffusers.__version__},
        "profiles": dict(sorted(profiles.items())),
    }
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(body, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)


def refresh(commands: list[list[str]] | None = None) -> Path:
    """Re-measure the profiles of the given ``bench plan`` argument lists (default: every method preset
    that names its base model, for ``bench run``) and ship exactly those in ``profiles.json``."""
    from bench.plan.planner import make_plan, preset_commands

    profiles = Profiles(None)
    profiles.shipped = {}
    for args in commands or preset_commands():
        make_plan("run", args, profiles=profiles)
        print(f"{' '.join(args)}: {len(profiles.used)} profiles", file=sys.stderr, flush=True)
    write(SHIPPED, profiles.used)
    return SHIPPED


if __name__ == "__main__":
    print(refresh([a.split() for a in sys.argv[1:]] or None))
