"""Self-generated training data for offline methods: K samples per training prompt from the
base model, scored by a reward. SFT keeps the best; preference methods pair best with worst."""

from __future__ import annotations

import torch

from bench.generate import image_seed
from bench.method import TrainContext


@torch.no_grad()
def sample_candidates(ctx: TrainContext, k: int, seed: int, desc: str):
    """Yield (prompt index, latents (K, C, h, w), rewards (K,)) for every training prompt.

    Seeds depend only on (prompt index, sample index, seed), like evaluation images.
    """
    for p, prompt in enumerate(ctx.bar(ctx.prompts, desc)):
        gens = [torch.Generator().manual_seed(image_seed("train-candidates", p, i, seed)) for i in range(k)]
        latents = ctx.model.sample([prompt] * k, gens)
        yield p, latents.float().cpu(), ctx.rewards(latents, [prompt] * k)


def best_worst_pairs(ctx: TrainContext, k: int, seed: int, drop_ties: bool = True) -> dict[str, torch.Tensor]:
    """The best and worst of K samples per prompt as a (preferred, dispreferred) pair.

    A prompt whose K rewards are all equal gives a tie; ties are dropped by default (as the
    Salesforce Diffusion-DPO code drops Pick-a-Pic ties) and counted in ``ties_dropped``.
    """
    win, lose, index, r_win, r_lose, ties = [], [], [], [], [], 0
    for p, latents, rewards in sample_candidates(ctx, k, seed, "preference pairs: best and worst of K"):
        best, worst = int(torch.argmax(rewards)), int(torch.argmin(rewards))
        if rewards[best] == rewards[worst]:
            ties += 1
            if drop_ties:
                continue
        win.append(latents[best])
        lose.append(latents[worst])
        index.append(p)
        r_win.append(rewards[best])
        r_lose.append(rewards[worst])
    if not index:
        raise ValueError("every self-generated pair is a tie; raise samples_per_prompt or use another reward")
    return {
        "latents_w": torch.stack(win),
        "latents_l": torch.stack(lose),
        "prompt_index": torch.tensor(index),
        "reward_w": torch.stack(r_win),
        "reward_l": torch.stack(r_lose),
        "ties_dropped": torch.tensor(ties if drop_ties else 0),
    }
