"""Summaries, tables, leaderboards and the CI regression gate for run folders.

A run folder holds ``manifest.json`` and ``scores.parquet``; this module turns
the scores into ``summary.json`` / ``table.md``, gathers many runs into a
leaderboard, and checks a summary against pinned expectations.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd

from bench.errors import DataError, UsageError
from bench.io import write_text
from bench import stats
from bench.seeds import axes_text

RUN_COLUMNS = ["run_id", "suite", "model", "method"]
VERDICT_MARKS = {"gain": "*", "loss": "!"}  # a metric's paired difference from the base, Holm-corrected (summary["delta"])


# --------------------------------------------------------------------------- summary


def summarize(
    scores: pd.DataFrame,
    metrics: dict[str, dict],
    baseline: pd.DataFrame | None,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    baseline_id: str | None = None,
    group_by: list[str] | tuple[str, ...] = (),
    n_permutations: int = 9999,
    overall_by: str | None = None,
) -> dict:
    """Per metric: the mean with an interval that resamples prompts, the smallest shift this many
    prompts could detect, and against a baseline the paired difference, its test (Holm-corrected
    over the table's metrics) and the win rate; for each column of ``group_by`` (``subject``, a
    PartiPrompts ``Category``) the same mean and interval per group (``bench.stats``); with
    ``overall_by`` (GenEval's ``tag``) the mean of that column's group means, as its overall score."""
    _require_columns(scores, metrics, "scores")
    if baseline is not None:
        _require_columns(baseline, metrics, "baseline scores")
    if scores.empty:
        raise DataError("scores are empty; the run produced no images, re-run `bench run ...`")
    out: dict = {
        "n_images": int(len(scores)),
        "n_prompts": int(scores["prompt_index"].nunique()),
        "level": float(level),
        "unit": "prompt",  # intervals resample prompts with all their images; tests pair prompts
        "metrics": {name: _metric_summary(_scored(scores, spec), name, spec, n_boot, level, seed) for name, spec in metrics.items()},
        "winrate": {},
    }
    if baseline is not None:
        out["delta"] = {}
        for name, spec in metrics.items():
            run_pp = _scored(scores, spec).groupby("prompt_index")[name].mean()
            base_pp = _scored(baseline, spec).groupby("prompt_index")[name].mean()
            try:
                out["winrate"][name] = stats.winrate(run_pp, base_pp, bool(spec["higher_is_better"]), level) | {"baseline": baseline_id}
                out["delta"][name] = stats.paired_difference(run_pp, base_pp, level, n_permutations, seed) | {"baseline": baseline_id}
            except ValueError as err:
                raise DataError(f"comparing {name!r} with the baseline: {err}; evaluate the baseline on the same suite") from err
        _mark_significant(out["delta"], metrics, level, n_permutations)
    for column in group_by:
        out.setdefault("by_group", []).append(_group_summary(scores, metrics, column, n_boot, level, seed))
    if overall_by:
        out["overall"] = _overall_summary(scores, metrics, baseline, overall_by, n_boot, level, seed)
    return out


def _overall_summary(scores: pd.DataFrame, metrics: dict, baseline: pd.DataFrame | None, column: str, n_boot: int, level: float, seed: int) -> dict:
    """Each metric's mean over the groups of ``column`` of the group means (GenEval's "overall score,
    avg. over tasks"), its interval resampling prompts within groups, and against a baseline the same
    mean of per-prompt differences (paired by prompt)."""
    if column not in scores.columns:
        raise DataError(f"suite.overall_by={column}: the scores have no column {column}; name one of the suite's group_columns")
    out: dict = {"by": column, "n_groups": int(scores[column].nunique()), "metrics": {}}
    for name, spec in metrics.items():
        rows = _scored(scores, spec)
        mean, ci = stats.macro_mean_ci(rows[name].to_numpy(), rows["prompt_index"].to_numpy(), rows[column].to_numpy(), n_boot, level, seed)
        out["metrics"][name] = {"mean": mean, "ci": list(ci)}
        if baseline is not None:
            run_pp = rows.groupby("prompt_index")[name].mean()
            base_pp = _scored(baseline, spec).groupby("prompt_index")[name].mean()
            run, base = stats.paired(run_pp, base_pp, f"the overall {name}")
            group = rows.groupby("prompt_index")[column].first().reindex(run_pp.index).to_numpy()
            value, dci = stats.macro_mean_ci(run - base, None, group, n_boot, level, seed)
            out["metrics"][name]["delta"] = {"value": value, "ci": list(dci)}
    return out


def _scored(df: pd.DataFrame, spec: dict) -> pd.DataFrame:
    """The rows a metric scored: all, or those of its prompts (``spec["prompts"]``, a scoped metric)."""
    return df if "prompts" not in spec else df[df["prompt_index"].isin(spec["prompts"])]


def _metric_summary(rows: pd.DataFrame, name: str, spec: dict, n_boot: int, level: float, seed: int) -> dict:
    try:
        mean, (lo, hi) = stats.cluster_bootstrap_mean_ci(rows[name].to_numpy(), rows["prompt_index"].to_numpy(), n_boot, level, seed)
    except ValueError as err:
        raise DataError(f"metric {name!r}: {err}") from err
    per_prompt = rows.groupby("prompt_index")[name].mean()
    return {
        "mean": mean,
        "ci": [lo, hi],
        "higher_is_better": bool(spec["higher_is_better"]),
        "version": str(spec["version"]),
        "scale": str(spec["scale"]),
        # the smallest shift of the mean this many prompts detects (80% power) against a known value
        "detectable": stats.detectable_difference(float(per_prompt.std(ddof=1)) if len(per_prompt) > 1 else 0.0, len(per_prompt), level),
        **({"n_images": int(len(rows))} if "prompts" in spec else {}),
    }


def _mark_significant(delta: dict, metrics: dict, level: float, n_permutations: int) -> None:
    """Holm's correction over the table's metrics; a gain is a significant difference in the metric's better direction."""
    adjusted = stats.holm({name: d["p_value"] for name, d in delta.items()})
    for name, d in delta.items():
        d["p_holm"] = adjusted[name]
        d["significant"] = bool(adjusted[name] < 1 - level)
        better = d["value"] > 0 if metrics[name]["higher_is_better"] else d["value"] < 0
        d["verdict"] = ("gain" if better else "loss") if d["significant"] else "no detected change"
        d["test"] = f"{stats.PERMUTATION_TEST}, {n_permutations} resamples; Holm over {len(delta)} metric(s)"


def _group_summary(scores: pd.DataFrame, metrics: dict, column: str, n_boot: int, level: float, seed: int) -> dict:
    groups = scores.groupby(column, sort=True)
    means, cis = {}, {}
    for name, spec in metrics.items():
        means[name], cis[name] = {}, {}
        for g, rows in groups:
            rows = _scored(rows, spec)
            if rows.empty:  # a scoped metric: only its groups
                continue
            mean, ci = stats.cluster_bootstrap_mean_ci(rows[name].to_numpy(), rows["prompt_index"].to_numpy(), n_boot, level, seed)
            means[name][str(g)], cis[name][str(g)] = mean, list(ci)
    return {"by": column, "n_prompts": {str(g): int(n) for g, n in groups["prompt_index"].nunique().items()}, "means": means, "ci": cis}


def _require_columns(df: pd.DataFrame, metrics: dict, what: str) -> None:
    missing = [c for c in ["prompt_index", *metrics] if c not in df.columns]
    if missing:
        raise DataError(f"{what} lack column(s) {missing}; re-score the run with those metrics")


def _fmt(x) -> str:
    """4 significant digits; '-' for a missing value."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.4g}"


def _interval(ci) -> str:
    return f"[{_fmt(ci[0])}, {_fmt(ci[1])}]"


def _signed(x) -> str:
    return "-" if x is None else f"{x:+.4g}"


def render_table(summary: dict, title: str) -> str:
    """Markdown table, one row per metric, under a ``# title`` heading: the mean and its interval,
    and against a base the paired difference (``*``: a gain that survives Holm's correction, ``!``: a
    significant loss), the win rate, and the smallest difference the run could detect."""
    pct = f"{summary.get('level', 0.95) * 100:g}% CI"
    deltas = summary.get("delta") or {}
    rows = []
    for name, m in summary["metrics"].items():
        w, d = summary.get("winrate", {}).get(name), deltas.get(name)
        row = {"metric": name, "mean": _fmt(m["mean"]), pct: _interval(m["ci"]), "direction": "↑" if m["higher_is_better"] else "↓"}
        if deltas:
            mark = VERDICT_MARKS.get(d["verdict"], "") if d else ""
            row |= {
                "Δ vs base": f"{_signed(d['value'])}{mark} {_interval(d['ci'])}" if d else "-",
                "p (Holm)": _fmt(d["p_holm"]) if d else "-",
                "win rate vs base": f"{_fmt(w['value'])} {_interval(w['ci'])}" if w else "-",
            }
        detectable = (d or m).get("detectable")
        row["detectable Δ"] = "-" if detectable is None else f"±{detectable:.2g}"
        rows.append(row)
    table = f"# {title}\n\n{_markdown(pd.DataFrame(rows))}\n"
    if deltas:
        table += (
            f"\nΔ: mean per-prompt difference with its paired t-interval; p: sign-flip permutation test, Holm-corrected over "
            f"the {len(deltas)} metrics (* a gain, ! a loss at alpha {1 - summary.get('level', 0.95):.2g}). Win rate: ties count one half, Wilson interval. "
        )
    else:
        table += "\n"
    table += f"Intervals resample the {summary['n_prompts']} prompts with their images; detectable Δ: the smallest difference found with 80% power at this many prompts.\n"
    for groups in summary.get("by_group", []):
        by = groups["by"]
        cis = groups.get("ci") or {}
        rows = [
            {by: g, "prompts": str(n), **{m: _fmt(groups["means"][m].get(g)) + (f" {_interval(cis[m][g])}" if g in cis.get(m, {}) else "") for m in groups["means"]}}
            for g, n in groups["n_prompts"].items()
        ]
        table += f"\nmean by {by} ({pct}):\n\n{_markdown(pd.DataFrame(rows))}\n"
    if summary.get("overall"):
        table += render_overall(summary["overall"], pct)
    if summary.get("sets"):
        table += render_sets(summary["sets"])
    return table


def render_overall(overall: dict, pct: str) -> str:
    """The overall score: the mean of the group means (GenEval's "avg. over tasks")."""
    by, rows = overall["by"], []
    for name, m in overall["metrics"].items():
        row = {"metric": name, "overall": _fmt(m["mean"]), pct: _interval(m["ci"])}
        if "delta" in m:
            row["Δ vs base"] = f"{_signed(m['delta']['value'])} {_interval(m['delta']['ci'])}"
        rows.append(row)
    return (
        f"\noverall score: the mean of the {overall['n_groups']} {by} means, each {by} weighted alike "
        f"(intervals resample prompts within each {by}; Δ pairs them):\n\n{_markdown(pd.DataFrame(rows))}\n"
    )


def protocol_text(protocol: dict) -> str:
    """One line for a set-level metric's protocol: library, mode, preparation and features."""
    resolution = protocol.get("resolution")
    return f"{protocol.get('library', '?')} {protocol.get('mode', '')}, " + (f"{resolution}px center crop, " if resolution else "") + str(protocol.get("feature_extractor", ""))


def render_sets(sets: dict) -> str:
    """The set-level metrics (FID, KID) of a summary: overall, then one table per group column. An
    interval (from halves of the prompts) follows its value; KID's std over its subsets has a column."""
    with_base = any("baseline" in e for e in sets.values())
    with_std = any("std" in e for e in sets.values())
    boot = next((e for e in sets.values() if "ci" in e), None)
    rows = []
    for name, e in sets.items():
        rows.append(
            {
                "metric": name,
                "value": _fmt(e["value"]),
                **({f"{boot['level'] * 100:g}% CI": _set_interval(e) or "-"} if boot else {}),
                **({"subset std": _fmt(e.get("std"))} if with_std else {}),
                "direction": "↑" if e["higher_is_better"] else "↓",
                **({"base": _fmt(e.get("baseline"))} if with_base else {}),
                "images": str(e["n_images"]),
                "reference images": str(e["n_reference"]),
                "protocol": protocol_text(e["protocol"]),
            }
        )
    text = f"\nset-level metrics (the generated set against the real images):\n\n{_markdown(pd.DataFrame(rows))}\n"
    if boot:
        text += f"\nintervals: the spread of the metric over {boot['n_boot']} random halves of the prompts (real images fixed), centred on the value\n"
    columns = dict.fromkeys(c for e in sets.values() for c in e.get("by_group", {}))
    for column in columns:
        labels = sorted(dict.fromkeys(g for e in sets.values() for g in e.get("by_group", {}).get(column, {})))
        rows = []
        for label in labels:
            cells = {name: e.get("by_group", {}).get(column, {}).get(label, {}) for name, e in sets.items()}
            any_cell = next(c for c in cells.values() if c)
            values = {n: f"{_fmt(c.get('value'))} {_set_interval(c)}".strip() for n, c in cells.items()}
            rows.append({column: label, "images": str(any_cell["n_images"]), "reference images": str(any_cell["n_reference"]), **values})
        text += f"\nset-level metrics by {column}:\n\n{_markdown(pd.DataFrame(rows))}\n"
    return text


def _set_interval(entry: dict) -> str:
    """``[lo, hi]`` of a set-level value, '' without one."""
    return _interval(entry["ci"]) if entry.get("ci") else ""


def _markdown(df: pd.DataFrame) -> str:
    # Cells are preformatted strings; stop tabulate from re-parsing them as numbers.
    return df.to_markdown(index=False, disable_numparse=True)


# --------------------------------------------------------------------------- leaderboard


def _read_json(path: Path, what: str) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read {what} {path}: {err}; re-run `bench run ...` for that run or remove it")
    if not isinstance(obj, dict):
        raise DataError(f"{what} {path} is not a JSON object; re-run `bench run ...` for that run or remove it")
    return obj


def collect_runs(root) -> pd.DataFrame:
    """One row per run folder (manifest.json + summary.json) under ``root``, recursively. A seed sweep
    (``bench.seeds``) is one row in place of its runs, each value the mean over them with a ``sd`` column
    beside it, so no evaluation counts twice."""
    root = Path(root)
    records, names, set_names, members, judged = [], set(), set(), set(), set()
    for manifest_path in sorted(root.rglob("manifest.json")):
        summary_path = manifest_path.with_name("summary.json")
        if not summary_path.exists():
            continue  # not yet evaluated: not a finished run
        manifest = _read_json(manifest_path, "manifest")
        summary = _read_json(summary_path, "summary")
        missing = [k for k in RUN_COLUMNS if k not in manifest]
        if missing:
            raise DataError(f"manifest {manifest_path} lacks {missing}; re-run `bench run ...` for that run")
        if not isinstance(summary.get("metrics"), dict):
            raise DataError(f"summary {summary_path} has no 'metrics'; re-run `bench run ...` for that run")
        rec = {k: manifest[k] for k in RUN_COLUMNS}
        sweep = manifest.get("sweep")  # a seed sweep: its runs' mean and sd (bench.seeds)
        try:
            if sweep:
                rec["seeds"] = axes_text(sweep["axes"])
                members.update(sweep["runs"])

            def put(column, entry, stat):
                rec[column] = float("nan") if entry[stat] is None else float(entry[stat])
                if sweep:
                    rec[f"{column} sd"] = float("nan") if entry["sd"] is None else float(entry["sd"])

            for name, m in summary["metrics"].items():
                put(name, m, "mean")
                names.add(name)
            for name, w in (summary.get("winrate") or {}).items():
                put(f"{name} win", w, "value")
                names.add(name)
            for name, d in (summary.get("delta") or {}).items():  # against the run's base: a gain or loss that survives Holm's correction
                rec[f"{name} verdict"] = d["verdict"]
                judged.add(name)
            for name, e in (summary.get("sets") or {}).items():  # the resolution is in the column: FIDs at 256 and 1024 px never share one
                resolution = e["protocol"].get("resolution")
                column = f"{name}@{resolution}px" if resolution else name
                put(column, e, "value")
                set_names.add(column)
        except (TypeError, KeyError, ValueError) as err:
            raise DataError(f"summary {summary_path} or its manifest is malformed ({err!r}); re-run `bench run ...` for that run")
        records.append(rec)
    records = [r for r in records if r["run_id"] not in members]
    sweeps = any("seeds" in r for r in records)
    values = [c for name in sorted(names) for c in (name, f"{name} win")] + sorted(set_names)
    metric_cols = [c for v in values for c in ((v, f"{v} sd") if sweeps else (v,))] + [f"{n} verdict" for n in sorted(judged)]
    df = pd.DataFrame(records, columns=RUN_COLUMNS + (["seeds"] if sweeps else []) + metric_cols)
    return df.sort_values(["suite", "model", "method", "run_id"], key=lambda col: col.map(in_step_order) if col.name in ("method", "run_id") else col, ignore_index=True)


def in_step_order(label: str) -> tuple:
    """A sort key that reads the numbers in a label as numbers: a protocol's kept checkpoints
    (``refl@step25``, ``refl@step100``) in the order they were trained."""
    return tuple((0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(label)))


def versus_base(root, metrics: list[str] | None = None) -> str:
    """Markdown: every tuned run's paired comparison with its own base model, one row per run: for each
    metric (``metrics``: those only, in that order) the mean per-prompt difference with its interval and
    the win rate with its interval. '' when no run under ``root`` was compared with a base."""
    rows, level = [], None
    for summary_path in sorted(Path(root).rglob("summary.json")):
        manifest_path = summary_path.with_name("manifest.json")
        if not manifest_path.exists():
            continue
        summary, manifest = _read_json(summary_path, "summary"), _read_json(manifest_path, "manifest")
        deltas, wins = summary.get("delta") or {}, summary.get("winrate") or {}
        if not deltas or manifest.get("sweep"):
            continue  # a base model, or a seed sweep (its runs are compared one by one)
        level = summary.get("level", 0.95)
        row = {k: str(manifest.get(k)) for k in ("method", "model", "run_id")}
        for name in metrics or list(deltas):
            d, w = deltas.get(name), wins.get(name)
            row[f"Δ {name}"] = f"{_signed(d['value'])}{VERDICT_MARKS.get(d['verdict'], '')} {_interval(d['ci'])}" if d else "-"
            row[f"win {name}"] = f"{_fmt(w['value'])} {_interval(w['ci'])}" if w else "-"
        rows.append(row)
    if not rows:
        return ""
    missing = [m for m in metrics or [] if all(r[f"Δ {m}"] == "-" for r in rows)]
    if missing:
        raise UsageError(f"metrics={','.join(missing)}: no run under {root} was compared with its base on it; name metrics of the runs' suites")
    rows.sort(key=lambda r: (r["model"], in_step_order(r["method"]), r["run_id"]))
    table = pd.DataFrame(rows).fillna("-")  # runs of suites with other metrics leave the others' columns empty
    return (f"## Against each run's base model\n\n{_markdown(table)}\n\nΔ: mean per-prompt difference from the base model's images of the same prompts, "
            f"{level * 100:g}% paired t-interval (* a gain, ! a loss that survives Holm's correction over the run's metrics); "
            "win: the share of prompts on which the tuned model scores higher (ties count one half), Wilson interval.\n")


def leaderboard(root, out_dir=None, metrics: list[str] | None = None) -> tuple[Path, Path, str]:
    """Write leaderboard.md (the runs' means and win rates, then each tuned run against its base:
    ``versus_base``), leaderboard.csv and leaderboard.html for every run under ``root``."""
    root = Path(root)
    df = collect_runs(root)
    if df.empty:
        raise DataError(f"no runs with summary.json under {root}; run `bench run ...` first")
    out = Path(out_dir) if out_dir is not None else root
    shown = df.drop(columns=[c for c in df.columns if c.endswith((" sd", " verdict"))])
    for col in shown.columns[len(RUN_COLUMNS):]:
        if col == "seeds":
            shown[col] = shown[col].fillna("-")
            continue
        sd = df[f"{col} sd"] if f"{col} sd" in df else pd.Series(float("nan"), index=df.index)
        verdict = df[f"{col} verdict"] if f"{col} verdict" in df else pd.Series(None, index=df.index, dtype=object)
        shown[col] = [
            _fmt(v) + VERDICT_MARKS.get(d, "") + ("" if pd.isna(s) else f" ± {_fmt(s)}")  # a sweep: mean ± sd over its runs
            for v, s, d in zip(shown[col], sd, verdict)
        ]
    if metrics:  # those metrics' columns only (a set metric's column names its resolution)
        shown = shown[[c for c in shown.columns if c in RUN_COLUMNS + ["seeds"] or c.removesuffix(" win").split("@")[0] in metrics]]
    shown = shown.astype(str)
    md = f"# Leaderboard\n\n{_markdown(shown)}\n"
    if any(c.endswith(" verdict") for c in df.columns):
        md += "\n* a gain over the run's base, ! a loss: a paired test on its prompts that survives Holm's correction across the run's metrics.\n"
    against = versus_base(root, metrics)
    md += f"\n{against}" if against else ""
    md_path = write_text(out / "leaderboard.md", md)
    csv_path = write_text(out / "leaderboard.csv", df.to_csv(index=False, lineterminator="\n"))
    from bench import html_leaderboard

    html_leaderboard.write(df, root, out)  # leaderboard.html beside them: sortable, with group columns and marks
    return md_path, csv_path, md


def papers_leaderboard(root, out_dir=None, papers: str = "true") -> tuple[Path, Path, str]:
    """Write papers.md and papers.csv: every cell of the papers' tables (``results/papers``), with
    our protocol runs under ``root`` beside it (``bench.papers``). ``papers`` is true (every paper),
    a comma-separated list of paper ids, or a folder of paper files."""
    from bench import papers as paper_tables

    directory, only = None, None
    if papers.lower() not in ("true", "1", "yes"):
        if Path(papers).is_dir():
            directory = papers
        else:
            only = [p for p in papers.split(",") if p]
    cells = paper_tables.load_papers(directory, only)
    runs, folders = paper_tables.protocol_runs(root)
    df = paper_tables.frame(paper_tables.compare(cells, runs, folders))
    out = Path(out_dir) if out_dir is not None else Path(root)
    md = paper_tables.render(df)
    md_path = write_text(out / "papers.md", md)
    csv_path = write_text(out / "papers.csv", df.to_csv(index=False, lineterminator="\n"))
    return md_path, csv_path, md


# --------------------------------------------------------------------------- regression gate

_SPEC_KEYS = {"value", "abs_tol", "min", "max"}


def _spec_problem(spec) -> str | None:
    """Why a tolerance spec is unusable, or None if it is fine."""
    if not isinstance(spec, dict):
        return f"expected a mapping like {{value, abs_tol}} or {{min, max}}, got {spec!r}"
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        return f"unknown field(s) {sorted(unknown)}; allowed: {sorted(_SPEC_KEYS)}"
    if ("value" in spec) != ("abs_tol" in spec):
        return "'value' and 'abs_tol' must be given together"
    if not {"value", "min", "max"} & set(spec):
        return "give 'value' with 'abs_tol', or 'min' and/or 'max'"
    for k, v in spec.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
            return f"{k!r} must be a number, got {v!r}"
    if spec.get("abs_tol", 0) < 0:
        return "'abs_tol' must be >= 0"
    return None


def load_baseline(path) -> dict:
    """Read a gate file (JSON, or YAML for .yaml/.yml) mapping dotted keys to specs."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"baseline file {path} not found; pass the path of a JSON/YAML gate file")
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            obj = yaml.safe_load(text)
        else:
            obj = json.loads(text)
    except Exception as err:  # any parse failure is the same user problem: a broken file
        raise DataError(f"cannot parse baseline file {path}: {err}".splitlines()[0]) from err
    if not isinstance(obj, dict) or not obj:
        raise DataError(f"baseline file {path} must be a non-empty mapping of summary keys to tolerances")
    for key, spec in obj.items():
        problem = _spec_problem(spec)
        if problem:
            raise DataError(f"baseline file {path}, key {key!r}: {problem}")
    return obj


def _lookup(d, key: str):
    """Resolve a dotted key, allowing dots inside names (e.g. metric 'clip.b32') and list
    indices (``winrate.brightness.ci.0`` is the interval's lower bound)."""
    if isinstance(d, list) and key.isdigit() and int(key) < len(d):
        return d[int(key)]
    if not isinstance(d, dict):
        raise KeyError(key)
    if key in d:
        return d[key]
    for i, ch in enumerate(key):
        if ch == "." and key[:i] in d:
            try:
                return _lookup(d[key[:i]], key[i + 1:])
            except KeyError:
                pass
    raise KeyError(key)


def _expected(spec: dict) -> str:
    parts = []
    if "value" in spec:
        parts.append(f"{spec['value']:g} ± {spec['abs_tol']:g}")
    if "min" in spec:
        parts.append(f">= {spec['min']:g}")
    if "max" in spec:
        parts.append(f"<= {spec['max']:g}")
    return " and ".join(parts)


def check(summary: dict, baseline: dict) -> list[dict]:
    """One row per gated key: does the summary stay within its tolerance?"""
    rows = []
    for key, spec in baseline.items():
        problem = _spec_problem(spec)
        if problem:
            raise DataError(f"baseline key {key!r}: {problem}")
        try:
            got = _lookup(summary, key)
        except KeyError:
            got = None
        ok = isinstance(got, (int, float)) and not isinstance(got, bool) and not math.isnan(got)
        if ok and "value" in spec:
            # Tiny slack so a value exactly on the tolerance edge is not lost to float rounding.
            ok = abs(got - spec["value"]) <= spec["abs_tol"] + 1e-12 * max(1.0, abs(spec["value"]))
        if ok and "min" in spec:
            ok = got >= spec["min"]
        if ok and "max" in spec:
            ok = got <= spec["max"]
        rows.append({"key": key, "expected": _expected(spec), "got": got, "ok": bool(ok)})
    return rows


def _fmt_got(got) -> str:
    if got is None:
        return "missing"
    if isinstance(got, (int, float)) and not isinstance(got, bool):
        return f"{got:.6g}"
    return repr(got)


def format_check(rows: list[dict]) -> str:
    """Markdown table of check() rows, failures marked FAIL."""
    df = pd.DataFrame(
        [
            {
                "key": r["key"],
                "expected": r["expected"],
                "got": _fmt_got(r["got"]),
                "ok": "ok" if r["ok"] else "FAIL",
            }
            for r in rows
        ],
        columns=["key", "expected", "got", "ok"],
    )
    return _markdown(df) + "\n"
