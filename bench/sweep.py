"""``bench sweep``: a grid of ``bench run`` cells, each one job (submitit: SLURM job arrays, or local
processes), followed to the end, then one leaderboard over ``out``.

``bench sweep method=a,b suite=x,y [model=m,n] seeds=0,1 [launcher=local|slurm|inline] [launcher.KEY=VALUE ...]
[key=value ...]`` expands the comma lists of ``method``, ``suite``, ``model`` and ``seeds`` (in that
order, values as typed, seeds sorted) into cells; every other ``key=value`` goes to each cell unchanged.
A cell is one ``bench run`` (``bench eval`` when no ``method=`` is given) with ``seed=N`` for each
value of ``seeds=``: in a sweep every base seed is its own cell and job (in ``bench run``, ``seeds=`` is
a seed sweep inside one process).

A cell is done when its marker ``out/.sweep/cells/<cell id>.json`` (written atomically by the job,
only on success) names run folders that hold ``summary.json``; the cell id hashes the cell's
arguments (``out=`` and ``cache_dir=`` aside: where results go, not what they are). A re-run of the
same command skips the done cells without starting a job, so a killed job or an interrupted sweep
costs only its unfinished cells (and these resume from their cached images and checkpoints).

Every attempt of a cell appends ``start`` and ``done`` (or ``error``) lines to
``out/.sweep/attempts.jsonl`` (cell, pid, host, job id, time): the record of what was computed where.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import submitit

from bench.errors import BenchError, UsageError

log = logging.getLogger(__name__)

AXES = ("method", "suite", "model", "seeds")  # the keys that take comma lists, in the grid's nesting order
LAUNCHERS = ("local", "slurm", "inline")
# launcher.KEY -> (type, meaning); the defaults are in Launcher
LAUNCHER_KEYS = {
    "partition": (str, "SLURM partition"),
    "time": (int, "minutes a job may run (SLURM --time; the local executor's timeout), default 1440"),
    "gpus_per_job": (int, "GPUs each job reserves (SLURM --gpus-per-node; local: default every visible GPU); a cell runs in one process"),
    "cpus_per_task": (int, "CPUs of each job (SLURM --cpus-per-task)"),
    "mem_gb": (int, "memory of each job in GB (SLURM --mem)"),
    "array_parallelism": (int, "jobs of the array that run at once (SLURM --array=...%N), default 64"),
    "account": (str, "SLURM --account"),
    "qos": (str, "SLURM --qos"),
    "constraint": (str, "SLURM --constraint"),
    "retries": (int, "re-submissions of a job that was killed, pre-empted or crashed (not of a cell that failed with a bench error), default 1"),
    "poll": (float, "seconds between looks at the jobs' states, default 5 (local: 1)"),
}
SWEEP_DIR = ".sweep"
UNHASHED = ("out", "cache_dir")  # where a cell's results go, not what they are


@dataclass(frozen=True)
class Cell:
    """One grid point: the arguments of its ``bench run`` (or ``bench eval``) and its name."""

    args: tuple[str, ...]
    name: str
    train: bool

    @property
    def id(self) -> str:
        from bench.config import stable_hash

        return stable_hash([a for a in self.args if a.partition("=")[0] not in UNHASHED])[:12]


@dataclass
class Launcher:
    kind: str = "local"
    options: dict = field(default_factory=dict)  # launcher.KEY given on the command line, typed

    @property
    def retries(self) -> int:
        return int(self.options.get("retries", 1))

    @property
    def poll(self) -> float:
        return float(self.options.get("poll", 1.0 if self.kind == "local" else 5.0))


@dataclass
class Grid:
    cells: list[Cell]
    launcher: Launcher
    out: Path

    @property
    def folder(self) -> Path:
        return self.out / SWEEP_DIR


# --------------------------------------------------------------------------- the command line


def parse(args: list[str]) -> Grid:
    """The grid of ``bench sweep``'s arguments: its cells in a stable order, the launcher and ``out``."""
    from bench.config import parse_overrides
    from bench.seeds import parse_seeds

    axes: dict[str, list[str]] = {}
    launcher = Launcher()
    rest: list[str] = []
    out = "runs"
    for (key, value), arg in zip(parse_overrides(args), args):
        if key in AXES:
            if key in axes:
                raise UsageError(f"give {key}= once, as a comma list: {key}=a,b")
            if key == "seeds":
                axes[key] = [str(s) for s in parse_seeds(key, value)]
            else:
                values = [v.strip() for v in value.split(",")]
                if not all(values):
                    raise UsageError(f"{key}={value} has an empty value: give {key}=a,b")
                if len(set(values)) != len(values):
                    raise UsageError(f"{key}={value} repeats a value: give each once")
                axes[key] = values
        elif key == "launcher":
            if value not in LAUNCHERS:
                raise UsageError(f"launcher={value}: use one of {', '.join(LAUNCHERS)}")
            launcher.kind = value
        elif key.startswith("launcher."):
            launcher.options[key.split(".", 1)[1]] = launcher_value(key, value)
        elif key == "protocol":
            raise UsageError("a protocol is its own grid: run `bench run protocol=NAME method=M`; a sweep takes method=, suite=, model= and seeds= lists")
        elif key == "method.seed" and ("," in value or value.strip().startswith("[")):
            raise UsageError("bench sweep takes one training seed per cell (method.seed=N); give the base seeds as seeds=0,1")
        elif key == "gen.shard":
            raise UsageError("gen.shard splits one `bench eval` by hand; a sweep's cells are whole runs")
        else:
            if key == "out":
                out = value
            rest.append(arg)
    keys = {a.partition("=")[0] for a in rest}
    if "seeds" in axes and "seed" in keys:
        raise UsageError("give the base seeds once: seeds=0,1,2 or seed=N, not both")
    out_path = Path(out).expanduser().resolve()
    rest = [f"out={out_path}" if a.startswith("out=") else a for a in rest]
    if "out" not in keys:
        rest.append(f"out={out_path}")
    rest = [f"cache_dir={Path(a.split('=', 1)[1]).expanduser().resolve()}" if a.startswith("cache_dir=") and a != "cache_dir=" else a for a in rest]
    return Grid(expand(axes, rest), launcher, out_path)


