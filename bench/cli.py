"""``bench``: run, eval, sweep, train, ls, leaderboard, report, check, perf, prefetch, plan.

Arguments are ``key=value`` overrides (``suite=smoke method=sft train.steps=50``).
Every user-facing failure prints one line ``bench: error: ...`` and exits
non-zero; tracebacks are kept for genuine bugs (or set BENCH_DEBUG=1).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path

from bench.errors import BenchError, UsageError

COMMANDS_HELP = {  # command -> (synopsis, what it does); `bench COMMAND --help` prints both
    "run": ("bench run suite=S method=M [model=X] [key=value ...]", "train a method (or reuse its checkpoint), generate, score, compare with the base model"),
    "eval": ("bench eval suite=S model=X [key=value ...]", "evaluate a model without training"),
    "sweep": ("bench sweep method=a,b suite=x,y [model=m,n] [seeds=0,1] [launcher=local|slurm|inline] [launcher.KEY=VALUE ...] [key=value ...]",
              "a grid of runs, one job per cell (submitit: SLURM job arrays or local processes); skips done cells, re-submits killed jobs, writes the leaderboard"),
    "train": ("bench train method=M [data=D] [key=value ...]", "train a method only and print the checkpoint folder"),
    "ls": ("bench ls [methods|suites|models|metrics|datasets|protocols] [suite=FILE] [method=FILE]",
           "list registered methods | suites | models | metrics | datasets | protocols, and suites or methods given by path (checked)"),
    "leaderboard": ("bench leaderboard [out=runs] [dest=DIR] [metrics=a,b] [papers=true]", "one table over every run under out= (markdown, CSV and a sortable HTML page), then each tuned run against its base; metrics=: those columns only; papers=true: the papers' numbers beside ours"),
    "report": ("bench report run=DIR [run=DIR ...] [out=FILE.html] [report.max_prompts=200] [cache_dir=DIR]",
               "a self-contained HTML page of one run (with its base) or several side by side: tables, image grid, charts, training curves"),
    "check": ("bench check run=RUN_DIR baseline=FILE", "compare run=DIR with baseline=FILE; non-zero exit outside tolerance"),
    "score": ("bench score images=DIR metrics=a,b [prompts=FILE] [refs=DIR] [scorers=official|tiny] [device=auto] [batch_size=32] [out=FILE]",
              "score a folder of images with named metrics (prompts= only where a metric reads the prompt)"),
    "perf": ("bench perf [key=value ...]", "measure harness overhead, cached re-run time and batched generation speed"),
    "prefetch": ("bench prefetch [suite=S] [model=X] [method=M] [metrics=a,b]", "download a model, a suite's prompts and its metrics' weights ahead of an offline run"),
    "build": ("bench build MODEL [out=DIR] [prompts=N] [parts=model,scorers] [cache_dir=DIR]",
              "pre-train an embedded model (tiny, world, ...) from its seed, ignoring the shipped weights; for the world model, its scorers too (parts=), each rebuild scored beside the shipped one"),
    "plan": ("bench plan [run|train|eval] [key=value ...]", "what the command (run, train or eval) will do and its estimated peak GPU memory, loading no weights"),
}
SYNOPSIS = {name: synopsis for name, (synopsis, _) in COMMANDS_HELP.items()}
COMPOSED = ("run", "eval", "train", "perf", "prefetch", "plan")  # the commands whose key=value build the config of bench.schema

USAGE = """usage: bench COMMAND [key=value ...]   (bench COMMAND --help: its keys with type, default and meaning)

commands:
""" + "\n".join(f"  {name:<12} {what}" for name, (_, what) in COMMANDS_HELP.items()) + """

options (anywhere on the line):
  -q, --quiet        warnings and errors only, no progress
  -v, --verbose      debug logging
  --json             run, eval: print the summary as JSON on stdout (with the run folders) instead of the table;
                     progress and logs stay on stderr (a line every $BENCH_PROGRESS_EVERY s, 30, when it is not a terminal)

