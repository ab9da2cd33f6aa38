"""leaderboard.html: the leaderboard's table as a static page, sortable by clicking a header.

Beside leaderboard.md's columns it shows, per run, the number of prompts, the seeds, the prompt set, a
link to the run's report.html, the means per group (a PartiPrompts category, a DreamBench subject; shown
with a checkbox) and marks for what limits a number: random tiny scorers, a prompt subset, a list that is
not the published one, non-canonical metrics; under it, for a protocol that evaluates every kept checkpoint,
each metric's difference from the base over the training. Every string is escaped (jinja2's autoescaping).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

from bench.charts import checkpoint_chart
from bench.html_report import NON_CANONICAL, environment, fmt
from bench.io import write_text

MARKS = {
    "tiny": "scorers=tiny: random tiny scorers, scores NOT meaningful",
    "subset": "a prompt subset (suite.limit)",
    "unpublished": "the prompts are not the suite's published list",
    "non-canonical": "a metric that differs from its published recipe",
}


def _json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def run_facts(root: Path, page_dir: Path) -> dict[str, dict]:
    """run_id -> what the leaderboard shows beside the numbers, read from each run's manifest and summary
    (a seed sweep's from its first run); its report.html as a link relative to ``page_dir``."""
    folders = {}
    for manifest_path in sorted(Path(root).rglob("manifest.json")):
        if manifest_path.with_name("summary.json").exists():
            folders[_json(manifest_path).get("run_id", manifest_path.parent.name)] = manifest_path.parent
    out = {}
    for run_id, folder in folders.items():
        manifest, summary = _json(folder / "manifest.json"), _json(folder / "summary.json")
        sweep = manifest.get("sweep")
        member = _json(folders[sweep["runs"][0]] / "manifest.json") if sweep and sweep.get("runs") and sweep["runs"][0] in folders else manifest
        out[run_id] = _facts(folder, Path(page_dir), member, summary, manifest.get("scorers", member.get("scorers", "official")))
    return out


def _facts(folder: Path, page_dir: Path, manifest: dict, summary: dict, scorers: str) -> dict:
    suite_cfg = (manifest.get("config") or {}).get("suite") or {}
    non_canonical = sorted(n for n, m in (manifest.get("metrics") or {}).items() if NON_CANONICAL in str(m.get("scale", "")).upper())
    marks = [("tiny", MARKS["tiny"])] if scorers != "official" else []
    marks += [("subset", f"{MARKS['subset']}: the first {suite_cfg['limit']}")] if suite_cfg.get("limit") else []
    marks += [("unpublished", MARKS["unpublished"])] if manifest.get("published_prompt_set") is False else []
    marks += [("non-canonical", f"{MARKS['non-canonical']}: {', '.join(non_canonical)}")] if non_canonical else []
    groups = {}
    for table in summary.get("by_group") or []:
        for metric, means in (table.get("means") or {}).items():
            for group, value in means.items():
                groups[f"{metric} [{table['by']}: {group}]"] = value
    report = folder / "report.html"
    return {
        "n_prompts": manifest.get("n_prompts", summary.get("n_prompts")),
        "seeds": f"seed {(manifest.get('seeds') or {}).get('base_seed', '?')}, {(manifest.get('identity') or {}).get('images_per_prompt', '?')}/prompt",
        "prompt_set": f"{manifest.get('suite', '?')}: {manifest.get('prompt_source', '?')}",
        "marks": marks, "groups": groups,
        "report": Path(os.path.relpath(report.resolve(), page_dir.resolve())).as_posix() if report.exists() else None,
    }


def _cell(value, sd=None, verdict=None) -> dict:
    """A table cell: its text (as leaderboard.md writes it) and the number it sorts by."""
    from bench.report import VERDICT_MARKS

    number = None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)
    text = fmt(number) + VERDICT_MARKS.get(verdict, "") + ("" if sd is None or pd.isna(sd) else f" ± {fmt(sd)}")
    return {"text": text, "sort": number}


def rows(df: pd.DataFrame, facts: dict[str, dict]) -> tuple[list[str], list[str], list[dict]]:
    """(value columns, group columns, rows) of the page from ``report.collect_runs``'s frame."""
    from bench.report import RUN_COLUMNS

    values = [c for c in df.columns[len(RUN_COLUMNS):] if c != "seeds" and not c.endswith((" sd", " verdict"))]
    group_cols = sorted({g for f in facts.values() for g in f["groups"]})
    out = []
    for record in df.to_dict("records"):
        f = facts.get(record["run_id"], {"groups": {}, "marks": []})
        cells = [_cell(record[c], record.get(f"{c} sd"), record.get(f"{c} verdict")) for c in values]
        out.append({
            **{k: record[k] for k in RUN_COLUMNS}, "facts": f, "cells": cells,
            "seeds": record.get("seeds") if isinstance(record.get("seeds"), str) else f.get("seeds", "-"),
            "groups": [_cell(f["groups"].get(g)) for g in group_cols],
        })
    return values, group_cols, out


def checkpoint_charts(root: Path) -> list[str]:
    """One chart per training whose kept checkpoints a protocol evaluated (``checkpoint_step`` in the
    manifest): each metric's paired difference from the base at every step, with its interval."""
    trainings: dict[tuple, dict[int, dict]] = {}
    for manifest_path in sorted(Path(root).rglob("manifest.json")):
        manifest, summary = _json(manifest_path), _json(manifest_path.with_name("summary.json"))
        step = (manifest.get("protocol") or {}).get("checkpoint_step")
        if step is None or not summary.get("delta"):
            continue
        method = str(manifest.get("method", "?")).split("@step")[0]
        cell = manifest["protocol"]
        where = ", ".join(str(x) for x in (cell.get("variant"), f"seed {cell['seed']}" if "seed" in cell else None, cell.get("subject")) if x)
        key = (cell.get("name", "?"), manifest.get("suite", "?"), manifest.get("model", "?"), method, where)
        order = ((manifest.get("config") or {}).get("suite") or {}).get("metrics") or []  # the suite's order: the reward first, where it comes first
        trainings.setdefault(key, {})[int(step)] = dict(sorted(summary["delta"].items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))
    charts = []
    for (protocol, suite, model, method, where), by_step in sorted(trainings.items()):
        steps = sorted(by_step)
        metrics = list(by_step[steps[-1]])
        series = {m: [(d["value"], *d["ci"]) if (d := by_step[s].get(m)) else None for s in steps] for m in metrics}
        charts.append(checkpoint_chart(f"{method} on {suite} ({model}, {where}), protocol {protocol}", steps, series))
    return charts


def write(df: pd.DataFrame, root, out_dir) -> Path:
    """leaderboard.html beside leaderboard.md."""
    values, group_cols, table = rows(df, run_facts(Path(root), Path(out_dir)))
    html = environment().get_template("leaderboard.html.j2").render(values=values, group_cols=group_cols, rows=table, marks=MARKS, charts=checkpoint_charts(Path(root)))
    return write_text(Path(out_dir) / "leaderboard.html", html)
