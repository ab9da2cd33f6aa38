"""``bench build world``: the micro world's shipped weights trained again from their seeds, and judged
beside the shipped ones by what each is for.

Two parts, each optional (``parts=model,scorers``): the world model (``bench.world.model``, 9 to 26
minutes on 2 cores), judged by the exact evaluator on its samples; and the learned scorers
(``bench.world.scorers``, 5 to 15 minutes), trained on the rebuilt model's samples (on the shipped model's
when only the scorers are rebuilt) and judged on data none of them saw. Float32 CPU kernels pick their
blocking by instruction set, so another CPU ends in other bits: the check is by score, not by bytes.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

HELD_OUT_SEED = 500  # the captions of the scorers' held-out pairs (the training pairs' are seed 400)


def scorers_file(out: Path) -> Path:
    """Where a rebuild in ``out`` writes the scorers: ``world-scorers-<hash>.safetensors``, the shipped file's name."""
    from bench.world.scorers import build_name, world_build

    return Path(out) / f"{build_name(world_build())}.safetensors"


def rebuild_scorers(path: Path, world_model) -> float:
    """Train the scorers from their seed on ``world_model``'s samples into ``path``, as the shipped
    file is written; the seconds it took."""
    from bench.world.scorers import write_scorers

    start = time.perf_counter()
    write_scorers(path, world_model)
    return time.perf_counter() - start


def shipped_scorers() -> dict[str, torch.Tensor] | None:
    """The shipped scorers' tensors, or None where the spec or the world's source was edited (another hash)."""
    from bench.models.prebuilt import shipped_weights
    from bench.world.scorers import build_name, world_build

    shipped = shipped_weights(build_name(world_build()))
    return None if shipped is None else shipped["tensors"]


def other_caption(scene, rng: np.random.Generator) -> str:
    """A caption of ``scene``'s tag that is not its own, drawn from ``rng``."""
    from bench.world.scene import caption_of, random_spec

    while True:
        caption = caption_of(random_spec(scene.tag, rng))
        if caption != scene.caption:
            return caption


def held_out_pairs(world_model, n_per_tag: int) -> dict:
    """Labelled pairs, as the preference model's training pairs, of ``n_per_tag`` captions a tag that no
    scorer trained on (seed 500)."""
    from bench.world.scorers import SPEC, preference_pairs

    return preference_pairs(world_model, {"scenes": {"seed": HELD_OUT_SEED, "count": 6 * n_per_tag}}, seed=int(SPEC["seed"]))


def scorer_quality(weights: dict[str, torch.Tensor], pairs: dict, n_per_tag: int) -> dict[str, float]:
    """What the scorers are for, on data none of them trained on: the world CLIP's ``caption ranking``
    (``n_per_tag`` renders a tag of seed 0: its own caption scored above another of its tag), and the
    preference model's ``gold agreement`` on the decided ``pairs`` and the Spearman correlation of its
    scores of the pairs' first images (samples) with their gold utility."""
    from scipy.stats import spearmanr

    from bench.world.scene import make_prompts
    from bench.world.scorers import RESOLUTION, as_float, embeddings, models_from, preference_logits, text_ids

    clip, pick = models_from(weights)
    scenes, rng = make_prompts(n_per_tag, seed=0), np.random.default_rng(0)
    renders = as_float(np.stack([s.render(RESOLUTION) for s in scenes]))
    with torch.no_grad():
        image, own = embeddings(clip, renders, text_ids([s.caption for s in scenes]))
        _, other = embeddings(clip, renders[:1], text_ids([other_caption(s, rng) for s in scenes]))
        logits = preference_logits(pick, as_float(pairs["a"]), as_float(pairs["b"]), text_ids(pairs["prompt"]))
    decided = pairs["label"] != 0.5
    agree = (logits[:, 0] > logits[:, 1]).numpy() == (pairs["label"] == 1)
    return {
        "caption ranking": float(((image * own).sum(-1) > (image * other).sum(-1)).float().mean()),
        "gold agreement": float(agree[decided].mean()),
        "spearman with gold": float(spearmanr(logits[0::2, 0].numpy(), pairs["gold_a"][0::2]).statistic),
    }