several seeds (run, eval):
  seeds=0,1,2        evaluate under each base seed (images cached per seed); a run trains once, the base seed sets no checkpoint
  method.seed=0,1,2  train once per value (sets method.seed and train.seed: all the training's randomness) and evaluate each
                     both lists combine into a grid; each evaluation is a run folder, and <suite>-<model>-<label>-seeds-<hash>/
                     reports per metric the mean over runs, the sd across seeds and the pooled interval (all runs' images)

examples:
  bench run suite=micro method=sft
  bench run suite=smoke method=sft seeds=0,1,2
  bench run protocol=pso-table1 method=pso-online-dmd2
  bench eval suite=smoke model=tiny gen.batch_size=1
  bench run suite=./mine.yaml method=./my_method.yaml   (a suite or method by path; method=module:Class too)
  bench sweep method=sft,dspo seeds=0,1 launcher=slurm launcher.partition=gpu launcher.gpus_per_job=1 out=runs/grid
  bench ls methods
  bench plan method=pso-online-dmd2 suite=parti
"""


def command_help(command: str, args: list[str] = ()) -> str:
    """``bench COMMAND --help``: the synopsis and, for the commands that compose a config, every key
    of ``bench.schema`` with its type, default and comment; with ``method=NAME``, that recipe's keys
    from its ``Spec``."""
    synopsis, what = COMMANDS_HELP[command]
    text = f"usage: {synopsis}\n\n{what}\n"
    if command in COMPOSED:
        from bench.schema import help_text

        text += ("\nkeys (key=value; type, default, meaning; a bad value is refused before any work; "
                 "suite.*, model.*: every key of those presets; method.*: the keys every preset shares, and with method=NAME its recipe's):\n" + help_text() + "\n")
        method = next((a.partition("=")[2] for a in args if a.startswith("method=")), None)
        if method:
            text += method_help(method)
    if command == "sweep":
        from bench.sweep import LAUNCHER_KEYS

        text += ("\nmethod=, suite=, model= take comma lists, seeds=0,1 one cell per base seed (seed=N); every other key=value "
                 "(`bench run --help`) goes to each cell. launcher=local (default: a process per cell on this machine), "
                 "slurm (a job array) or inline (one cell after another in this process).\n\nlauncher keys:\n"
                 + "\n".join(f"  launcher.{k:<18} {kind.__name__:<6} {what}" for k, (kind, what) in LAUNCHER_KEYS.items()) + "\n")
    return text


def method_help(name: str) -> str:
    """The keys of method preset ``name``'s recipe (``bench run method=NAME --help``)."""
    from bench.config import load_entry_config, recipe_spec, to_dict
    from bench.registry import METHODS
    from bench.schema import MethodSpec, spec_help

    preset = load_entry_config(METHODS, name)
    spec = recipe_spec(preset)
    if spec is MethodSpec:
        return f"\nmethod {name} (recipe {preset.recipe}) declares no Spec: its other keys are free-form\n"
    return (f"\nmethod {name} (recipe {preset.recipe}, spec {spec.__qualname__}): its keys (method.KEY=VALUE; "
            "type, default, [the preset's value], meaning; a key not listed is refused):\n" + spec_help(spec, to_dict(preset)) + "\n")


def _kv(args: list[str], allowed: set[str], command: str) -> dict[str, str]:
    from bench.config import parse_overrides

    out = dict(parse_overrides(args))
    unknown = set(out) - allowed
    if unknown:
        raise UsageError(f"`bench {command}` takes {', '.join(sorted(allowed))}; got {', '.join(sorted(unknown))}")
    return out


def cmd_run(args):
    from bench.config import compose
    from bench.runner import run
    from bench.seeds import split_sweep

    args, seeds, train_seeds = split_sweep(args)
    args = with_base_protocol(args)
    if seeds is not None or train_seeds is not None:
        one_process("a seed sweep")
        return _run_sweep(args, seeds, train_seeds, train=True)
    if any(a.startswith("protocol=") for a in args):
        one_process("a protocol")
        return _run_protocol(args, train=True)
    cfg = compose(args, require=("method",))
    if cfg.gen.shard:
        raise UsageError("gen.shard applies to `bench eval` (base-model generation by parallel workers), not `bench run`")
    base, tuned = run(cfg)
    if JSON_OUTPUT:
        print(json.dumps({"run_dir": str(tuned.run_dir), "base_run_dir": str(base.run_dir), "summary": tuned.summary}, indent=1))
        return
    print(tuned.table)
    print(f"\n{report_line(tuned.run_dir)}run folder: {tuned.run_dir}   (base model: {base.run_dir})")


def with_base_protocol(args: list[str]) -> list[str]:
    """A paper preset names the protocol of its paper's table (``base_protocol``, as ``base_model``
    names its model): `bench run method=P` without suite= or protocol= runs that protocol."""
    from bench.config import load_entry_config
    from bench.registry import METHODS, is_path

    keys = {a.split("=", 1)[0] for a in args}
    method = next((a.split("=", 1)[1] for a in args if a.startswith("method=")), None)
    if not method or keys & {"suite", "protocol"} or (method not in METHODS.names() and not is_path(method)):
        return args
    try:
        base = load_entry_config(METHODS, method).get("base_protocol")
    except UsageError:  # a bad path: composition says so, in its own words
        return args
    return [*args, f"protocol={base}"] if base else args


def _run_sweep(args, seeds, train_seeds, train: bool):
    from bench.seeds import run_sweep

    base, sweep = run_sweep(args, seeds, train_seeds, train)
    print(sweep.table)
    print(f"\nsweep folder: {sweep.folder}" + (f"   (base model: {base.folder})" if base is not None else ""))


def _run_protocol(args, train: bool):
    from bench.protocol import render, run_protocol

    entries = run_protocol(args, train=train)
    print(render(entries))
    out = next((a.split("=", 1)[1] for a in args if a.startswith("out=")), "runs")
    cell = entries[0]["cell"] if entries else {}
    print(f"\n{len(entries)} evaluations of protocol {cell.get('name', '?')}; "
          + (f"`bench leaderboard papers=true out={out}` puts them beside the paper's numbers" if cell.get("paper") else
             f"`bench leaderboard out={out}` shows every one against its base"))


def cmd_eval(args):
    from bench.config import compose
    from bench.runner import evaluate, generate_shard
    from bench.seeds import split_sweep

    args, seeds, train_seeds = split_sweep(args)
    if seeds is not None or train_seeds is not None:
        one_process("a seed sweep")
        return _run_sweep(args, seeds, train_seeds, train=False)
    if any(a.startswith("protocol=") for a in args):
        one_process("a protocol")
        return _run_protocol(args, train=False)
    cfg = compose(args)
    if cfg.gen.shard:
        one_process("gen.shard (shards by hand)")
        generated, cached, total = generate_shard(cfg)
        print(f"shard {cfg.gen.shard}: generated {generated}, already stored {cached}, of {total} images in the suite; "
              "run `bench eval` without gen.shard (same cache_dir) to score")
        return
    result = evaluate(cfg)
    if JSON_OUTPUT:
        print(json.dumps({"run_dir": str(result.run_dir), "summary": result.summary}, indent=1))
        return
    print(result.table)
    print(f"\n{report_line(result.run_dir)}run folder: {result.run_dir}")


def cmd_sweep(args):
    """``bench sweep``: the grid's cells as jobs (``bench.sweep``), then the leaderboard over out=."""
    from bench.sweep import sweep

    one_process("a sweep")
    outcome = sweep(args)
    if outcome.failed:
        lines = "\n".join(f"  {name}: {why}" for name, why in outcome.failed.items())
        print(f"failed cells:\n{lines}", file=sys.stderr)
        raise BenchError(f"{len(outcome.failed)} of {len(outcome.cells)} cells failed ({len(outcome.cells) - len(outcome.failed)} done): "
                         "fix the cause and re-run the same command; the done cells are skipped")
    print(outcome.leaderboard.read_text().rstrip("\n"))
    print(f"\n{len(outcome.cells)} cells done ({len(outcome.ran)} run now, {len(outcome.skipped)} done already); "
          f"leaderboard: {outcome.leaderboard}  (.csv, .html beside it)")


def report_line(run_dir: Path) -> str:
    """``report: FILE`` and a newline where the run wrote its report.html (``report.html=false``: none)."""
    return f"report: {run_dir / 'report.html'}\n" if (run_dir / "report.html").is_file() else ""


def cmd_train(args):
    from bench.config import compose
    from bench.runner import Session

    from bench.seeds import split_sweep

    if split_sweep(args)[1:] != (None, None):
        raise UsageError("`bench train` trains one seed (the base seed determines no checkpoint): run `bench run ... method.seed=0,1,2` to train and evaluate several")
    checkpoint = Session(compose(args, require=("method",))).train()
    print(f"checkpoint: {checkpoint.path}")


def cmd_ls(args):
    """``bench ls [KIND ...] [suite=FILE] [method=FILE|module:Class]``: the registered entries of each
    kind, and the presets given by path beside them (composed and checked as a run would, so a bad one
    is its one-line error)."""
    from bench.registry import REGISTRIES

    given = [a for a in args if "=" in a]
    kinds = [a for a in args if "=" not in a]
    extra: dict[str, list[tuple[str, str]]] = {}
    for key, value in parse_path_args(given):
        extra.setdefault(f"{key}s", []).append(path_row(key, value))
    kinds = kinds or list(extra) or list(REGISTRIES)
    for kind in kinds:
        if kind not in REGISTRIES:
            raise UsageError(f"unknown listing '{kind}': use one of {', '.join(REGISTRIES)}")
        rows = REGISTRIES[kind].describe()
        if kind == "protocols":  # the description, and why a protocol is not (fully) expressible
            from bench.protocol import describe_rows

            rows = describe_rows(rows)
        rows = rows + extra.get(kind, [])
        print(f"{kind}:")
        width = max((len(n) for n, _ in rows), default=0)
        for name, description in rows:
            print(f"  {name:<{width}}  {description}")


def parse_path_args(args: list[str]) -> list[tuple[str, str]]:
    """The ``suite=FILE`` and ``method=FILE`` arguments of `bench ls`."""
    from bench.config import parse_overrides

    pairs = parse_overrides(args)
    bad = sorted({k for k, _ in pairs} - {"suite", "method"})
    if bad:
        raise UsageError(f"`bench ls` takes suite=FILE and method=FILE (presets given by path) beside the kinds; got {', '.join(bad)}")
    return pairs


def path_row(key: str, value: str) -> tuple[str, str]:
    """A preset given by path as a row of `bench ls`: its name, description and file, once it composes."""
    from bench.config import compose

    section = compose([f"{key}={value}"])[key]
    where = section.get("_path") or "registered"
    return str(section.name), f"{section.get('description') or ''} [{where}]".strip()


def cmd_leaderboard(args):
    from bench import report

    kv = _kv(args, {"out", "dest", "papers", "metrics"}, "leaderboard")
    papers = kv.get("papers", "false")
    if papers.lower() not in ("false", "0", "no", ""):
        md_path, csv_path, text = report.papers_leaderboard(kv.get("out", "runs"), kv.get("dest"), papers)
        written = [md_path, csv_path]
    else:
        metrics = [m for m in kv.get("metrics", "").split(",") if m] or None
        md_path, csv_path, text = report.leaderboard(kv.get("out", "runs"), kv.get("dest"), metrics)
        written = [md_path, csv_path, md_path.with_suffix(".html")]
    print(text)
    print(f"\nwritten: {'  '.join(map(str, written))}")


def cmd_report(args):
    """``bench report run=DIR [run=DIR ...] [out=FILE.html]``: the HTML report of one run (with its base
    beside it) or a comparison of several, paired by prompt index and seed (``bench.html_report``)."""
    from bench.config import parse_overrides
    from bench.html_report import write_report
    from bench.schema import Report, check

    pairs = parse_overrides(args)
    allowed = {"run", "out", "cache_dir", "report.max_prompts"}
    unknown = sorted({k for k, _ in pairs} - allowed)
    if unknown:
        raise UsageError(f"`bench report` takes {', '.join(sorted(allowed))}; got {', '.join(unknown)}")
    kv = dict(pairs)
    folders = [v for k, v in pairs if k == "run"]
    if not folders:
        raise UsageError(f"usage: {SYNOPSIS['report']}")
    typed = check(Report, {"max_prompts": kv["report.max_prompts"]} if "report.max_prompts" in kv else {}, prefix="report.")
    path = write_report(folders, kv.get("out"), typed["max_prompts"], kv.get("cache_dir"))
    print(f"report: {path}")


def cmd_check(args):
    import json

    from bench import report
    from bench.errors import DataError

    kv = _kv(args, {"run", "baseline"}, "check")
    if "run" not in kv or "baseline" not in kv:
        raise UsageError("usage: bench check run=RUN_DIR baseline=FILE")
    summary_path = Path(kv["run"]) / "summary.json"
    if not summary_path.is_file():
        raise DataError(f"no summary.json in {kv['run']}: point run= at a finished run folder")
    rows = report.check(json.loads(summary_path.read_text()), report.load_baseline(kv["baseline"]))
    print(report.format_check(rows))
    failed = [r for r in rows if not r["ok"]]
    if failed:
        raise BenchError(f"{len(failed)} of {len(rows)} checks outside tolerance: {', '.join(r['key'] for r in failed)}")
    print(f"\nall {len(rows)} checks within tolerance")


def cmd_score(args):
    """Score a folder of images with named metrics: a table of means, and with ``out=`` every score."""
    import pandas as pd

    from bench.report import _markdown
    from bench.runner import resolve_device
    from bench.schema import Config, Score, check
    from bench.scoring import folder_images, load_metrics, reference_folder, score_files, write_scores
    from bench.stats import cluster_bootstrap_mean_ci

    kv = _kv(args, {"images", "prompts", "metrics", "refs", "scorers", "device", "batch_size", "out"}, "score")
    if "images" not in kv or "metrics" not in kv:
        raise UsageError(f"usage: {SYNOPSIS['score']}")
    check(Config, {k: kv[k] for k in ("device", "scorers") if k in kv})  # the rules of device= and scorers= in a run
    check(Score, {k: kv[k] for k in ("batch_size",) if k in kv})
    if not [m for m in kv["metrics"].split(",") if m]:
        raise UsageError(f"metrics={kv['metrics']} names no metric: use metrics=a,b (`bench ls metrics`)")
    device = resolve_device(kv.get("device", "auto"))
    metrics = load_metrics([m for m in kv["metrics"].split(",") if m], device, kv.get("scorers", "official"))
    files, prompts = folder_images(kv["images"], kv.get("prompts"), [n for n, m in metrics.items() if m.needs_prompts])
    refs = reference_folder(kv["refs"]) if kv.get("refs") else None
    frame = score_files(files, prompts, metrics, int(kv.get("batch_size", 32)), device, refs=refs)
    clusters = frame["prompt"].to_numpy() if kv.get("prompts") else None  # images of one prompt resample together
    rows = []
    for name, metric in metrics.items():
        mean, (lo, hi) = cluster_bootstrap_mean_ci(frame[name].to_numpy(), clusters, 1000, 0.95, 0)
        rows.append({"metric": name, "mean": f"{mean:.4g}", "95% CI": f"[{lo:.4g}, {hi:.4g}]", "images": str(len(frame)), "scale": metric.info.scale})
    print(_markdown(pd.DataFrame(rows)))
    if kv.get("out"):
        write_scores(frame, kv["out"])
        print(f"\nscores: {kv['out']}")


def cmd_perf(args):
    from bench.perf import main as perf_main

    perf_main(args)


def cmd_prefetch(args):
    """Download what an offline run will need: the model (with ``model=`` or ``method=``), the suite's
    prompts (a hub dataset, DreamBench) and the weights of its metrics and reward (or ``metrics=a,b``)."""
    from bench.config import compose, to_dict
    from bench.errors import WeightsMissingError

    metric_arg = next((a.split("=", 1)[1] for a in args if a.startswith("metrics=")), None)
    args = [a for a in args if not a.startswith("metrics=")]
    cfg = to_dict(compose(args))  # plain containers: the tiny build spec is written out as JSON configs
    try:
        _prefetch(cfg, {a.split("=", 1)[0] for a in args}, metric_arg)
    except OSError as err:  # the hub libraries' "not cached and offline" and network errors
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise WeightsMissingError(f"bench prefetch could not download ({reason}): run it where the hub is reachable, with HF_HUB_OFFLINE unset") from None


def _prefetch(cfg: dict, given: set[str], metric_arg: str | None) -> None:
    from bench.io import cache_root
    from bench.scoring import make_metric

    if "model" in given or "method" in given:
        _prefetch_model(cfg)
    if metric_arg is None:
        from bench.suite import fetch_dreambench, load_suite

        if cfg["suite"].get("kind") == "dreambench" and not cfg["suite"].get("source"):
            print(f"suite {cfg['suite']['name']}: {fetch_dreambench(cache_root(cfg))}")
        else:
            suite = load_suite(cfg["suite"], cache=cache_root(cfg))
            print(f"suite {suite.name}: {len(suite.prompts)} prompts from {suite.source}")
            if suite.real_images is not None:  # the real images of FID/KID (an archive, extracted once)
                from bench.distribution import fetch_real_images

                print(f"suite {suite.name}: reference images in {fetch_real_images(suite, cache_root(cfg))}")
        train_prompts = (cfg.get("method") or {}).get("train_prompts")
        if train_prompts:  # the online presets' prompt file
            from bench.suite import read_prompt_source

            rows, where = read_prompt_source(train_prompts, Path.cwd(), f"method={cfg['method']['name']}", "method.train_prompts", cache_root(cfg))
            print(f"method {cfg['method']['name']}: {len(rows)} training prompts from {where}")
        names = list(cfg["suite"].get("metrics") or []) + [r for r in [(cfg.get("method") or {}).get("reward"), cfg["suite"].get("reward")] if r]
    else:
        names = [n for n in metric_arg.split(",") if n]
    for name in dict.fromkeys(names):
        metric = make_metric(name)
        for path in getattr(metric, "download", lambda: [])():
            print(f"metric {name}: {path}")


def _prefetch_model(cfg: dict) -> None:
    from bench.io import cache_root
    from bench.models import pipeline_location

    model = cfg["model"]
    if model["source"] == "tiny":
        location, _, _ = pipeline_location(model, cache_root(cfg))
        print(f"model {model['name']}: built offline at {location}")
        return
    from huggingface_hub import hf_hub_download, snapshot_download

    path = snapshot_download(model["source"], revision=model.get("revision"))
    print(f"model {model['name']}: {path}")
    for part in ("unet", "vae"):  # distilled UNets (DMD2, LCM) and replacement VAEs load on top
        spec = model.get(part)
        if spec:
            if spec.get("file"):
                path = hf_hub_download(spec["repo"], spec["file"], revision=spec.get("revision"))
            else:
                path = snapshot_download(spec["repo"], revision=spec.get("revision"))
            print(f"model {model['name']} {part}: {path}")


def cmd_build(args):
    """``bench build MODEL``: the embedded model pre-trained from its seed into ``out=`` (default
    ``<cache>/rebuilt/<build>``), ignoring its shipped weights. For the world model its learned scorers
    are trained again too (``parts=model,scorers``, the default; either alone), and each rebuild is
    judged beside the shipped weights on ``prompts=`` captions a tag (50): ``bench.world.rebuild``."""
    from bench.config import compose, to_dict
    from bench.io import cache_root
    from bench.models import embedded_build_name
    from bench.models.prebuilt import rebuild

    names = [a for a in args if "=" not in a]
    kv = _kv([a for a in args if "=" in a], {"out", "prompts", "cache_dir", "parts"}, "build")
    if len(names) != 1:
        raise UsageError(f"usage: {SYNOPSIS['build']} (one embedded model, e.g. `bench build world`)")
    cfg = to_dict(compose([f"model={names[0]}"] + ([f"cache_dir={kv['cache_dir']}"] if "cache_dir" in kv else [])))
    model_cfg, cache = cfg["model"], cache_root(cfg)
    if model_cfg["source"] != "tiny":
        raise UsageError(f"model '{names[0]}' is not embedded (source {model_cfg['source']}): `bench build` pre-trains the embedded models, see `bench ls models`")
    is_world = model_cfg["build"].get("data") == "world"
    parts = kv.get("parts", "model,scorers" if is_world else "model").split(",")
    if not set(parts) <= ({"model", "scorers"} if is_world else {"model"}):
        raise UsageError(f"parts= takes {'model, scorers or model,scorers' if is_world else 'model alone (scorers: the world model only)'}; got {kv['parts']}")
    build = embedded_build_name(model_cfg)
    out = Path(kv.get("out") or cache / "rebuilt" / build)
    if "model" in parts and (out / "model_index.json").exists():
        raise UsageError(f"{out} already holds a build: remove it or give another out=DIR")
    if is_world:
        from bench.world.rebuild import check_scorers_part, judge_rebuild

        check_scorers_part(parts, build, out)
    if "model" in parts:
        print(f"pre-training {build} from seed {model_cfg['build']['seed']} into {out} ...", flush=True)
        print(f"built in {rebuild(model_cfg, out):.0f} s: use it as model={names[0]} model.source={out}")
    if is_world:
        judge_rebuild(parts, model_cfg, out, cache, int(kv.get("prompts", 50)))


def cmd_plan(args):
    """``bench plan [run|train|eval] key=value ...``: the images to generate, the UNet passes to train, the
    estimated peak GPU memory and where the preset differs from its authors' code (``bench.plan``)."""
    from bench.plan.planner import make_plan
    from bench.seeds import split_sweep

    if split_sweep(args)[1:] != (None, None):
        raise UsageError("bench plan plans one seed: drop seeds= and method.seed=0,1,2 (each base seed repeats the evaluation, each training seed the training and evaluation)")
    command = "run" if any(a.startswith("method=") for a in args) else "eval"
    if args and args[0] in ("run", "train", "eval"):
        command, args = args[0], args[1:]
    print(make_plan(command, args).text())


COMMANDS = {
    "run": cmd_run,
    "eval": cmd_eval,
    "sweep": cmd_sweep,
    "train": cmd_train,
    "ls": cmd_ls,
    "leaderboard": cmd_leaderboard,
    "report": cmd_report,
    "check": cmd_check,
    "perf": cmd_perf,
    "score": cmd_score,
    "prefetch": cmd_prefetch,
    "plan": cmd_plan,
    "build": cmd_build,
}


JSON_OUTPUT = False  # --json: run and eval print their summary as JSON
FLAGS = {"-q": "quiet", "--quiet": "quiet", "-v": "verbose", "--verbose": "verbose", "--json": "json"}


def quiet_unless_rank_zero() -> None:
    """Under torchrun or accelerate launch, only rank 0 prints (its table, its progress); the other
    ranks print warnings and errors only."""
    from bench import io
    from bench.ranks import launched, process_rank

    if not launched():
        return
    signal.signal(signal.SIGTERM, _stopped_by_launcher)  # the launcher stops every rank when one fails
    if process_rank() != 0:
        io.QUIET = True
        logging.getLogger().setLevel(logging.WARNING)
        sys.stdout = open(os.devnull, "w")


def _stopped_by_launcher(signum, frame):
    from bench.ranks import RankError, process_rank

    raise RankError(f"rank {process_rank()} stopped by the launcher (another rank failed or was killed): what was finished is kept; run the same command again to resume")


def one_process(what: str) -> None:
    """Refuse, in one line, a command that does not yet split its work across launched ranks."""
    from bench.ranks import launched

    if launched():
        raise UsageError(f"{what} runs in one process: start it without torchrun / accelerate launch (a single `bench run` or `bench eval` splits across ranks)")


def output_options(argv: list[str]) -> list[str]:
    """Take -q/-v/--json out of the arguments and apply them: the logging level, progress, JSON output."""
    global JSON_OUTPUT
    from bench import io

    flags = {FLAGS[a] for a in argv if a in FLAGS}
    JSON_OUTPUT = "json" in flags
    io.QUIET = "quiet" in flags
    level = logging.WARNING if "quiet" in flags else logging.DEBUG if "verbose" in flags else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")  # no-op where logging is set up (an embedding program)
    if flags & {"quiet", "verbose"}:
        logging.getLogger().setLevel(level)
    return [a for a in argv if a not in FLAGS]


def main(argv: list[str] | None = None) -> int:
    argv = output_options(sys.argv[1:] if argv is None else argv)
    for noisy in ("httpx", "huggingface_hub", "diffusers", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    if argv[:1] == ["help"] and argv[1:2] and argv[1] in COMMANDS:
        argv = [argv[1], "--help"]
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, args = argv[0], argv[1:]
    quiet_unless_rank_zero()
    if command in COMMANDS and any(a in ("-h", "--help") for a in args):
        try:
            print(command_help(command, args))
        except BenchError as err:
            print(f"bench: error: {err}", file=sys.stderr)
            return err.exit_code
        return 0
    if command not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(command, COMMANDS, n=1)
        print(f"bench: error: unknown command '{command}'" + (f"; did you mean {close[0]}?" if close else "") + " (bench --help)", file=sys.stderr)
        return 2
    try:
        COMMANDS[command](args)
    except BenchError as err:
        if os.environ.get("BENCH_DEBUG"):
            raise
        print(f"bench: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("bench: interrupted; finished work is kept and a re-run resumes it", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
