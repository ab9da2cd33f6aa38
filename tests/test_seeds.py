"""Several seeds through the CLI: `seeds=0,1,2` trains once and reports each seed's mean, their mean and sd
and the pooled summary (checked against the runs' scores.parquet), a repeated call generates nothing,
`method.seed=0,1` trains once per value (alone and in a grid with `seeds=`), a malformed list is one
line and exit 2, and the leaderboard shows a sweep as one row in place of its runs.

Small settings (4 prompts, 2 samples per training prompt, 12 training steps) in a cache of this
module's own (so its checkpoints can be counted) that shares the session's built tiny model.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench.cli import main
from bench.report import _fmt
from bench.seeds import parse_seeds

METRICS = ["brightness", "colorfulness", "contrast", "jpeg_compressibility"]
SFT = ["suite=smoke", "method=sft", "suite.limit=4", "train.steps=12", "train.save_every=4", "method.samples_per_prompt=2", "report.html=false"]


def bench(*argv: str) -> tuple[int, str]:
    """The CLI in-process with its stdout (module fixtures cannot use capsys)."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = main(list(argv))
    return code, buf.getvalue()


def read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def sweep_dir(out: Path, label: str) -> Path:
    found = sorted(out.glob(f"smoke-tiny-{label}-seeds-*"))
    assert len(found) == 1, f"expected one {label} sweep under {out}, found {found}"
    return found[0]


def checkpoints(cache: Path) -> list[str]:
    return sorted(p.name for p in (cache / "checkpoints").iterdir())


def winrate(run: pd.DataFrame, base: pd.DataFrame, metric: str) -> float:
    """Per-prompt means compared, ties one half (the definition of report.summarize)."""
    r, b = run.groupby("prompt_index")[metric].mean(), base.groupby("prompt_index")[metric].mean()
    return float(np.where(r == b, 0.5, (r > b).astype(float)).mean())


@pytest.fixture(scope="module")
def cache(cache_dir, tmp_path_factory) -> Path:
    assert main(["prefetch", "model=tiny", f"cache_dir={cache_dir}"]) == 0
    root = tmp_path_factory.mktemp("seeds-cache")
    (root / "models").symlink_to((cache_dir / "models").resolve())
    return root


@pytest.fixture(scope="module")
def seeds_run(cache, tmp_path_factory) -> tuple[Path, str]:
    """`bench run suite=smoke method=sft seeds=0,1,2 ...`: its out folder and stdout."""
    out = tmp_path_factory.mktemp("seeds-runs")
    code, stdout = bench("run", *SFT, "seeds=0,1,2", f"cache_dir={cache}", f"out={out}")
    assert code == 0
    return out, stdout


def test_parse_seeds_reads_both_list_forms_sorted():
    assert parse_seeds("seeds", "0,1,2") == parse_seeds("seeds", "[2, 0, 1]") == parse_seeds("seeds", " 1,0 ,2") == [0, 1, 2]
    assert parse_seeds("method.seed", "7") == [7]


def test_seeds_trains_once_and_reports_per_seed_means_their_spread_and_the_pooled_summary(seeds_run, cache, cli):
    out, stdout = seeds_run
    sweep = sweep_dir(out, "sft")
    summary = read(sweep / "summary.json")
    runs = summary["runs"]
    assert summary["axes"] == {"seed": [0, 1, 2]} and [r["seed"] for r in runs] == [0, 1, 2] and summary["n_runs"] == 3
    assert (sweep / "table.md").read_text(encoding="utf-8") in stdout + "\n" and f"sweep folder: {sweep}" in stdout
    manifests = [read(out / r["run"] / "manifest.json") for r in runs]
    assert [m["seeds"]["base_seed"] for m in manifests] == [0, 1, 2]
    assert [read(out / r["baseline"] / "manifest.json")["seeds"]["base_seed"] for r in runs] == [0, 1, 2]

    # one training for the three seeds; `bench train` at another base seed names the same checkpoint
    assert len({m["checkpoint"]["train_id"] for m in manifests}) == 1 and len(checkpoints(cache)) == 1
    code, train_out, _ = cli("train", *SFT, "seed=2", cache=cache)
    assert code == 0 and train_out.strip() == f"checkpoint: {manifests[0]['checkpoint']['path']}"

    tuned = [pd.read_parquet(out / r["run"] / "scores.parquet") for r in runs]
    base = [pd.read_parquet(out / r["baseline"] / "scores.parquet") for r in runs]
    assert len(set(pd.concat(tuned)["seed"])) == 3 * 8  # every image of every seed is its own
    for metric in METRICS:
        per_seed = [float(f[metric].mean()) for f in tuned]
        entry = summary["metrics"][metric]
        assert entry["per_run"] == pytest.approx(per_seed, rel=1e-12)
        assert entry["mean"] == pytest.approx(np.mean(per_seed), rel=1e-12)
        assert entry["sd"] == pytest.approx(np.std(per_seed, ddof=1), rel=1e-9) and entry["sd"] > 0
        assert entry["by"]["seed"]["means"] == pytest.approx({str(s): v for s, v in zip([0, 1, 2], per_seed)}, rel=1e-12)
        assert entry["by"]["seed"]["sd"] == pytest.approx(entry["sd"], rel=1e-12)

        pooled = summary["pooled"]["metrics"][metric]
        assert pooled["mean"] == pytest.approx(pd.concat(tuned)[metric].mean(), rel=1e-12)
        assert pooled["ci"][0] <= pooled["mean"] <= pooled["ci"][1]
        assert summary["pooled"]["n_images"] == 24 and summary["pooled"]["n_prompts"] == 4

        wins = [winrate(t, b, metric) for t, b in zip(tuned, base)]
        assert summary["winrate"][metric]["per_run"] == pytest.approx(wins, abs=1e-12)
        assert summary["winrate"][metric]["value"] == pytest.approx(np.mean(wins), abs=1e-12)
        assert summary["winrate"][metric]["sd"] == pytest.approx(np.std(wins, ddof=1), abs=1e-12)
        assert summary["pooled"]["winrate"][metric]["value"] == pytest.approx(winrate(pd.concat(tuned), pd.concat(base), metric), abs=1e-12)
        assert f"| {metric} " in stdout and f"| {_fmt(entry['mean'])} " in stdout and f"| {_fmt(entry['sd'])} " in stdout

    base_summary = read(sweep_dir(out, "base") / "summary.json")  # the base model's own sweep, the tuned one's baseline
    assert summary["pooled"]["winrate"]["brightness"]["baseline"] == sweep_dir(out, "base").name
    assert base_summary["winrate"] == {} and base_summary["metrics"]["brightness"]["per_run"] == pytest.approx([float(b["brightness"].mean()) for b in base], rel=1e-12)


