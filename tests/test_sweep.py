"""`bench sweep`: the grid, its cells' markers, the submitit executors, a killed job and the re-run.

The end-to-end tests run evaluation cells of the embedded models on 2 prompts (a cell's process costs
its imports, ~10 s of CPU); the training grid (sft, dspo x 2 seeds) is marked slow.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.errors import UsageError
from bench.sweep import Cell, Launcher, executor_parameters, is_done, marker, parse

REPO = Path(__file__).resolve().parents[1]
CHEAP = ["suite=smoke", "suite.limit=2", "stats.n_boot=20", "stats.n_permutations=20", "report.html=false"]


# ---- the grid (pure) -----------------------------------------------------------------------------
def test_grid_expands_in_a_stable_order_with_names_and_ids(tmp_path):
    grid = parse(["method=sft,dspo", "suite=smoke,parti", "seeds=1,0", "train.steps=2", f"out={tmp_path}/grid"])
    assert [c.name for c in grid.cells] == [
        "method=sft suite=smoke seed=0", "method=sft suite=smoke seed=1", "method=sft suite=parti seed=0", "method=sft suite=parti seed=1",
        "method=dspo suite=smoke seed=0", "method=dspo suite=smoke seed=1", "method=dspo suite=parti seed=0", "method=dspo suite=parti seed=1",
    ]
    first = grid.cells[0]
    assert first.args == ("method=sft", "suite=smoke", "seed=0", "train.steps=2", f"out={tmp_path / 'grid'}")
    assert first.train and grid.out == tmp_path / "grid" and grid.folder == tmp_path / "grid" / ".sweep"
    assert len({c.id for c in grid.cells}) == 8
    # the id: the cell's arguments, not where its results go (a relative out= is made absolute)
    again = parse(["suite=smoke,parti", "method=sft,dspo", "seeds=0,1", "train.steps=2", "out=elsewhere", "cache_dir=c"])
    assert [c.id for c in again.cells] == [c.id for c in grid.cells]
    assert f"out={Path('elsewhere').resolve()}" in again.cells[0].args and f"cache_dir={Path('c').resolve()}" in again.cells[0].args
    assert parse(["method=sft", "seeds=0,1", "train.steps=3"]).cells[0].id != parse(["method=sft", "seeds=0,1", "train.steps=2"]).cells[0].id
    # no method: evaluation cells; no list: one cell; the default launcher is local
    evals = parse(["model=tiny,tiny-fewstep"])
    assert [c.name for c in evals.cells] == ["model=tiny", "model=tiny-fewstep"] and not evals.cells[0].train
    assert evals.launcher == Launcher("local", {}) and evals.launcher.retries == 1 and evals.out == Path("runs").resolve()
    assert [c.name for c in parse(["seed=3"]).cells] == ["(one cell)"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["seeds=0,1", "seed=2"], "seeds=0,1,2 or seed=N"),
        (["method=sft,sft"], "repeats a value"),
        (["method=sft,"], "empty value"),
        (["method=sft", "method=dspo"], "give method= once"),
        (["seeds=0,x"], "not a list of seeds"),
        (["protocol=pso-table1", "method=sft"], "its own grid"),
        (["method=sft", "method.seed=0,1"], "one training seed per cell"),
        (["launcher=ray"], "use one of local, slurm, inline"),
        (["launcher.gpus=2"], "unknown launcher.gpus"),
        (["launcher.time=soon"], "expected an integer"),
        (["launcher.time=0"], "positive"),
        (["train.steps"], "malformed override"),
    ],
)
def test_grid_refuses_in_one_line(args, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(".", r"\.")):
        parse(args)


def test_executor_parameters():
    slurm = Launcher("slurm", {"partition": "gpu", "time": 240, "gpus_per_job": 8, "cpus_per_task": 16, "mem_gb": 64, "array_parallelism": 4, "account": "lab"})
    assert executor_parameters(slurm) == {
        "timeout_min": 240, "name": "bench-sweep", "nodes": 1, "tasks_per_node": 1, "slurm_array_parallelism": 4,
        "gpus_per_node": 8, "cpus_per_task": 16, "mem_gb": 64, "slurm_partition": "gpu", "slurm_account": "lab",
    }
    assert executor_parameters(Launcher("local", {"gpus_per_job": 0})) == {"timeout_min": 1440, "name": "bench-sweep", "gpus_per_node": 0}


def test_slurm_executor_writes_the_job_array_script(tmp_path, monkeypatch):
    from bench.sweep import make_executor

    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(UsageError, match="needs SLURM's sbatch and srun on PATH"):
        make_executor(Launcher("slurm"), tmp_path / ".sweep")
    (tmp_path / "bin").mkdir()
    for name in ("sbatch", "srun"):  # stand-ins: submitit only looks them up here
        (tmp_path / "bin" / name).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / "bin" / name).chmod(0o755)
    executor = make_executor(Launcher("slurm", {"partition": "gpu", "time": 240, "gpus_per_job": 1, "array_parallelism": 3}), tmp_path / ".sweep")
    script = executor._executor._make_submission_file_text("python -m cell", "uid")
    for line in ("--partition=gpu", "--time=240", "--gpus-per-node=1", "--job-name=bench-sweep", f"--output={tmp_path}/.sweep/jobs/%j/"):
        assert f"#SBATCH {line}" in script
    assert executor._executor.parameters["array_parallelism"] == 3


def test_a_cell_is_done_when_its_marker_names_finished_runs(tmp_path):
    cell = Cell(("model=tiny",), "model=tiny", False)
    folder = tmp_path / ".sweep"
    assert not is_done(folder, cell)
    run = tmp_path / "micro-tiny-base-0000"
    run.mkdir()
    marker(folder, cell).parent.mkdir(parents=True)
    marker(folder, cell).write_text(json.dumps({"run_dirs": [str(run)]}))
    assert not is_done(folder, cell)  # the run folder lost its summary
    (run / "summary.json").write_text("{}")
    assert is_done(folder, cell)
    marker(folder, cell).write_text("{not json")
    assert not is_done(folder, cell)


def test_cli_checks_every_cell_before_any_job(cli, tmp_path):
    code, out, err = cli("sweep", "method=sft,nosuch", "seeds=0,1", f"out={tmp_path / 'grid'}")
    assert code == 2 and "bench: error: cell method=nosuch seed=0:" in err and "Traceback" not in err
    assert not (tmp_path / "grid" / ".sweep").exists()
    code, out, err = cli("sweep", "--help")
    assert code == 0 and "launcher.partition" in out and "launcher.retries" in out


# ---- in this process ---------------------------------------------------------------------------
def test_inline_sweep_skips_done_cells_and_reruns_a_lost_one(cli, cache_dir, tmp_path):
    out = tmp_path / "grid"
    args = ("sweep", "seeds=0,1", *CHEAP, "launcher=inline", f"cache_dir={cache_dir}", f"out={out}")
    code, stdout, err = cli(*args)
    assert code == 0, err
    assert "2 cells done (2 run now, 0 done already)" in stdout and (out / "leaderboard.csv").is_file()
    code, stdout, err = cli(*args)
    assert code == 0 and "2 cells done (0 run now, 2 done already)" in stdout
    lost = json.loads(sorted((out / ".sweep" / "cells").glob("*.json"))[0].read_text())["run_dirs"][0]
    (Path(lost) / "summary.json").unlink()
    code, stdout, err = cli(*args)
    assert code == 0 and "2 cells done (1 run now, 1 done already)" in stdout and (Path(lost) / "summary.json").is_file()


# ---- submitit's local executor -----------------------------------------------------------------
def attempts(out: Path) -> list[dict]:
    path = out / ".sweep" / "attempts.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def start_sweep(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "BENCH_PROGRESS_EVERY": "1"}
    return subprocess.Popen([sys.executable, "-m", "bench", "sweep", *args], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def kill_when_started(proc: subprocess.Popen, out: Path, name: str, timeout: float = 120) -> int:
    """SIGKILL the process that runs cell ``name`` as soon as it has started (its job is importing or computing)."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        started = [a for a in attempts(out) if a["name"] == name and a["event"] == "start"]
        if started:
            os.kill(started[0]["pid"], signal.SIGKILL)
            return started[0]["pid"]
        time.sleep(0.05)
    raise AssertionError(f"cell {name} never started: {proc.communicate()}")


