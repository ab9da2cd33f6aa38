"""The papers' reported numbers, and our runs of the same cells beside them.

``results/papers/<paper>.yaml`` transcribes a paper's tables row by row, as printed. A table names
its ``protocol`` (``bench ls protocols``), the ``statistic`` it reports (``mean`` of a per-image
metric, ``winrate`` against the base model on the same prompts and seeds, or ``set`` for a
set-level metric such as FID), a ``scale`` (the paper's value = ours x scale: DSPO prints win rates
in percent, 100) and its ``columns``, each mapped to one of our metrics. A row carries the paper's
label (``dataset``, ``row``), our ``suite``, ``model``, ``methods`` (the method presets whose runs
stand for the row; ``[base]`` for an untuned model; null with the paper's name where the harness has
none) and the protocol ``variant`` (``4-step``), and ``values`` by column. Table-level ``defaults``
fill any row field. ``paper_suite``, ``paper_model`` and ``paper_method`` give the paper's names
where ours are null.

A run matches a cell when its manifest's ``protocol`` record has the cell's protocol, suite,
variant and model, and its method is one of the cell's. Runs of the same method, model, scorers and
command-line overrides (``train.steps=2``, shown beside the row) form one row: their seeds (and
subjects) are pooled per prompt (the mean over images and seeds, or the win against the base image
of the same seed, ties one half, averaged over seeds), and the interval resamples prompts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from bench.errors import DataError
from bench.stats import bootstrap_mean_ci, wilson_interval

STATISTICS = ("mean", "winrate", "set")
ROW_FIELDS = {"row", "dataset", "suite", "paper_suite", "model", "paper_model", "methods", "paper_method", "variant", "values", "note"}


def default_dir() -> Path:
    """``results/papers`` of the source tree the package runs from."""
    return Path(__file__).resolve().parents[1] / "results" / "papers"


def load_papers(directory=None, only: list[str] | None = None) -> list[dict]:
    """Every cell of every paper file in ``directory`` (``<paper>.yaml``), in the papers' order."""
    import yaml

    directory = Path(directory) if directory is not None else default_dir()
    files = sorted(directory.glob("*.yaml"))
    if not files:
        raise DataError(f"no paper files (*.yaml) in {directory}; give papers=DIR")
    cells = []
    found = set()
    for path in files:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise DataError(f"cannot parse {path}: {str(err).splitlines()[0]}") from None
        paper = _paper_id(data, path)
        found.add(paper)
        if only and paper not in only:
            continue
        cells.extend(paper_cells(data, path))
    missing = sorted(set(only or []) - found)
    if missing:
        raise DataError(f"no paper file for {', '.join(missing)} in {directory} (papers: {', '.join(sorted(found))})")
    return cells


def _paper_id(data, path: Path) -> str:
    if not isinstance(data, dict) or "paper" not in data or "tables" not in data:
        raise DataError(f"{path}: a paper file is a mapping with 'paper' and 'tables'")
    if data["paper"] != path.stem:
        raise DataError(f"{path}: 'paper: {data['paper']}' differs from the file name")
    return str(data["paper"])


def paper_cells(data: dict, path: Path) -> list[dict]:
    """The cells of one paper file: one per (table, row, column) with a value."""
    cells = []
    for t, table in enumerate(data["tables"]):
        where = f"{path.name}, table {table.get('table', t)}"
        check_table(table, where)
        defaults = table.get("defaults") or {}
        for r, raw in enumerate(table["rows"]):
            row = {**defaults, **raw}
            rwhere = f"{where}, row {r + 1} ({row.get('row', '?')})"
            check_row(raw, row, rwhere)
            for column, value in row["values"].items():
                if column not in table["columns"]:
                    raise DataError(f"{rwhere}: value for unknown column '{column}' (columns: {', '.join(table['columns'])})")
                cells.append(paper_cell(data, table, row, str(column), value, rwhere))
    return cells