@pytest.mark.slow  # a second sweep (about 25 s); tests/test_end_to_end.py checks a cached rerun by default
def test_a_second_identical_call_generates_nothing_and_rewrites_the_same_bytes(seeds_run, cache):
    out, stdout = seeds_run
    files = sorted(p for p in out.rglob("*") if p.name in ("summary.json", "table.md", "scores.parquet"))
    before = {p: p.read_bytes() for p in files}
    code, again = bench("run", *SFT, "seeds=[2, 0, 1]", f"cache_dir={cache}", f"out={out}")  # the other list form, another order: the same sweep
    assert code == 0 and again == stdout
    assert {p: p.read_bytes() for p in files} == before and sorted(p for p in out.rglob("*") if p.name in ("summary.json", "table.md", "scores.parquet")) == files
    sweep = read(sweep_dir(out, "sft") / "manifest.json")
    members = sweep["sweep"]["runs"] + sweep["sweep"]["baselines"]
    assert len(members) == 6
    assert [read(out / run / "manifest.json")["timings"]["generated"] for run in members] == [0] * 6
    assert [read(out / run / "manifest.json")["timings"]["cached"] for run in members] == [8] * 6
    assert sweep["timings"]["generated"] == 0 and sweep["timings"]["cached"] == 24

    code, evaluated = bench("eval", "suite=smoke", "suite.limit=4", "seeds=0,1,2", f"cache_dir={cache}", f"out={out}")  # `bench eval` makes the run's base sweep
    assert code == 0 and (sweep_dir(out, "base") / "table.md").read_text(encoding="utf-8") in evaluated + "\n"
    assert {p: p.read_bytes() for p in files} == before


