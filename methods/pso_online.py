"""Online PSO (Miao et al., ICLR 2025), Eq. 7 and Algorithm 2, for few-step models.

Training alternates rounds of sampling and fitting. In each round, for ``prompts_per_round``
training prompts, two trajectories are sampled from the *current* model with its own stochastic
few-step sampler; the one the reward scores higher is the target tau, the other the reference
rho (Alg. 2: tau = 1 if s_1 > s_2, else 2). Then ``epochs_per_round`` epochs over the round's
pairs. With the sampler's Gaussian transitions p(x_{t_{n-1}} | x_{t_n}) = N(mu(x_{t_n}), sigma_{t_n}^2 I),

    log-ratio(x) = sum_{n=2..N} log p_theta(x_{t_{n-1}} | x_{t_n}) - log p_pre(x_{t_{n-1}} | x_{t_n})
                 = -sum_{n=2..N} ( ||x_{t_{n-1}} - mu_theta||^2 - ||x_{t_{n-1}} - mu_pre||^2 ) / (2 sigma_{t_n}^2)
    L = -log sigmoid( beta * (log-ratio(tau) - log-ratio(rho)) )

The factor 1/(2 sigma_{t_n}^2), printed outside the sum in the paper, is taken per step. The last
step (t_1 -> x_0) is deterministic and not trained. p_pre is the model with its LoRA adapters off.

Each round's trajectories are saved next to the checkpoints (back to the last checkpoint's round),
so a resumed run trains on exactly the pairs the interrupted one sampled.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from bench.generate import image_seed
from bench.method import Method, TrainContext
from bench.methods.pso_offline import trained_timesteps
from bench.models.diffusion import gaussian_log_prob


def pso_online_loss(logratio_tau: torch.Tensor, logratio_rho: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair Eq. 7 from the trajectory log-likelihood ratios (model over pre-trained model)."""
    margin = logratio_tau - logratio_rho
    return -F.logsigmoid(beta * margin), margin


def trajectory_logratio(ctx: TrainContext, states: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """sum over the stochastic steps of log p_theta - log p_pre of each recorded transition.

    ``states`` is (B, N + 1, C, h, w): x_{t_N}, ..., x_{t_1}, x_0 as sampled."""
    model = ctx.model
    steps = model.timesteps()
    trained = trained_timesteps(steps)
    cond = model.encode_prompts(prompts)
    guidance = model.sampler.guidance
    uncond = model.unconditional(len(prompts)) if guidance > 1.0 else None
    total = torch.zeros(states.shape[0], device=ctx.device, dtype=torch.float64)
    for i, t in enumerate(trained):
        x_t, x_prev, t_prev = states[:, i], states[:, i + 1], steps[i + 1]

        def log_prob():
            eps = model.predict_eps(x_t, t, cond, uncond, guidance)
            step = model.transition(x_t, model.x0_from_eps(x_t, eps, t), eps, t, t_prev)
            return gaussian_log_prob(x_prev.double(), step.mean.double(), step.std.double())

        with torch.no_grad(), ctx.reference():
            pre = log_prob()
        total = total + (log_prob() - pre)
    return total


class OnlinePSO(Method):
    def steps_per_round(self, batch_size: int) -> int:
        return math.ceil(int(self.cfg["prompts_per_round"]) / batch_size) * int(self.cfg["epochs_per_round"])

    def prepare(self, ctx: TrainContext) -> dict:
        trained_timesteps(ctx.model.timesteps())  # fail now, not after the first round, on a 1-step sampler
        return {}

    def round_pairs(self, ctx: TrainContext, r: int) -> dict[str, torch.Tensor]:
        """The pairs of round r: sampled with the current weights the first time, read back after."""
        path = Path(ctx.workdir) / "rounds" / f"round-{r:06d}.safetensors"
        if path.exists():
            return load_file(path)
        seed, n = int(self.cfg["seed"]), int(self.cfg["prompts_per_round"])
        g = torch.Generator().manual_seed(image_seed("pso-online-prompts", r, 0, seed))
        index = torch.randint(0, len(ctx.prompts), (n,), generator=g)
        prompts = [ctx.prompts[int(i)] for i in index]
        gens = [torch.Generator().manual_seed(image_seed("pso-online", r, i, seed)) for i in range(2 * n)]
        with torch.no_grad():
            x0, states, _ = ctx.model.sample(prompts * 2, gens, trajectory=True)
            rewards = ctx.rewards(x0, prompts * 2)
        states = torch.stack(states, dim=1).float().cpu()  # (2n, N + 1, C, h, w)
        first_wins = rewards[:n] > rewards[n:]  # Alg. 2: ties make the second trajectory the target
        pick = lambda a, b: torch.where(first_wins.reshape(-1, 1, 1, 1, 1), a, b)
        data = {
            "states_tau": pick(states[:n], states[n:]).contiguous(),
            "states_rho": pick(states[n:], states[:n]).contiguous(),
            "prompt_index": index,
            "reward_tau": torch.where(first_wins, rewards[:n], rewards[n:]),
            "reward_rho": torch.where(first_wins, rewards[n:], rewards[:n]),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        save_file(data, tmp)
        tmp.replace(path)
        # A resume restarts at the last checkpoint, a multiple of train.save_every: rounds before the one
        # it falls in are never read again (at SDXL size a round of 128 trajectories is about 335 MB).
        first_needed = (ctx.step // ctx.save_every * ctx.save_every) // self.steps_per_round(ctx.batch_size)
        for old in path.parent.glob("round-*.safetensors"):
            if int(old.stem.split("-")[1]) < first_needed:
                old.unlink()
        return data

    def loss(self, ctx: TrainContext, data, generator: torch.Generator):
        spr = self.steps_per_round(ctx.batch_size)
        r, within = divmod(ctx.step, spr)
        pairs = self.round_pairs(ctx, r)
        n = pairs["prompt_index"].shape[0]
        batches_per_epoch = math.ceil(n / ctx.batch_size)
        position = within * ctx.grad_accum + ctx.micro
        epoch, k = divmod(position % (batches_per_epoch * int(self.cfg["epochs_per_round"])), batches_per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(image_seed("pso-online-order", r, epoch, int(self.cfg["seed"]))))
        idx = perm[k * ctx.batch_size : (k + 1) * ctx.batch_size]
        prompts = [ctx.prompts[int(i)] for i in pairs["prompt_index"][idx]]
        to = dict(device=ctx.device, dtype=ctx.model.dtype)
        states = torch.cat([pairs["states_tau"][idx], pairs["states_rho"][idx]]).to(**to)
        tau, rho = trajectory_logratio(ctx, states, prompts * 2).chunk(2)
        losses, margin = pso_online_loss(tau, rho, float(self.cfg["beta"]))
        ctx.logs["rounds"] = r + 1
        return losses.mean(), {"implicit_acc": float((margin > 0).float().mean()), "round": r}

    def data_manifest(self, ctx: TrainContext, data) -> dict:
        return {"source": "online", "rounds": int(ctx.logs.get("rounds", 0)), "pairs_per_round": int(self.cfg["prompts_per_round"])}
