"""report.html: one self-contained static page per run (or per comparison of runs).

It opens from disk with no server and no network: images are inline thumbnails (data URIs), charts are
inline SVG (``bench.charts``), sorting and filtering a small inline script. Every user string (prompts
are raw user text in Pick-a-Pic) goes through jinja2's autoescaping, and the grid's data reaches the
script as JSON that cannot close its ``<script>`` element. The page holds no timestamp, so the same run
writes the same bytes.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bench import charts
from bench.errors import DataError
from bench.generate import ImageStore
from bench.io import cache_root, write_text
from bench.trainlog import finite_number, read_train_log, train_log_path

THUMB_PX = 256  # an image larger than this is embedded downscaled, as JPEG
JPEG_QUALITY = 85
NON_CANONICAL = "NON-CANONICAL"  # how a metric's scale text marks a recipe that differs from the published one
ID_COLUMNS = ["prompt_index", "image_index", "prompt", "seed", "image_key"]
CURVE_FIRST = ["loss", "lr"]
CURVE_SKIP = {"step", "round"}  # a round counter is no curve


@dataclass
class RunView:
    """A finished run folder as the report reads it."""

    folder: Path
    manifest: dict
    summary: dict
    scores: pd.DataFrame
    store: ImageStore

    @property
    def run_id(self) -> str:
        return self.manifest.get("run_id", self.folder.name)

    @property
    def label(self) -> str:
        return str(self.manifest.get("method", self.folder.name))

    @property
    def metrics(self) -> list[str]:
        """The per-image metrics, in the summary's order (set-level ones have no column)."""
        return [m for m in self.summary.get("metrics", {}) if m in self.scores.columns]

    @property
    def groups(self) -> list[str]:
        return [c for c in self.scores.columns if c not in ID_COLUMNS and c not in self.summary.get("metrics", {})]


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read {path} ({err}); point run= at a finished run folder (manifest.json, summary.json, scores.parquet)") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a JSON object; point run= at a finished run folder")
    return obj


def load_run(folder, cache_dir=None) -> RunView:
    """A run folder with its manifest, summary and scores; the images are looked up in ``cache_dir``'s
    store, by default the store the run used (its manifest's ``image_store``; an older manifest: its
    config's ``cache_dir``, else $BENCH_HOME)."""
    folder = Path(folder)
    if not (folder / "summary.json").is_file():
        raise DataError(f"run={folder} holds no summary.json: point run= at a finished run folder (bench run / bench eval print it)")
    manifest, summary = _read_json(folder / "manifest.json"), _read_json(folder / "summary.json")
    try:
        scores = pd.read_parquet(folder / "scores.parquet")
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {folder / 'scores.parquet'} ({err}); re-run the evaluation") from None
    store = Path(cache_dir) / "images" if cache_dir else Path(manifest["image_store"]) if manifest.get("image_store") else cache_root(manifest.get("config") or {}) / "images"
    return RunView(folder, manifest, summary, scores, ImageStore(store))


def with_baseline(runs: list[RunView], cache_dir=None) -> list[RunView]:
    """One run compared with a base: its base run folder (a sibling, as `bench run` leaves it) goes first."""
    if len(runs) != 1 or not runs[0].manifest.get("baseline"):
        return runs
    base = runs[0].folder.parent / runs[0].manifest["baseline"]
    return [load_run(base, cache_dir), *runs] if (base / "summary.json").is_file() else runs


# --------------------------------------------------------------------------- images