def check_table(table: dict, where: str) -> None:
    """A table's required keys, statistic, columns and row defaults, or one line naming the fault."""
    for key in ("table", "protocol", "statistic", "columns", "rows"):
        if key not in table:
            raise DataError(f"{where}: missing '{key}'")
    if table["statistic"] not in STATISTICS:
        raise DataError(f"{where}: statistic must be one of {', '.join(STATISTICS)}")
    for name, spec in table["columns"].items():
        if not isinstance(spec, dict) or not spec.get("metric"):
            raise DataError(f"{where}: column '{name}' names no metric")
    unknown = set(table.get("defaults") or {}) - ROW_FIELDS
    if unknown:
        raise DataError(f"{where}: unknown default field(s) {sorted(unknown)}")


def check_row(raw: dict, row: dict, where: str) -> None:
    """A row (``raw`` as written, ``row`` with the table's defaults): known fields, what names our
    suite, model and methods or the paper's."""
    if set(raw) - ROW_FIELDS:
        raise DataError(f"{where}: unknown field(s) {sorted(set(raw) - ROW_FIELDS)}")
    for key in ("row", "values", "variant"):
        if key not in row:
            raise DataError(f"{where}: missing '{key}'")
    for ours, theirs in (("suite", "paper_suite"), ("model", "paper_model"), ("methods", "paper_method")):
        if row.get(ours) is None and not row.get(theirs) and not (ours == "methods" and row.get("row")):
            raise DataError(f"{where}: '{ours}' is null and '{theirs}' does not name the paper's")
    methods = row.get("methods")
    if methods is not None and (not isinstance(methods, list) or not methods):
        raise DataError(f"{where}: 'methods' is a non-empty list of method presets ([base] for an untuned model) or null")


def paper_cell(data: dict, table: dict, row: dict, column: str, value, where: str) -> dict:
    """One reported number with everything that says what it measured."""
    spec = table["columns"][column]
    note = None
    if isinstance(value, dict):
        value, note = value.get("value"), value.get("note")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(f"{where}: column '{column}': value {value!r} is not a number")
    methods = row.get("methods")
    return {
        "paper": str(data["paper"]),
        "table": str(table["table"]),
        "protocol": table["protocol"],
        "statistic": spec.get("statistic", table["statistic"]),
        "scale": float(spec.get("scale", table.get("scale", 1))),
        "row": f"{row['dataset']} / {row['row']}" if row.get("dataset") else str(row["row"]),
        "column": column,
        "value": float(value),
        "metric": spec["metric"],
        "suite": row.get("suite"),
        "paper_suite": row.get("paper_suite") or row.get("dataset"),
        "model": row.get("model"),
        "paper_model": row.get("paper_model"),
        "methods": list(methods) if methods else None,
        "paper_method": row.get("paper_method") or str(row["row"]),
        "variant": str(row["variant"]),
        "notes": [n for n in (spec.get("note"), row.get("note"), note) if n],
    }


# --------------------------------------------------------------------------- our runs


def protocol_runs(root) -> tuple[list[dict], dict[str, Path]]:
    """Every finished protocol run under ``root`` (the checkpoint a selection kept, not the others),
    and every run folder by run id (win rates read their base run)."""
    root = Path(root)
    runs, folders = [], {}
    for manifest_path in sorted(root.rglob("manifest.json")) if root.exists() else []:
        folder = manifest_path.parent
        if not (folder / "summary.json").exists():
            continue
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
            summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"cannot read the run in {folder}: {err}; re-run it or remove it") from None
        if "run_id" in manifest:
            folders[manifest["run_id"]] = folder
        proto = manifest.get("protocol")
        if not proto or not (proto.get("selection") or {}).get("selected", True):
            continue
        config = manifest.get("config") or {}
        method = "base" if manifest.get("method") == "base" else (config.get("method") or {}).get("name", manifest.get("method"))
        runs.append(
            {
                "folder": folder,
                "manifest": manifest,
                "summary": summary,
                "protocol": proto,
                "method": method,
                "model": manifest.get("model"),
                "scorers": manifest.get("scorers", "official"),
                "mtime": (folder / "summary.json").stat().st_mtime,
            }
        )
    return runs, folders


def matches(cell: dict, run: dict) -> bool:
    p = run["protocol"]
    return (
        cell["methods"] is not None
        and p.get("name") == cell["protocol"]
        and p.get("suite") == cell["suite"]
        and p.get("variant") == cell["variant"]
        and p.get("model") == cell["model"]
        and run["method"] in cell["methods"]
        and (cell["metric"] in run["summary"].get("metrics", {}) or cell["metric"] in (run["summary"].get("sets") or {}))
    )