@pytest.mark.slow  # four trainings (about 50 s); the default run trains a seed sweep once in seeds_run
def test_method_seed_trains_once_per_value_alone_and_in_a_grid_with_seeds(seeds_run, cache, tmp_path):
    out, _ = seeds_run
    trained_before = checkpoints(cache)
    grid_out = tmp_path / "grid"
    code, stdout = bench("run", *SFT, "seeds=0,1", "method.seed=0,1", f"cache_dir={cache}", f"out={grid_out}")
    assert code == 0
    assert len(checkpoints(cache)) == 2 and set(trained_before) < set(checkpoints(cache))  # training seed 0 is the seeds sweep's, 1 is new
    grid = read(sweep_dir(grid_out, "sft") / "summary.json")
    assert grid["axes"] == {"seed": [0, 1], "train_seed": [0, 1]}
    assert [(r["train_seed"], r["seed"]) for r in grid["runs"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    manifests = [read(grid_out / r["run"] / "manifest.json") for r in grid["runs"]]
    assert [(m["config"]["train"]["seed"], m["config"]["method"]["seed"], m["seeds"]["base_seed"]) for m in manifests] == [(0, 0, 0), (0, 0, 1), (1, 1, 0), (1, 1, 1)]
    ids = [m["checkpoint"]["train_id"] for m in manifests]
    assert ids[0] == ids[1] != ids[2] == ids[3]
    assert ids[0] == read(out / read(sweep_dir(out, "sft") / "summary.json")["runs"][0]["run"] / "manifest.json")["checkpoint"]["train_id"]
    means = np.array([pd.read_parquet(grid_out / r["run"] / "scores.parquet")["brightness"].mean() for r in grid["runs"]]).reshape(2, 2)  # [train seed, seed]
    entry = grid["metrics"]["brightness"]
    assert entry["by"]["train_seed"]["means"] == pytest.approx({"0": means[0].mean(), "1": means[1].mean()}, rel=1e-12)
    assert entry["by"]["train_seed"]["sd"] == pytest.approx(np.std(means.mean(axis=1), ddof=1), rel=1e-9)
    assert entry["by"]["seed"]["sd"] == pytest.approx(np.std(means.mean(axis=0), ddof=1), rel=1e-9)
    assert entry["sd"] == pytest.approx(np.std(means, ddof=1), rel=1e-9)
    assert "sd across training seeds" in stdout and "sd across seeds" in stdout

    alone_out = tmp_path / "alone"
    code, stdout = bench("run", *SFT, "method.seed=0,1", f"cache_dir={cache}", f"out={alone_out}")  # every training cached: no new checkpoint
    assert code == 0 and len(checkpoints(cache)) == 2
    alone = read(sweep_dir(alone_out, "sft") / "summary.json")
    assert alone["axes"] == {"train_seed": [0, 1]} and not list(alone_out.glob("smoke-tiny-base-seeds-*"))  # one base seed: no base sweep
    per_training = [pd.read_parquet(alone_out / r["run"] / "scores.parquet")["brightness"].mean() for r in alone["runs"]]
    assert per_training == pytest.approx(means[:, 0], rel=1e-12)  # the grid's seed-0 runs
    sd = alone["metrics"]["brightness"]["sd"]
    assert sd == pytest.approx(np.std(per_training, ddof=1), rel=1e-9) and sd > 0  # the training's variance, visible
    assert {r["baseline"] for r in alone["runs"]} == {alone["pooled"]["winrate"]["brightness"]["baseline"]}


def _error_lines(err: str) -> list[str]:
    return [line for line in err.strip().splitlines() if line.strip() and not re.match(r"^(DEBUG|INFO|WARNING) ", line)]


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", *SFT, "seeds=0,x"], "seeds=0,x is not a list of seeds: give non-negative integers, e.g. seeds=0,1,2 or seeds=[0,1,2]"),
        (["run", *SFT, "seeds="], "seeds= is not a list of seeds: give non-negative integers, e.g. seeds=0,1,2 or seeds=[0,1,2]"),
        (["eval", "seeds=[0,1"], "seeds=[0,1 is not a list of seeds: give non-negative integers, e.g. seeds=0,1,2 or seeds=[0,1,2]"),
        (["run", *SFT, "seeds=1,1"], "seeds=1,1 repeats a seed: give each seed once, e.g. seeds=0,1,2"),
        (["run", *SFT, "method.seed=0,-1"], "method.seed=0,-1 is not a list of seeds: give non-negative integers, e.g. method.seed=0,1,2 or method.seed=[0,1,2]"),
        (["run", *SFT, "seeds=0,1", "seed=3"], "give the base seeds once: seeds=0,1,2 or seed=N, not both"),
        (["run", *SFT, "method.seed=0,1", "train.seed=3"], "method.seed=0,1,2 sets train.seed to each value too: drop train.seed="),
        (["eval", "method=sft", "method.seed=0,1"], "`bench eval` trains nothing: method.seed=0,1,2 sweeps training seeds in `bench run`"),
        (["eval", "seeds=0,1", "gen.shard=0/2"], "gen.shard generates one base seed's images: run each shard with seed=N, not seeds="),
    ],
)
def test_a_bad_seed_list_is_one_line_and_exit_2(cli, tmp_path, args, message):
    code, out, err = cli(*args)
    assert code == 2 and _error_lines(err) == [f"bench: error: {message}"] and out == ""
    assert not (tmp_path / "runs").exists()


def test_the_leaderboard_shows_each_sweep_as_one_row_of_mean_and_sd(cli, seeds_run):
    out, _ = seeds_run
    code, text, err = cli("leaderboard", f"out={out}")
    assert code == 0, err
    rows = list(csv.DictReader(io.StringIO((out / "leaderboard.csv").read_text(encoding="utf-8"))))
    assert [r["run_id"] for r in rows] == [sweep_dir(out, "base").name, sweep_dir(out, "sft").name]  # none of the six runs
    assert [r["seeds"] for r in rows] == ["seeds 0, 1, 2"] * 2
    summary = read(sweep_dir(out, "sft") / "summary.json")
    for metric in METRICS:
        entry, win = summary["metrics"][metric], summary["winrate"][metric]
        assert float(rows[1][metric]) == entry["mean"] and float(rows[1][f"{metric} sd"]) == entry["sd"]
        assert float(rows[1][f"{metric} win"]) == win["value"] and float(rows[1][f"{metric} win sd"]) == win["sd"]
        assert f"| {_fmt(entry['mean'])} ± {_fmt(entry['sd'])} " in text