def thumbnail(path: Path) -> tuple[str, int] | None:
    """The image as a data URI and its side in pixels: as stored (PNG) up to THUMB_PX, else downscaled to
    THUMB_PX as JPEG; None when the file is missing or unreadable."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, ValueError):
        return None
    buf = io.BytesIO()
    if max(im.size) <= THUMB_PX:
        im.save(buf, format="PNG", optimize=True)
        kind = "png"
    else:
        im.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
        im.save(buf, format="JPEG", quality=JPEG_QUALITY)
        kind = "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(buf.getvalue()).decode()}", max(im.size)


def display_px(side: int) -> int:
    """The on-page size of a thumbnail: small images enlarged by a whole factor to at least 96 px, large ones at 192."""
    return side * max(1, -(-96 // max(side, 1))) if side < 96 else min(side, 192)


# --------------------------------------------------------------------------- the grid


@dataclass
class Grid:
    """The image grid: prompts in their order, each with its columns (same prompt index and seed) of one cell per run."""

    prompts: list[dict] = field(default_factory=list)
    n_prompts: int = 0
    n_images: int = 0
    missing: int = 0
    groups: dict[str, list[str]] = field(default_factory=dict)


def per_prompt(run: RunView, metric: str) -> pd.Series:
    """The run's mean per prompt of ``metric`` (empty where the run lacks the metric)."""
    if metric not in run.scores.columns:
        return pd.Series(dtype=float)
    return run.scores.groupby("prompt_index")[metric].mean()


def prompt_gains(runs: list[RunView], metrics: list[str], higher: dict[str, bool]) -> dict[str, pd.Series]:
    """Per metric, each prompt's mean in the last run minus the first's, signed so a gain is positive
    (one run: its own mean, signed the same way); NaN where a run lacks the prompt."""
    out = {}
    for m in metrics:
        last = per_prompt(runs[-1], m)
        value = last - per_prompt(runs[0], m) if len(runs) > 1 else last
        out[m] = value if higher[m] else -value
    return out


def check_prompts(runs: list[RunView]) -> dict[int, str]:
    """Prompt index -> text, the same in every run (a comparison pairs images by prompt index and seed)."""
    texts: dict[int, str] = {}
    for run in runs:
        for index, text in run.scores.groupby("prompt_index")["prompt"].first().items():
            if texts.setdefault(int(index), text) != text:
                raise DataError(
                    f"runs {runs[0].run_id} and {run.run_id} have different prompts at index {index} ({texts[int(index)]!r} vs {text!r}): "
                    "compare runs of the same suite and prompt list"
                )
    return texts


def chosen_prompts(gains: dict[str, pd.Series], texts: dict[int, str], metrics: list[str], max_prompts: int) -> list[int]:
    """Every prompt when they fit, else the ``max_prompts`` with the largest |gain| on the first metric, in prompt order."""
    order = sorted(texts)
    if len(order) <= max_prompts or not metrics:
        return order[:max_prompts]
    size = gains[metrics[0]].reindex(order).abs().fillna(-1.0)
    top = sorted(order, key=lambda i: (-size[i], i))[:max_prompts]
    return sorted(top)


def build_grid(runs: list[RunView], metrics: list[str], higher: dict[str, bool], max_prompts: int) -> Grid:
    """One entry per shown prompt: text, groups, gains and its columns of cells (a thumbnail or a missing note)."""
    texts = check_prompts(runs)
    gains = prompt_gains(runs, metrics, higher)
    shown = chosen_prompts(gains, texts, metrics, max_prompts)
    grid = Grid(n_prompts=len(texts))
    group_cols = list(dict.fromkeys(c for run in runs for c in run.groups))
    rows = {k: dict(iter(run.scores[run.scores["prompt_index"].isin(shown)].groupby("prompt_index"))) for k, run in enumerate(runs)}
    thumbs: dict[str, tuple[str, int] | None] = {}
    for index in shown:
        frames = {k: by[index] for k, by in rows.items() if index in by}
        first = next(iter(frames.values()))
        labels = {c: str(first[c].iloc[0]) for c in group_cols if c in first.columns}
        for c, label in labels.items():
            grid.groups.setdefault(c, []).append(label)
        grid.prompts.append({
            "index": index, "text": texts[index], "groups": labels,
            "gains": {m: finite_number(gains[m].get(index)) for m in metrics},
            "columns": _columns(runs, frames, metrics, thumbs, grid),
        })
    grid.groups = {c: sorted(set(v)) for c, v in grid.groups.items()}
    return grid


