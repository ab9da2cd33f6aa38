"""Several seeds: ``seeds=0,1,2`` evaluates under several base seeds, ``method.seed=0,1,2`` trains once
per training seed, and the two lists combine into a grid.

One run's interval covers the draw of its prompts and images; whether a difference survives another draw of
the images (the base seed) or of the training (the training seed) is a question about the spread across
seeds. Each evaluation stays an ordinary run folder; a sweep writes one more folder per model
(``<suite>-<model>-<label>-seeds-<hash8>``: ``summary.json``, ``table.md``, ``manifest.json``) with each
run's value, the mean over runs, the standard deviation across runs and across each swept axis, and the
pooled summary: ``report.summarize`` over all runs' images together under their prompts.

``bench.papers`` pools a protocol's seed cells its own way and keeps it: its win rate is the papers' (each
seed against the base run of the same seed, averaged over seeds), where the pooled win rate here compares
each prompt's mean over all runs' images with the base's.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from bench.errors import DataError, UsageError

log = logging.getLogger(__name__)
AXES = {"seed": "seed", "train_seed": "training seed"}  # a run's key in the sweep -> its name in tables
_SEED = re.compile(r"\d+")


@dataclass
class Sweep:
    folder: Path
    summary: dict
    table: str


# --------------------------------------------------------------------------- the command line


def parse_seeds(key: str, value: str) -> list[int]:
    """``0,1,2`` or ``[0,1,2]`` as sorted distinct non-negative integers (OmegaConf would read the
    first as the string "0,1,2"); sorted, so the order typed names the same sweep."""
    text = value.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    parts = [p.strip() for p in text.split(",")]
    if not all(_SEED.fullmatch(p) for p in parts):
        raise UsageError(f"{key}={value} is not a list of seeds: give non-negative integers, e.g. {key}=0,1,2 or {key}=[0,1,2]")
    seeds = [int(p) for p in parts]
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"{key}={value} repeats a seed: give each seed once, e.g. {key}=0,1,2")
    return sorted(seeds)


def split_sweep(args: list[str]) -> tuple[list[str], list[int] | None, list[int] | None]:
    """The arguments without the sweep's lists, the base seeds (``seeds=``) and the training seeds
    (``method.seed=`` given as a list; a single ``method.seed=N`` stays an ordinary override)."""
    rest, seeds, train_seeds = [], None, None
    for arg in args:
        key, _, value = arg.partition("=")
        if key == "seeds":
            seeds = parse_seeds(key, value)
        elif key == "method.seed" and ("," in value or value.strip().startswith("[")):
            train_seeds = parse_seeds(key, value)
        else:
            rest.append(arg)
    return rest, seeds, train_seeds


def check_args(args: list[str], seeds, train_seeds, train: bool) -> None:
    """What a sweep cannot combine with, before any work: one line each."""
    keys = {a.partition("=")[0] for a in args}
    if seeds is not None and "seed" in keys:
        raise UsageError("give the base seeds once: seeds=0,1,2 or seed=N, not both")
    if train_seeds is not None and "train.seed" in keys:
        raise UsageError("method.seed=0,1,2 sets train.seed to each value too: drop train.seed=")
    if train_seeds is not None and not train:
        raise UsageError("`bench eval` trains nothing: method.seed=0,1,2 sweeps training seeds in `bench run`")
    protocol = next((a.partition("=")[2] for a in args if a.startswith("protocol=")), None)
    if protocol:
        raise UsageError(
            f"protocol '{protocol}' fixes its base seeds (protocol.seeds=[0,1,2]) and trains once: drop seeds= and method.seed=, "
            "or give suite=NAME to sweep seeds on one suite"
        )
    if any(a.startswith("gen.shard=") and a != "gen.shard=" for a in args):
        raise UsageError("gen.shard generates one base seed's images: run each shard with seed=N, not seeds=")


# --------------------------------------------------------------------------- running


def run_sweep(args: list[str], seeds, train_seeds, train: bool, progress: bool = True) -> tuple[Sweep | None, Sweep]:
    """Evaluate the base model under every base seed and, with ``train``, train once per training seed
    (the base seed determines no checkpoint) and evaluate each checkpoint under every base seed.
    Returns (the base model's sweep, the tuned model's); ``bench eval``: (None, the base model's)."""
    from bench.config import compose, to_dict
    from bench.runner import Session

    check_args(args, seeds, train_seeds, train)
    cfg0 = to_dict(compose(args, require=("method",) if train else ()))
    eval_seeds = seeds if seeds is not None else [int(cfg0["seed"])]
    set_method_seed = train_seeds is not None and "seed" in cfg0["method"]  # a recipe without one draws all from train.seed

    def session(seed: int, train_seed: int | None = None) -> Session:
        extra = [f"seed={seed}"]
        if train_seeds is not None and train_seed is not None:
            extra += [f"train.seed={train_seed}"] + ([f"method.seed={train_seed}"] if set_method_seed else [])
        return Session(compose([*args, *extra]), progress)

    # 1. the recipe resolves before any work
    if train:
        session(eval_seeds[0], (train_seeds or [None])[0]).check_run()
    # 2. the base model under every base seed
    bases = {}
    for seed in eval_seeds:
        log.info("seeds: base model, seed %d", seed)
        bases[seed] = session(seed).evaluate(None, "base")
    base_runs = [{"seed": s, "train_seed": None, "folder": bases[s].run_dir} for s in eval_seeds]
    base_sweep = write_sweep(cfg0, base_runs, ["seed"], "base") if seeds is not None else None
    if not train:
        return None, base_sweep
    # 3. one training per training seed, each checkpoint under every base seed
    runs = []
    for train_seed in train_seeds or [int(cfg0["train"]["seed"])]:
        checkpoint = session(eval_seeds[0], train_seed).train()
        for seed in eval_seeds:
            log.info("seeds: %s, training seed %d, seed %d", cfg0["method"]["name"], train_seed, seed)
            tuned = session(seed, train_seed).evaluate(checkpoint, cfg0["method"]["name"], baseline=bases[seed])
            runs.append({"seed": seed, "train_seed": train_seed, "folder": tuned.run_dir, "baseline": bases[seed].run_dir})
    axes = [a for a, given in (("seed", seeds), ("train_seed", train_seeds)) if given is not None]
    baseline = base_sweep.folder.name if base_sweep else bases[eval_seeds[0]].run_dir.name
    return base_sweep, write_sweep(cfg0, runs, axes, cfg0["method"]["name"], baseline)


def write_sweep(cfg: dict, runs: list[dict], axes: list[str], label: str, baseline: str | None = None) -> Sweep:
    """The sweep's folder beside its runs: summary.json, table.md and a manifest naming its runs
    (the leaderboard shows the sweep in their place)."""
    from bench.config import stable_hash
    from bench.io import write_json, write_text
    from bench.runner import git_revision

    names = [r["folder"].name for r in runs]
    sweep_id = f"{cfg['suite']['name']}-{cfg['model']['name']}-{label}-seeds-{stable_hash({'runs': names, 'baseline': baseline})[:8]}"
    folder = Path(cfg["out"]) / sweep_id
    summary = aggregate(runs, axes, cfg["stats"], baseline)
    title = f"{cfg['suite']['name']} / {cfg['model']['name']} / {label} over {axes_text(summary['axes'])}" + (f" vs {baseline}" if baseline else "")
    if cfg["scorers"] != "official":
        title += f" (scorers={cfg['scorers']}: random tiny scorers, scores NOT meaningful)"
    table = render(summary, title)
    member_manifests = [json.loads((r["folder"] / "manifest.json").read_text(encoding="utf-8")) for r in runs]
    manifest = {
        "run_id": sweep_id,
        "suite": cfg["suite"]["name"],
        "model": cfg["model"]["name"],
        "method": label,
        "sweep": {"axes": summary["axes"], "runs": names, "baselines": sorted({r["baseline"].name for r in runs if r.get("baseline")})},
        "baseline": baseline,
        "stats": cfg["stats"],
        "scorers": cfg["scorers"],
        "git_revision": git_revision(),
        "timings": {k: sum(m["timings"][k] for m in member_manifests) for k in ("generated", "cached", "total_s")},
    }
    write_json(folder / "summary.json", summary)
    write_text(folder / "table.md", table + "\n")
    write_json(folder / "manifest.json", manifest)
    return Sweep(folder, summary, table)


# --------------------------------------------------------------------------- aggregation


def spread(values: list, keys: list[dict], stat: str = "mean") -> dict:
    """Each run's value, their mean, the standard deviation across runs (ddof 1; null for one run) and,
    per swept axis (``keys``: each run's axis values), the mean at each value and the sd across those."""
    frame = pd.DataFrame(keys, index=range(len(values))).assign(v=pd.to_numeric(pd.Series(values, dtype="object"), errors="coerce"))
    by = {}
    for axis in frame.columns.drop("v"):
        means = frame.groupby(axis)["v"].mean()
        by[axis] = {"means": {str(k): _number(v) for k, v in means.items()}, "sd": _number(means.std())}
    return {stat: _number(frame["v"].mean()), "sd": _number(frame["v"].std()), "per_run": [_number(v) for v in values], "by": by}


def _number(x) -> float | None:
    """A JSON number, or null for a missing or undefined one (the sd of one value)."""
    return None if x is None or pd.isna(x) else float(x)


def metric_specs(summary: dict, scores: pd.DataFrame) -> dict[str, dict]:
    """``report.summarize``'s metric specs, read back from a run's summary and scores: a scoped metric
    (NaN outside its prompts) names the prompts it scored."""
    specs = {}
    for name, m in summary["metrics"].items():
        specs[name] = {k: m[k] for k in ("higher_is_better", "version", "scale")}
        if scores[name].isna().any():
            specs[name]["prompts"] = sorted(int(i) for i in scores.loc[scores[name].notna(), "prompt_index"].unique())
    return specs


def _read(folder: Path, name: str):
    path = folder / name
    if not path.exists():
        raise DataError(f"{folder} has no {name}: re-run that evaluation")
    return pd.read_parquet(path) if name.endswith(".parquet") else json.loads(path.read_text(encoding="utf-8"))


def aggregate(runs: list[dict], axes: list[str], stats: dict, baseline: str | None = None) -> dict:
    """The sweep's summary from its run folders: per metric (and win rate, and set-level metric) the
    spread over runs, and ``pooled``: report.summarize over all runs' images under their prompts, win rates
    comparing each prompt's mean over all runs' images with the base's over all its seeds' images."""
    from bench.report import summarize

    summaries = [_read(r["folder"], "summary.json") for r in runs]
    scores = pd.concat([_read(r["folder"], "scores.parquet") for r in runs], ignore_index=True)
    base_folders = list(dict.fromkeys(r["baseline"] for r in runs if r.get("baseline")))
    base = pd.concat([_read(f, "scores.parquet") for f in base_folders], ignore_index=True) if base_folders else None
    specs = metric_specs(summaries[0], scores)
    groups = [g["by"] for g in summaries[0].get("by_group", [])]
    overall_by = (summaries[0].get("overall") or {}).get("by")
    pooled = summarize(scores, specs, base, int(stats["n_boot"]), float(stats["level"]), int(stats["seed"]), baseline, groups, int(stats["n_permutations"]), overall_by)
    keys = [{a: r[a] for a in axes} for r in runs]
    out = {
        "kind": "seeds",
        "axes": {a: sorted({r[a] for r in runs}) for a in axes},
        "runs": [{"seed": r["seed"], "train_seed": r["train_seed"], "run": r["folder"].name, "baseline": r["baseline"].name if r.get("baseline") else None} for r in runs],
        "n_runs": len(runs),
        "level": float(stats["level"]),
        "metrics": {n: spread([s["metrics"][n]["mean"] for s in summaries], keys) | {"higher_is_better": specs[n]["higher_is_better"]} for n in specs},
        "winrate": {n: spread([s["winrate"][n]["value"] for s in summaries], keys, "value") for n in summaries[0].get("winrate") or {}},
        "pooled": pooled,
    }
    sets = summaries[0].get("sets") or {}
    if sets:  # set-level metrics (FID) have no per-image scores to pool: their spread over runs
        out["sets"] = {
            n: spread([s["sets"][n]["value"] for s in summaries], keys, "value") | {k: e[k] for k in ("higher_is_better", "protocol")}
            for n, e in sets.items()
        }
    return out


# --------------------------------------------------------------------------- tables


def axes_text(axes: dict) -> str:
    """``seeds 0, 1, 2`` / ``training seeds 0, 1`` / both, joined by x."""
    return " x ".join(f"{AXES[a]}s {', '.join(str(v) for v in values)}" for a, values in axes.items())


def run_label(run: dict, axes: dict) -> str:
    return ", ".join(f"{AXES[a]} {run[a]}" for a in axes)


def render(summary: dict, title: str) -> str:
    """Markdown: per metric the mean over runs, the sd across each swept axis, the pooled interval and
    the win rate (mean ± sd over runs, and pooled); then each run's values and folder."""
    from bench.report import _fmt, _markdown

    pct = f"{summary['level'] * 100:g}% CI"
    axes = summary["axes"]
    pooled = summary["pooled"]
    rows = []
    for name, m in [*summary["metrics"].items(), *(summary.get("sets") or {}).items()]:
        p = pooled["metrics"].get(name)
        w, pw = summary["winrate"].get(name), pooled.get("winrate", {}).get(name)
        row = {"metric": name, "mean over runs": _fmt(m.get("mean", m.get("value")))}
        row |= {f"sd across {AXES[a]}s": _fmt(m["by"][a]["sd"]) for a in axes}
        if len(axes) > 1:
            row["sd across runs"] = _fmt(m["sd"])
        row[f"pooled {pct}"] = f"[{_fmt(p['ci'][0])}, {_fmt(p['ci'][1])}]" if p else "-"
        row["direction"] = "↑" if m["higher_is_better"] else "↓"
        if summary["winrate"]:
            row["win rate vs base (mean ± sd)"] = f"{_fmt(w['value'])} ± {_fmt(w['sd'])}" if w else "-"
            row[f"pooled win rate [{pct}]"] = f"{_fmt(pw['value'])} [{_fmt(pw['ci'][0])}, {_fmt(pw['ci'][1])}]" if pw else "-"
        rows.append(row)
    text = f"# {title}\n\n{_markdown(pd.DataFrame(rows))}\n"
    labels = [run_label(r, axes) for r in summary["runs"]]
    for what, entries in (("mean", {**summary["metrics"], **(summary.get("sets") or {})}), ("win rate vs base", summary["winrate"])):
        if entries:
            per_run = [{"metric": n, **{label: _fmt(v) for label, v in zip(labels, e["per_run"])}} for n, e in entries.items()]
            text += f"\n{what} per run:\n\n{_markdown(pd.DataFrame(per_run))}\n"
    folders = [{"run": label, "folder": r["run"], "base run": r["baseline"] or "-"} for label, r in zip(labels, summary["runs"])]
    text += f"\nruns (pooled: all {summary['n_runs']} runs' images under their prompts, report.summarize):\n\n{_markdown(pd.DataFrame(folders))}\n"
    return text