def _scores(folder: Path, metric: str) -> pd.Series:
    """Per-prompt means of one metric of a run (NaN rows, prompts a scoped metric skips, dropped)."""
    path = folder / "scores.parquet"
    if not path.exists():
        raise DataError(f"{folder} has no scores.parquet: re-run it (the papers' leaderboard resamples prompts from the per-image scores)")
    frame = pd.read_parquet(path, columns=["prompt_index", metric]).dropna()
    return frame.groupby("prompt_index")[metric].mean()


def ours(cell: dict, runs: list[dict], folders: dict[str, Path]) -> dict:
    """Our value of a cell from its runs (one per seed and subject): the mean and its interval over prompts."""
    metric = cell["metric"]
    first = runs[0]
    stats = (first["manifest"].get("config") or {}).get("stats") or {"n_boot": 1000, "level": 0.95, "seed": 0}
    out = {"level": float(stats["level"]), "seeds": sorted({r["protocol"].get("seed") for r in runs}), "n_seeds_protocol": len(first["protocol"].get("seeds") or [None])}
    if cell["statistic"] == "set" or metric in (first["summary"].get("sets") or {}):
        entries = [r["summary"]["sets"][metric] for r in runs if r["summary"]["sets"][metric]["value"] is not None]
        ci = entries[0].get("ci") if len(entries) == 1 else None  # one run: its prompt-half interval (bench.distribution); several seeds: none
        return out | {"value": float(np.mean([e["value"] for e in entries])) if entries else None, "ci": tuple(ci) if ci else None, "n_prompts": None}
    units = []
    for r in runs:
        subject = r["protocol"].get("subject") or ""
        run_pp = _scores(r["folder"], metric)
        if cell["statistic"] == "winrate":
            base_id = r["manifest"].get("baseline")
            if base_id not in folders:
                raise DataError(f"the base run {base_id} of {r['folder'].name} is not under the leaderboard's folder; a win rate needs both")
            base_pp = _scores(folders[base_id], metric).reindex(run_pp.index)
            higher = bool(r["summary"]["metrics"][metric]["higher_is_better"])
            better = (run_pp > base_pp) if higher else (run_pp < base_pp)
            values = np.where(run_pp.to_numpy() == base_pp.to_numpy(), 0.5, better.to_numpy(dtype=float))
            run_pp = pd.Series(values, index=run_pp.index)[base_pp.notna()]
        units.append(pd.DataFrame({"subject": subject, "prompt_index": run_pp.index, "v": run_pp.to_numpy()}))
    per_prompt = pd.concat(units).groupby(["subject", "prompt_index"])["v"].mean()  # seeds pooled per prompt
    if cell["statistic"] == "winrate":  # Wilson's interval on the prompts' (seed-averaged) wins: never [1, 1] when every prompt wins
        mean, (lo, hi) = float(per_prompt.mean()), wilson_interval(float(per_prompt.sum()), len(per_prompt), float(stats["level"]))
    else:
        mean, (lo, hi) = bootstrap_mean_ci(per_prompt.to_numpy(), int(stats["n_boot"]), float(stats["level"]), int(stats["seed"]))
    return out | {"value": mean, "ci": (lo, hi) if len(per_prompt) > 1 else None, "n_prompts": int(len(per_prompt))}