def _columns(runs, frames: dict[int, pd.DataFrame], metrics: list[str], thumbs: dict, grid: Grid) -> list[dict]:
    """The prompt's columns, one per (image index, seed): a cell per run, None where a run has no such image."""
    keys = sorted({(int(r.image_index), int(r.seed)) for f in frames.values() for r in f.itertuples()})
    columns = []
    for image_index, seed in keys:
        cells = []
        for k, run in enumerate(runs):
            frame = frames.get(k)
            match = frame[(frame["image_index"] == image_index) & (frame["seed"] == seed)] if frame is not None else None
            if match is None or match.empty:
                cells.append(None)
                continue
            row = match.iloc[0]
            key = str(row["image_key"])
            if key not in thumbs:
                thumbs[key] = thumbnail(run.store.path(key))
            thumb = thumbs[key]
            grid.n_images += 1
            grid.missing += thumb is None
            cells.append({
                "run": k, "key": key, "src": thumb[0] if thumb else None, "px": display_px(thumb[1]) if thumb else 96,
                "where": str(run.store.path(key)), "scores": {m: x for m in metrics if m in row.index and (x := finite_number(row[m])) is not None},  # a scoped metric: its prompts only
            })
        columns.append({"image_index": image_index, "seed": seed, "cells": cells})
    return columns


def fmt(x, signed: bool = False) -> str:
    """4 significant digits as the tables print them; '-' for a missing value."""
    x = finite_number(x)
    if x is None:
        return "-"
    return f"{x:+.4g}" if signed else f"{x:.4g}"


# --------------------------------------------------------------------------- tables and notes


def headline(runs: list[RunView]) -> list[dict]:
    """Per metric, a row per run: mean and interval, and against the run's base the paired difference
    (its interval, Holm-corrected p, verdict mark), the win rate and the smallest detectable difference."""
    from bench.report import VERDICT_MARKS

    names = list(dict.fromkeys(m for run in runs for m in run.summary.get("metrics", {})))
    out = []
    for name in names:
        rows, info = [], None
        for run in runs:
            m = run.summary["metrics"].get(name)
            if m is None:
                continue
            info = info or m
            d, w = (run.summary.get("delta") or {}).get(name), (run.summary.get("winrate") or {}).get(name)
            rows.append({
                "run": run.label, "run_id": run.run_id, "mean": fmt(m.get("mean")), "ci": _interval(m.get("ci")),
                "delta": fmt(d["value"], signed=True) if d else "", "delta_ci": _interval(d.get("ci")) if d else "",
                "mark": VERDICT_MARKS.get(d.get("verdict"), "") if d else "", "verdict": d.get("verdict", "") if d else "",
                "p": fmt(d.get("p_holm")) if d else "", "baseline": d.get("baseline", "") if d else "",
                "win": fmt(w["value"]) if w else "", "win_ci": _interval(w.get("ci")) if w else "",
                "wtl": f"{w.get('wins')}/{w.get('ties')}/{w.get('losses')}" if w else "",
                "detectable": f"±{(d or m)['detectable']:.2g}" if finite_number((d or m).get("detectable")) is not None else "-",
            })
        out.append({"name": name, "direction": "↑" if info.get("higher_is_better") else "↓", "scale": info.get("scale", ""),
                    "version": info.get("version", ""), "non_canonical": NON_CANONICAL in str(info.get("scale", "")).upper(), "rows": rows})
    return out


def set_rows(runs: list[RunView]) -> list[dict]:
    """The set-level metrics (FID, KID) of every run: value, interval, KID's subset std, the base's value."""
    from bench.report import protocol_text

    return [
        {"run": run.label, "name": name, "value": fmt(e.get("value")), "ci": _interval(e.get("ci")), "std": fmt(e.get("std")),
         "baseline": fmt(e.get("baseline")), "direction": "↑" if e.get("higher_is_better") else "↓", "protocol": protocol_text(e.get("protocol") or {})}
        for run in runs for name, e in (run.summary.get("sets") or {}).items()
    ]