def launcher_value(key: str, value: str):
    name = key.split(".", 1)[1]
    if name not in LAUNCHER_KEYS:
        raise UsageError(f"unknown {key}: the launcher takes {', '.join('launcher.' + k for k in LAUNCHER_KEYS)}")
    kind = LAUNCHER_KEYS[name][0]
    try:
        typed = kind(value)
    except ValueError:
        raise UsageError(f"{key}={value}: expected {'an integer' if kind is int else 'a number'}") from None
    if kind in (int, float) and typed < 0 or name in ("time", "array_parallelism", "poll") and typed == 0:
        raise UsageError(f"{key}={value}: expected a {'positive' if name in ('time', 'array_parallelism', 'poll') else 'non-negative'} number")
    return typed


def expand(axes: dict[str, list[str]], rest: list[str]) -> list[Cell]:
    """Every combination of the axes' values, method outermost and seed innermost; a cell's name is its
    axis values (``method=a suite=x seed=0``), its arguments those plus ``rest``."""
    combos: list[list[str]] = [[]]
    for key in AXES:
        if key in axes:
            arg = "seed" if key == "seeds" else key
            combos = [[*c, f"{arg}={v}"] for c in combos for v in axes[key]]
    train = "method" in axes or any(a.startswith("method=") for a in rest)
    return [Cell((*c, *rest), " ".join(c) or "(one cell)", train) for c in combos]


# --------------------------------------------------------------------------- a cell, in its job


def marker(folder: Path, cell: Cell) -> Path:
    return Path(folder) / "cells" / f"{cell.id}.json"


def is_done(folder: Path, cell: Cell) -> bool:
    """The cell's marker is there and each run folder it names holds its summary.json."""
    path = marker(folder, cell)
    if not path.is_file():
        return False
    try:
        dirs = json.loads(path.read_text())["run_dirs"]
    except (ValueError, KeyError, TypeError):
        return False
    return bool(dirs) and all((Path(d) / "summary.json").is_file() for d in dirs)