def quality_table(results: dict[str, dict[str, float]]) -> str:
    """A markdown table of ``scorer_quality`` results, one row each."""
    columns = list(next(iter(results.values())))
    lines = ["| scorers | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    lines += [f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in columns) + " |" for name, r in results.items()]
    return "\n".join(lines)


def compare_models(model_cfg: dict, out: Path, cache: Path, n_per_tag: int) -> str:
    """The exact evaluator's per-tag table of the shipped world model and the rebuild in ``out``."""
    from bench.models import load_model
    from bench.world.model import evaluator_scores, scores_table

    start = time.perf_counter()
    shipped = evaluator_scores(load_model(model_cfg, cache), n_per_tag)
    rebuilt = evaluator_scores(load_model({**model_cfg, "source": str(out)}, cache), n_per_tag)
    return (f"the world's evaluator, {n_per_tag} captions a tag, one image each ({time.perf_counter() - start:.0f} s):\n\n"
            + scores_table({"shipped": shipped, "rebuilt": rebuilt}))


def compare_scorers(shipped: dict[str, torch.Tensor], path: Path, world_model, n_per_tag: int) -> str:
    """``scorer_quality`` of the ``shipped`` scorers and of the rebuild at ``path``, on the same
    held-out pairs of ``world_model``'s samples."""
    from safetensors.torch import load_file

    start = time.perf_counter()
    pairs = held_out_pairs(world_model, n_per_tag)
    rebuilt = {k: v.float() for k, v in load_file(path).items()}
    results = {"shipped": scorer_quality(shipped, pairs, n_per_tag), "rebuilt": scorer_quality(rebuilt, pairs, n_per_tag)}
    return (f"the world's scorers, {n_per_tag} renders and {n_per_tag} held-out captions a tag "
            f"({int((pairs['label'] != 0.5).sum())} decided pairs; {time.perf_counter() - start:.0f} s):\n\n" + quality_table(results))


def world_config(cache: Path) -> dict:
    """``model=world``'s resolved config: the scorers are trained on its samples, with its own sampler."""
    from bench.config import compose, to_dict

    return to_dict(compose(["model=world", f"cache_dir={cache}"]))["model"]


def check_scorers_part(parts: list[str], build: str, out: Path) -> None:
    """Refuse, before the minutes of a model build, a scorers rebuild beside another build than
    ``model=world``'s or over an earlier one."""
    from bench.errors import UsageError
    from bench.world.scorers import world_build

    if "scorers" not in parts:
        return
    if build != world_build():
        raise UsageError(f"the world's scorers are trained on samples of model=world, build {world_build()}, not {build}: "
                         "`bench build world parts=scorers`, or parts=model")
    if scorers_file(out).exists():
        raise UsageError(f"{scorers_file(out)} already holds a scorers build: remove it or give another out=DIR")


def judge_rebuild(parts: list[str], model_cfg: dict, out: Path, cache: Path, n_per_tag: int) -> None:
    """The rest of ``bench build`` for a world model: the model rebuild judged by the evaluator, then
    the scorers trained again (on the rebuilt model's samples, or the shipped model's with
    ``parts=scorers``) and judged, each beside the shipped weights where they exist."""
    from bench.models import embedded_build_name, load_model
    from bench.models.prebuilt import SHIPPED

    if "model" in parts:
        build = embedded_build_name(model_cfg)
        print("\n" + (compare_models(model_cfg, out, cache, n_per_tag) if (SHIPPED / f"{build}.safetensors").exists() else
                      f"no shipped weights for {build} (the spec or the world's source was edited): nothing to compare with; "
                      "`python -m bench.models.prebuilt` ships them"))
    if "scorers" not in parts:
        return
    world = world_config(cache)
    sampled_by = load_model({**world, "source": str(out)} if "model" in parts else world, cache)
    path = scorers_file(out)
    print(f"\ntraining the world's scorers from their seed on the {'rebuilt' if 'model' in parts else 'shipped'} model's samples into {path} ...", flush=True)
    print(f"built in {rebuild_scorers(path, sampled_by):.0f} s")
    shipped = shipped_scorers()
    print("\n" + (compare_scorers(shipped, path, sampled_by, n_per_tag) if shipped is not None else
                  "no shipped scorers of this hash (the spec or the world's source was edited): nothing to compare with; "
                  "`python -m bench.models.prebuilt` ships them"))