def _interval(ci) -> str:
    return f"[{fmt(ci[0])}, {fmt(ci[1])}]" if isinstance(ci, (list, tuple)) and len(ci) == 2 else ""


def protocol(runs: list[RunView]) -> list[tuple[str, list[str]]]:
    """The protocol at a glance, one row per fact and one column per run."""
    facts = [_facts(run) for run in runs]
    return [(name, [f.get(name, "-") for f in facts]) for name in dict.fromkeys(n for f in facts for n in f)]


def _facts(run: RunView) -> dict[str, str]:
    m, cfg = run.manifest, run.manifest.get("config") or {}
    model, sampler, suite = cfg.get("model") or {}, (m.get("identity") or {}).get("sampler") or {}, cfg.get("suite") or {}
    published = {True: "yes, the published list", False: "NO: differs from the published list", None: "no published list to compare"}
    limit = suite.get("limit")
    facts = {
        "run folder": run.run_id,
        "model": f"{m.get('model', '?')} ({model.get('source', '?')}" + (f" @ {model['revision']}" if model.get("revision") else "") + ")",
        "sampler": f"{sampler.get('kind', '?')}" + (f", eta {sampler['eta']}" if sampler.get("eta") is not None else "")
                   + (f", timesteps {sampler['timesteps']}" if sampler.get("timesteps") else ""),
        "steps": str(sampler.get("steps", "-")), "guidance": str(sampler.get("guidance", "-")),
        "resolution": f"{model.get('resolution', '?')} px", "dtype / device": f"{m.get('dtype', '?')} / {m.get('device', '?')}",
        "seeds": f"base seed {(m.get('seeds') or {}).get('base_seed', '?')}, {(m.get('identity') or {}).get('images_per_prompt', '?')} image(s) per prompt",
        "prompt set": f"{m.get('suite', '?')}: {m.get('n_prompts', '?')} prompts" + (f" (suite.limit={limit}: the first {limit})" if limit else "")
                      + f" from {m.get('prompt_source', '?')}",
        "published prompt set": published.get(m.get("published_prompt_set"), str(m.get("published_prompt_set"))),
        "scorers": str(m.get("scorers", "official")),
        "metric versions": ", ".join(f"{n} {v.get('version', '?')}" + (f" ({v['model_id']})" if v.get("model_id") else "") for n, v in (m.get("metrics") or {}).items()),
    }
    ckpt = m.get("checkpoint")
    if ckpt:
        tc = cfg.get("train") or {}
        facts["checkpoint"] = f"{run.label} {ckpt.get('train_id', '?')}: {tc.get('steps', '?')} steps, lr {tc.get('lr', '?')}, batch {tc.get('batch_size', '?')}" \
                              + (f", LoRA rank {tc['lora_rank']}" if tc.get("lora_rank") and not tc.get("full_finetune") else ", full fine-tuning")
    facts["git revision"] = str(m.get("git_revision") or "-")[:12]
    return facts


