"""leaderboard.html: the leaderboard's table as a static page, sortable by clicking a header.

Beside leaderboard.md's columns it shows, per run, the number of prompts, the seeds, the prompt set, a
link to the run's report.html, the means per group (a PartiPrompts category, a DreamBench subject; shown
with a checkbox) and marks for what limits a number: random tiny scorers, a prompt subset, a list that is
not the published one, non-canonical metrics. Every string is escaped (jinja2's autoescaping).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pandas as pd

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


def write(df: pd.DataFrame, root, out_dir) -> Path:
    """leaderboard.html beside leaderboard.md."""
    values, group_cols, table = rows(df, run_facts(Path(root), Path(out_dir)))
    html = environment().get_template("leaderboard.html.j2").render(values=values, group_cols=group_cols, rows=table, marks=MARKS)
    return write_text(Path(out_dir) / "leaderboard.html", html)