def compare(cells: list[dict], runs: list[dict], folders: dict[str, Path]) -> list[dict]:
    """One record per cell without a run (``reported``), and per group of runs of a cell (``compared``)."""
    records = []
    for cell in cells:
        base = {
            "paper": cell["paper"], "table": cell["table"], "row": cell["row"], "column": cell["column"],
            "suite": cell["suite"] or f"({cell['paper_suite']})",
            "variant": cell["variant"],
            "model": cell["model"] or f"({cell['paper_model']})",
            "metric": cell["metric"], "statistic": cell["statistic"], "reported": cell["value"],
        }
        groups: dict[tuple, dict] = {}
        for run in (r for r in runs if matches(cell, r)):
            key = (run["method"], run["model"], run["scorers"], tuple(run["protocol"].get("overrides") or []))
            slot = (run["protocol"].get("seed"), run["protocol"].get("subject"))
            group = groups.setdefault(key, {})
            if slot not in group or run["mtime"] > group[slot]["mtime"]:  # a cell re-run: its newest run
                group[slot] = run
        if not groups:
            methods = "/".join(cell["methods"]) if cell["methods"] else f"({cell['paper_method']})"
            records.append(base | {"method": methods, "status": "reported"})
            continue
        for (method, model, scorers, overrides), group in sorted(groups.items()):
            got = ours(cell, list(group.values()), folders)
            scale = cell["scale"]
            value = None if got["value"] is None else got["value"] * scale
            ci = None if got["ci"] is None else tuple(sorted(c * scale for c in got["ci"]))
            notes = []
            if model != cell["model"]:
                notes.append(f"stand-in model {model}")
            if scorers != "official":
                notes.append(f"scorers={scorers}: scores NOT meaningful")
            if len(got["seeds"]) < got["n_seeds_protocol"]:
                notes.append(f"{len(got['seeds'])} of {got['n_seeds_protocol']} seeds")
            if any(r["manifest"].get("published_prompt_set") is False for r in group.values()):
                notes.append("not the published prompt set")
            if overrides:
                notes.append("overrides: " + " ".join(overrides))
            records.append(
                base
                | {
                    "method": method,
                    "status": "compared",
                    "ours": value,
                    "ci_low": ci[0] if ci else None,
                    "ci_high": ci[1] if ci else None,
                    "level": got["level"],
                    "difference": None if value is None else value - cell["value"],
                    "inside": None if ci is None else bool(ci[0] <= cell["value"] <= ci[1]),
                    "prompts": got["n_prompts"],
                    "seeds": len(got["seeds"]),
                    "note": "; ".join(notes),
                }
            )
    return records


COLUMNS = ["paper", "table", "row", "column", "suite", "variant", "model", "method", "metric", "statistic", "reported", "ours", "ci_low", "ci_high", "level", "difference", "inside", "status", "prompts", "seeds", "note"]


def frame(records: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(records, columns=COLUMNS)
    for column in ("prompts", "seeds"):  # counts stay integers beside the reported rows' blanks
        df[column] = df[column].astype("Int64")
    return df


def _num(x, signed=False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:+.4g}" if signed else f"{x:.4g}"


def render(df: pd.DataFrame) -> str:
    """The markdown table: per cell the reported value, ours with its interval, the difference and
    whether the reported value lies inside our interval; cells we have not run are marked reported."""
    from bench.report import _markdown

    levels = {float(v) for v in df["level"].dropna()}
    pct = f"{next(iter(levels)) * 100:g}% CI" if len(levels) == 1 else "CI"
    rows = []
    for r in df.to_dict("records"):
        has_ci = r["ci_low"] is not None and not (isinstance(r["ci_low"], float) and math.isnan(r["ci_low"]))
        inside = r["inside"]
        rows.append(
            {
                "paper": r["paper"], "table": r["table"], "row": r["row"], "column": r["column"], "suite": r["suite"], "variant": r["variant"],
                "model": r["model"], "method": r["method"], "metric": r["metric"],
                "reported": _num(r["reported"]),
                "ours": _num(r["ours"]),
                f"ours {pct}": f"[{_num(r['ci_low'])}, {_num(r['ci_high'])}]" if has_ci else "-",
                "difference": _num(r["difference"], signed=True),
                "inside": "-" if inside is None or (isinstance(inside, float) and math.isnan(inside)) else ("yes" if inside else "no"),
                "status": r["status"],
                "note": r["note"] if isinstance(r["note"], str) else "",
            }
        )
    n_cells = len(df[["paper", "table", "row", "variant", "column"]].drop_duplicates())
    n_compared = int((df["status"] == "compared").sum())
    head = (
        f"# Paper numbers beside ours\n\n{n_cells} reported cells from {df['paper'].nunique()} paper(s); {n_compared} rows of ours "
        "(mean over prompts of the per-prompt mean over images and seeds, or of the win against the base image of the same seed, "
        "ties one half; intervals resample prompts; values in the paper's units)\n\n"
    )
    return head + _markdown(pd.DataFrame(rows)) + "\n"