def warnings(runs: list[RunView], grid: Grid, max_prompts: int) -> list[str]:
    """Everything that limits what the numbers mean: random tiny scorers, a prompt subset or a list that is not
    the published one, non-canonical metrics, runs on different seeds, missing images, a capped grid."""
    out = []
    for run in runs:
        m, suite = run.manifest, (run.manifest.get("config") or {}).get("suite") or {}
        if m.get("scorers", "official") != "official":
            out.append(f"{run.run_id}: scorers={m['scorers']}: random tiny scorers, the scores are NOT meaningful")
        if suite.get("limit"):
            out.append(f"{run.run_id}: a prompt subset: the first {suite['limit']} prompts of suite {m.get('suite')} (suite.limit={suite['limit']})")
        if m.get("published_prompt_set") is False:
            out.append(f"{run.run_id}: the prompts ({m.get('prompt_source')}) are not the published list of suite {m.get('suite')} (count or sha256 differ)")
        for name, info in (m.get("metrics") or {}).items():
            if NON_CANONICAL in str(info.get("scale", "")).upper():
                out.append(f"{run.run_id}: metric {name} is non-canonical: {info['scale']}")
        if m.get("n_empty_prompts"):
            out.append(f"{run.run_id}: {m['n_empty_prompts']} empty prompt(s) kept")
    if len({(r.manifest.get("seeds") or {}).get("base_seed") for r in runs}) > 1:
        out.append("the runs use different base seeds: only images of the same prompt index and seed share a column")
    if grid.missing:
        out.append(f"{grid.missing} of {grid.n_images} images are not in the image store (cache deleted or moved; "
                   "`bench report cache_dir=DIR` names another): their cells say so")
    if len(grid.prompts) < grid.n_prompts:
        out.append(f"the grid shows {len(grid.prompts)} of {grid.n_prompts} prompts: those with the largest |difference| on the first metric (report.max_prompts={max_prompts})")
    return list(dict.fromkeys(out))


# --------------------------------------------------------------------------- charts


def mean_charts(runs: list[RunView]) -> list[dict]:
    """A bar chart per metric of every run's mean with its interval, then per group column and metric the
    groups' means with their intervals."""
    out = []
    labels = [f"{r.label} ({r.run_id[-8:]})" for r in runs]
    for name in dict.fromkeys(m for run in runs for m in run.summary.get("metrics", {})):
        series = {lab: [_bar(run.summary["metrics"].get(name))] for lab, run in zip(labels, runs)}
        out.append({"kind": "means", "title": f"{name}: mean", "svg": charts.interval_chart(f"{name}: mean, {_level(runs)} interval", ["all prompts"], series, name)})
        overall = {lab: (run.summary.get("overall") or {}).get("metrics", {}).get(name) for lab, run in zip(labels, runs)}
        if any(overall.values()):  # GenEval's overall score: the mean of the tag means
            by = next(run.summary["overall"]["by"] for run in runs if run.summary.get("overall"))
            title = f"{name}: overall score (mean of the {by} means), {_level(runs)} interval"
            out.append({"kind": "means", "title": title, "svg": charts.interval_chart(title, [f"mean over {by}"], {k: [_bar(v)] for k, v in overall.items()}, name)})
    for column in dict.fromkeys(g["by"] for run in runs for g in run.summary.get("by_group", [])):
        tables = {lab: next((g for g in run.summary.get("by_group", []) if g["by"] == column), None) for lab, run in zip(labels, runs)}
        groups = sorted({g for t in tables.values() if t for g in t["n_prompts"]})
        for name in dict.fromkeys(m for t in tables.values() if t for m in t["means"]):
            series = {lab: [_group_bar(t, name, g) for g in groups] for lab, t in tables.items()}
            title = f"{name} by {column}, {_level(runs)} interval"
            out.append({"kind": "groups", "title": title, "svg": charts.interval_chart(title, groups, series, name)})
    return out


def _level(runs: list[RunView]) -> str:
    return f"{runs[0].summary.get('level', 0.95) * 100:g}%"


def _bar(m: dict | None):
    return (m.get("mean"), *(m.get("ci") or (None, None))) if m else None


def _group_bar(table: dict | None, metric: str, group: str):
    if not table or group not in table["means"].get(metric, {}):
        return None
    lo, hi = (table.get("ci") or {}).get(metric, {}).get(group) or (None, None)
    return table["means"][metric][group], lo, hi