def leaderboard_rows(out: Path) -> list[dict]:
    with open(out / "leaderboard.csv", newline="") as f:
        return list(csv.DictReader(f))


def finished(out: Path) -> dict[str, float]:
    """Each done cell's summary.json and its modification time."""
    times = {}
    for path in (out / ".sweep" / "cells").glob("*.json"):
        for run in json.loads(path.read_text())["run_dirs"]:
            times[str(Path(run) / "summary.json")] = (Path(run) / "summary.json").stat().st_mtime_ns
    return times


@pytest.mark.slow  # a minute: 5 job processes; test_inline_sweep_skips_done_cells_and_reruns_a_lost_one covers the skip and re-run logic
def test_local_sweep_a_killed_job_then_a_rerun_completes_the_grid(cache_dir, tmp_path):
    """2 models x 2 seeds through submitit's LocalExecutor: one job is killed, the sweep fails naming that
    cell, the re-run runs only it, the leaderboard has every run, and no cell is computed twice."""
    out = tmp_path / "grid"
    args = ["model=tiny,tiny-fewstep", "seeds=0,1", *CHEAP, f"cache_dir={cache_dir}", f"out={out}", "launcher=local", "launcher.retries=0", "launcher.poll=0.2"]
    victim = "suite=smoke model=tiny-fewstep seed=1"
    proc = start_sweep(args)
    killed = kill_when_started(proc, out, victim)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 1, stderr
    assert f"{victim}: job" in stderr and "ended without a result" in stderr
    assert "bench: error: 1 of 4 cells failed (3 done): fix the cause and re-run the same command" in stderr
    assert not (out / "leaderboard.csv").exists()
    before = finished(out)
    assert len(before) == 3

    proc = start_sweep(args)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    assert "4 cells, 3 done already, 1 to run" in stderr and "4 cells done (1 run now, 3 done already)" in stdout
    rows = leaderboard_rows(out)
    assert sorted((r["model"], r["method"]) for r in rows) == [("tiny", "base")] * 2 + [("tiny-fewstep", "base")] * 2
    after = finished(out)
    assert len(after) == 4 and {k: after[k] for k in before} == before  # the done cells' results untouched
    log = attempts(out)
    done = [a["name"] for a in log if a["event"] == "done"]
    assert sorted(done) == sorted(set(done)) and len(done) == 4  # each cell finished exactly once
    starts = [a for a in log if a["event"] == "start"]
    assert sorted(a["name"] for a in starts).count(victim) == 2 and len(starts) == 5
    assert next(a for a in starts if a["name"] == victim)["pid"] == killed


@pytest.mark.slow
def test_local_training_sweep_resubmits_a_killed_job(cache_dir, tmp_path):
    """sft, dspo x 2 seeds, trained: a killed job is re-submitted by the sweep itself (launcher.retries=1),
    the grid completes in one command, and a re-run starts no job."""
    out = tmp_path / "grid"
    args = ["method=sft,dspo", "seeds=0,1", *CHEAP, "train.steps=2", "train.batch_size=2", "method.samples_per_prompt=2",
            f"cache_dir={cache_dir}", f"out={out}", "launcher.retries=1", "launcher.poll=0.2"]
    proc = start_sweep(args)
    kill_when_started(proc, out, "method=dspo suite=smoke seed=1")
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert "re-submitting (1 of 1)" in stderr and "4 cells done (4 run now, 0 done already)" in stdout
    rows = leaderboard_rows(out)
    assert sorted(r["method"] for r in rows) == ["base", "base", "dspo", "dspo", "sft", "sft"]
    proc = start_sweep(args)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0 and "4 cells, 4 done already, 0 to run" in stderr
    done = [a["name"] for a in attempts(out) if a["event"] == "done"]
    assert len(done) == 4 == len(set(done))