def attempt_outcome(folder: Path, cell: Cell) -> tuple[str, str]:
    """How the cell's last attempt ended, from its marker and ``attempts.jsonl`` (JSON this sweep wrote;
    a job's result travels as a pickle, which the sweep never loads): ("done", ""), ("error", the bench
    error's line), or ("lost", "") when it ended with neither (killed, pre-empted, crashed)."""
    if is_done(folder, cell):
        return "done", ""
    path = Path(folder) / "attempts.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    events = [json.loads(line) for line in lines if line.strip()]
    last = next((e for e in reversed(events) if e.get("cell") == cell.id), None)
    if last is not None and last["event"] == "error":
        return "error", str(last.get("error", ""))
    return "lost", ""


def record(folder: Path, cell: Cell, event: str, **extra) -> None:
    """One line of ``attempts.jsonl`` (appended: a short write lands whole)."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID')}"
    job = job or os.environ.get("SLURM_JOB_ID") or os.environ.get("SUBMITIT_LOCAL_JOB_ID")
    line = {"cell": cell.id, "name": cell.name, "event": event, "pid": os.getpid(), "host": socket.gethostname(), "job": job, "time": time.time(), **extra}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "attempts.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(line) + "\n")


def run_cell(cell: Cell, folder) -> dict:
    """Run one cell in this process, as `bench run` (or `bench eval`) would, and write its marker on
    success. A bench error (a bad value, missing data) is the cell's result, {"ok": False}: re-running
    it would fail the same way; anything else (a crash, a kill) leaves no marker and no result."""
    folder = Path(folder)
    if not logging.getLogger().handlers:  # a fresh job process: its log is the job's stderr
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    record(folder, cell, "start")
    start = time.time()
    from bench.config import compose
    from bench.io import write_json
    from bench.runner import evaluate, run

    try:
        cfg = compose(list(cell.args), require=("method",) if cell.train else ())
        if cell.train:
            base, tuned = run(cfg)
            dirs = [base.run_dir, tuned.run_dir]
        else:
            dirs = [evaluate(cfg).run_dir]
    except BenchError as err:
        record(folder, cell, "error", error=str(err))
        return {"ok": False, "error": str(err)}
    seconds = time.time() - start
    dirs = [str(Path(d).resolve()) for d in dirs]
    write_json(marker(folder, cell), {"cell": cell.id, "name": cell.name, "args": list(cell.args), "run_dirs": dirs, "seconds": round(seconds, 3)})
    record(folder, cell, "done", seconds=round(seconds, 3), run_dirs=dirs)
    return {"ok": True, "run_dirs": dirs}


class CellJob(submitit.helpers.Checkpointable):
    """A cell as a submitit job. Checkpointable: when SLURM pre-empts or times out the job, submitit
    requeues it with the same arguments, and the cell resumes from its cached stages."""

    def __call__(self, cell: Cell, folder: str) -> dict:
        return run_cell(cell, folder)


# --------------------------------------------------------------------------- executors


def executor_parameters(launcher: Launcher) -> dict:
    """submitit's parameters for the launcher's options (``AutoExecutor.update_parameters``)."""
    o = launcher.options
    params = {"timeout_min": int(o.get("time", 24 * 60)), "name": "bench-sweep"}
    if launcher.kind == "local":
        gpus = o.get("gpus_per_job")
        params["gpus_per_node"] = visible_gpus() if gpus is None else gpus  # the local executor hides every GPU it is not given
        return params
    params |= {"nodes": 1, "tasks_per_node": 1, "slurm_array_parallelism": int(o.get("array_parallelism", 64))}
    for key, name in (("gpus_per_job", "gpus_per_node"), ("cpus_per_task", "cpus_per_task"), ("mem_gb", "mem_gb"),
                      ("partition", "slurm_partition"), ("account", "slurm_account"), ("qos", "slurm_qos"), ("constraint", "slurm_constraint")):
        if key in o:
            params[name] = o[key]
    return params


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def make_executor(launcher: Launcher, folder: Path):
    folder = folder / "jobs" / "%j"
    params = executor_parameters(launcher)
    if launcher.kind == "local":
        params.pop("name")
        executor = submitit.LocalExecutor(folder=folder)
    else:
        missing = [c for c in ("sbatch", "srun") if shutil.which(c) is None]
        if missing:
            raise UsageError(f"launcher=slurm needs SLURM's {' and '.join(missing)} on PATH: run `bench sweep` on the cluster's login node "
                             "(launcher=local runs the cells on this machine)")
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(**params)
    return executor


# --------------------------------------------------------------------------- the sweep


@dataclass
class Outcome:
    cells: list[Cell]
    skipped: list[Cell]
    ran: list[Cell]
    failed: dict[str, str]  # cell name -> why
    leaderboard: Path | None = None


def sweep(args: list[str]) -> Outcome:
    """Check every cell, skip the done ones, run the others through the launcher, follow them, and
    write the leaderboard when every cell is done."""
    from bench import report
    from bench.config import compose

    grid = parse(args)
    for cell in grid.cells:  # a typo fails here, in one line, before any job starts
        try:
            compose(list(cell.args), require=("method",) if cell.train else ())
        except BenchError as err:
            raise type(err)(f"cell {cell.name}: {err}") from None
    todo = [c for c in grid.cells if not is_done(grid.folder, c)]
    skipped = [c for c in grid.cells if c not in todo]
    print(f"sweep: {len(grid.cells)} cells, {len(skipped)} done already, {len(todo)} to run (launcher={grid.launcher.kind}); "
          f"jobs and markers in {grid.folder}", file=sys.stderr)
    failed: dict[str, str] = {}
    if todo:
        failed = (run_inline if grid.launcher.kind == "inline" else follow)(grid, todo)
    outcome = Outcome(grid.cells, skipped, [c for c in todo if c.name not in failed], failed)
    if not failed:
        outcome.leaderboard, _, _ = report.leaderboard(grid.out)
    return outcome


def run_inline(grid: Grid, todo: list[Cell]) -> dict[str, str]:
    """launcher=inline: the cells one after another in this process (debugging, tests)."""
    failed = {}
    for i, cell in enumerate(todo):
        log.info("sweep: cell %d/%d: %s", i + 1, len(todo), cell.name)
        result = run_cell(cell, grid.folder)
        if not result["ok"]:
            failed[cell.name] = result["error"]
    return failed


def follow(grid: Grid, todo: list[Cell]) -> dict[str, str]:
    """Submit the cells as one job array, poll the jobs, re-submit those that died without a result
    (killed, pre-empted past submitit's requeue, crashed) up to ``launcher.retries`` times, and return
    the cells that failed with why."""
    from bench.io import progress

    executor = make_executor(grid.launcher, grid.folder)
    jobs = executor.map_array(CellJob(), todo, [str(grid.folder)] * len(todo))
    running = {c.id: (c, job, 0) for c, job in zip(todo, jobs)}
    log.info("sweep: submitted %d jobs (%s)", len(jobs), ", ".join(j.job_id for j in jobs[:4]) + (" ..." if len(jobs) > 4 else ""))
    failed: dict[str, str] = {}
    bar = progress(total=len(todo), desc="sweep", unit="cell")
    try:
        while running:
            for cid, (cell, job, tries) in list(running.items()):
                if not job.done():
                    continue
                del running[cid]
                state, message = attempt_outcome(grid.folder, cell)  # never job.result(): submitit pickles it
                if state == "lost":  # killed, pre-empted, crashed: no marker and no error of its own
                    why = f"job state {job.state}"
                    if tries < grid.launcher.retries:
                        log.warning("sweep: cell %s: job %s ended without a result (%s); re-submitting (%d of %d)",
                                    cell.name, job.job_id, why, tries + 1, grid.launcher.retries)
                        running[cid] = (cell, executor.submit(CellJob(), cell, str(grid.folder)), tries + 1)
                        continue
                    failed[cell.name] = f"job {job.job_id} ended without a result ({why}); log: {job.paths.stderr}"
                elif state == "error":
                    failed[cell.name] = message
                if cell.name in failed:
                    log.warning("sweep: cell %s failed: %s", cell.name, failed[cell.name])
                else:
                    log.info("sweep: cell %s done", cell.name)
                bar.update(1)
                bar.set_postfix_str(f"running {len(running)}, failed {len(failed)}")
            if running:
                time.sleep(grid.launcher.poll)
    except KeyboardInterrupt:
        for _, job, _ in running.values():
            job.cancel(check=False)
        log.warning("sweep: cancelled %d unfinished jobs; a re-run of the same command skips the done cells", len(running))
        raise
    finally:
        bar.close()
    return failed