def training_charts(runs: list[RunView]) -> tuple[list[dict], list[str]]:
    """The training curves of every run's checkpoint (once per checkpoint) from its train.jsonl; a checkpoint
    trained before that file was written draws train.json's losses. Returns the charts and notes."""
    out, notes, seen = [], [], set()
    for run in runs:
        ckpt = run.manifest.get("checkpoint")
        if not ckpt or ckpt.get("train_id") in seen:
            continue
        seen.add(ckpt.get("train_id"))
        rows = read_train_log(ckpt.get("train_log") or train_log_path(ckpt["path"]))
        if not rows:
            history = _history(Path(ckpt["path"]))
            if history is None:
                notes.append(f"{run.run_id}: no training log at {train_log_path(ckpt['path'])} (cache deleted or moved): no training curves")
                continue
            notes.append(f"{run.run_id}: the checkpoint has no train.jsonl (trained before it was written): the curve is train.json's loss per step")
            rows = [{"step": i + 1, "loss": h} for i, h in enumerate(history)]
        keys = [k for k in CURVE_FIRST if any(k in r for r in rows)]
        keys += sorted({k for r in rows for k in r} - set(keys) - CURVE_SKIP)
        title = f"training: {run.label} {ckpt.get('train_id', '')}, {len(rows)} steps"
        out.append({"kind": "training", "title": title, "svg": charts.curves(title, rows, keys)})
    return out, notes


def _history(final: Path) -> list | None:
    try:
        return json.loads((final / "train.json").read_text(encoding="utf-8")).get("history")
    except (OSError, ValueError):
        return None


# --------------------------------------------------------------------------- the page


def environment():
    """jinja2 with autoescaping on every template: a prompt is text, never markup."""
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("bench", "templates"), autoescape=True, trim_blocks=True, lstrip_blocks=True,
                              undefined=jinja2.StrictUndefined)


def page(runs: list[RunView], max_prompts: int) -> str:
    """The report's HTML for ``runs`` (the first is the reference of the grid's gains)."""
    from markupsafe import Markup

    metrics = list(dict.fromkeys(m for run in runs for m in run.metrics))
    higher = {m: bool(next(r.summary["metrics"][m]["higher_is_better"] for r in runs if m in r.summary["metrics"])) for m in metrics}
    grid = build_grid(runs, metrics, higher, max_prompts)
    curves, notes = training_charts(runs)
    figures = [{**c, "svg": Markup(c["svg"])} for c in mean_charts(runs) + curves]  # our own matplotlib output
    last = runs[-1]
    title = f"{last.manifest.get('suite', '?')} / {last.manifest.get('model', '?')} / {last.label}" + (f" vs {runs[0].label}" if len(runs) > 1 else "")
    data = {"metrics": metrics, "higher": higher, "runs": [r.label for r in runs],
            "prompts": [{"index": p["index"], "groups": p["groups"], "gains": p["gains"]} for p in grid.prompts]}
    return environment().get_template("report.html.j2").render(
        title=title, runs=runs, headline=headline(runs), sets=set_rows(runs), protocol=protocol(runs),
        warnings=warnings(runs, grid, max_prompts) + notes, figures=figures, grid=grid, metrics=metrics, higher=higher,
        gain_label="difference from " + runs[0].label if len(runs) > 1 else "value", data=data, fmt=fmt, level=_level(runs),
    )


def write_report(folders: list, out=None, max_prompts: int = 200, cache_dir=None) -> Path:
    """Write the report of one run folder (with its base, where `bench run` left one beside it) or a
    comparison of several (paired by prompt index and seed); returns the file. One run: ``RUN/report.html``;
    several: ``compare-<hash>.html`` beside the first, unless ``out`` names the file."""
    if not folders:
        raise DataError("bench report needs run=DIR (one or more run folders)")
    runs = with_baseline([load_run(f, cache_dir) for f in folders], cache_dir)
    if out is None:
        first = Path(folders[0])
        digest = hashlib.sha256("\n".join(str(Path(f).resolve()) for f in folders).encode()).hexdigest()[:8]
        out = first / "report.html" if len(folders) == 1 else first.parent / f"compare-{digest}.html"
    return write_text(Path(out), page(runs, int(max_prompts)))
