"""Suites: a prompt set, how many images per prompt, the generation protocol and the metrics.

A ``kind: dreambench`` suite is built from a DreamBench folder instead: each subject's prompts
with its unique token, its photos as every prompt's reference set (for DINO, CLIP-I and the
weight-free ``ref_*`` metrics) and, with one subject chosen (``subject=dog``), its photos and
instance prompt as the training targets of the customization methods.

Prompt files may be ``.txt`` (one prompt per line), ``.json`` (a list of
strings, or of objects with a ``prompt``/``caption`` field), ``.jsonl``, or
``.csv``/``.tsv`` (a ``prompt``/``caption``/``Prompt`` column). The sha256 of the
prompt list (not of the file) identifies the prompt set in every manifest.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from bench.dreambench import COMMIT as DREAMBENCH_COMMIT
from bench.dreambench import MANIFEST as DREAMBENCH_MANIFEST
from bench.dreambench import RAW as DREAMBENCH_RAW
from bench.dreambench import REPOSITORY as DREAMBENCH_REPO
from bench.errors import DataError
from bench.io import cache_root, hub_offline, split_pin
from bench.metrics import ReferenceSet

log = logging.getLogger(__name__)
PROMPT_FIELDS = ("prompt", "caption", "text")  # matched without regard to case


@dataclass
class RealImages:
    """The real images a suite's set-level metrics (FID, KID) compare the generated set with."""

    folder: str | None  # ``references``: a local folder; None: the copy ``bench prefetch`` extracts into the cache
    names: list[str] | None  # each prompt's image, relative to the folder (``reference_file`` over its row); None: every image in it
    template: str | None  # ``reference_file``, e.g. "{category}/{id}.jpg"
    source: dict | str | None  # ``reference_source``: an archive ``{hub, file}`` or URL that ``bench prefetch`` downloads
    resolution: int | None  # ``fid_resolution``: generated and real images alike are center-cropped and resized to it first


@dataclass
class Suite:
    name: str
    prompts: list[str]
    train_prompts: list[str]
    images_per_prompt: int
    metrics: list[str]
    reward: str | None
    source: str
    references: list[ReferenceSet] | None = None  # one per prompt: the real images it is compared with
    train_images: list[Path] = field(default_factory=list)  # training targets, captioned by train_prompts
    prior_prompt: str | None = None  # DreamBooth's class prompt for prior preservation
    subjects: list[str] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)  # breakdown column (subject, Category) -> one label per prompt
    canonical: bool | None = None  # whether the prompts are the published set (its count and sha256), before ``limit``
    metric_scope: dict[str, list[bool]] = field(default_factory=dict)  # metric -> which prompts it scores (all if absent)
    real_images: RealImages | None = None  # the real set of set-level metrics (FID, KID)
    overall_by: str | None = None  # a group column whose groups' means average into the overall score (GenEval's tag)

    @property
    def sha256(self) -> str:
        return prompts_sha256(self.prompts)

    @property
    def references_sha256(self) -> str | None:
        """Identity of the reference images (file bytes), so a changed photo is a new suite."""
        if self.references is None:
            return None
        h = hashlib.sha256()
        for ref in {r.key: r for r in self.references}.values():
            h.update(ref.key.encode())
            for path in ref.paths:
                h.update(hashlib.sha256(path.read_bytes()).digest())
        return h.hexdigest()


def prompts_sha256(prompts: list[str]) -> str:
    return hashlib.sha256(json.dumps(prompts, ensure_ascii=False).encode()).hexdigest()


def _find_column(columns, wanted: str | list[str] | tuple[str, ...]) -> str | None:
    """The first of ``wanted`` among ``columns``, matched without regard to case."""
    lower = {c.lower(): c for c in columns}
    for name in [wanted] if isinstance(wanted, str) else wanted:
        if name.lower() in lower:
            return lower[name.lower()]
    return None


def read_prompt_rows(path: str | Path) -> list[dict]:
    """Rows of a prompt file (a ``.txt`` line is ``{"prompt": line}``); any problem is one DataError
    line naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file not found: {path} (set suite.source=PATH to a .txt/.json/.jsonl/.csv/.tsv file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"malformed prompt file {path}: not UTF-8 text (byte {err.start})") from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        rows = [{"prompt": line} for line in text.splitlines()]
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"malformed prompt file {path}: invalid JSON at line {err.lineno} column {err.colno}") from None
        if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
            data = [{"id": key, **value} for key, value in data.items()]  # {id: {prompt, category}} (MJHQ-30K's meta_data.json)
        if not isinstance(data, list):
            raise DataError(f"malformed prompt file {path}: expected a JSON list of prompts or an object of {{id: {{prompt: ...}}}}, got {type(data).__name__}")
        bad = next((i for i, d in enumerate(data) if not isinstance(d, (str, dict))), None)
        if bad is not None:
            raise DataError(f"malformed prompt file {path}: item {bad} is neither a string nor an object")
        rows = [{"prompt": d} if isinstance(d, str) else d for d in data]
    elif suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"malformed prompt file {path}: line {n} is not valid JSON") from None
            if not isinstance(row, (str, dict)):
                raise DataError(f"malformed prompt file {path}: line {n} is neither a string nor an object")
            rows.append({"prompt": row} if isinstance(row, str) else row)
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",")  # quoted newlines kept (COCO-30k)
        if not reader.fieldnames or _find_column(reader.fieldnames, PROMPT_FIELDS) is None:
            raise DataError(f"malformed prompt file {path}: no column named {', '.join(PROMPT_FIELDS)} in its header")
        rows = list(reader)
    else:
        raise DataError(f"unsupported prompt file {path}: use .txt, .json, .jsonl, .csv or .tsv")
    if not rows:
        raise DataError(f"prompt file {path} holds no prompts")
    return rows


def prompts_of(rows: list[dict], where: str, column: str | list[str] | None = None) -> list[str]:
    """The prompt of every row: the suite's ``prompt_column`` or the first of PROMPT_FIELDS present."""
    wanted = ([column] if isinstance(column, str) else list(column or [])) + list(PROMPT_FIELDS)
    prompts = []
    for n, row in enumerate(rows):
        key = _find_column(row, wanted)
        if key is None:
            raise DataError(f"malformed prompt file {where}: row {n + 1} has none of the fields {', '.join(dict.fromkeys(wanted))}")
        value = row[key]
        prompts.append("" if value is None else str(value))
    return prompts


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a file, in file order (empty prompts kept: Pick-a-Pic's test set has one)."""
    return prompts_of(read_prompt_rows(path), str(path))


def hub_prompt_rows(spec: dict, prefetch: str, local_key: str) -> tuple[list[dict], str]:
    """Rows of a hub dataset split (``{hub, split, revision}``, through the datasets cache) or of one
    file of a hub dataset repository (``{hub, file, revision}``: HPSv2's benchmark/anime.json);
    offline without a cached copy, one line naming ``bench prefetch PREFETCH`` and ``LOCAL_KEY=PATH``."""
    repo, revision, file = spec["hub"], spec.get("revision"), spec.get("file")
    split = spec.get("split") or "train"
    where = f"hf://datasets/{repo}" + (f"@{revision}" if revision else "") + (f"/{file}" if file else f" [{split}]")
    hub_offline()  # an unreachable hub is offline mode: a cached copy still loads, a missing one fails at once
    try:
        if file:
            from huggingface_hub import hf_hub_download

            return read_prompt_rows(hf_hub_download(repo, file, repo_type=spec.get("repo_type") or "dataset", revision=revision)), where
        from datasets import load_dataset

        data = load_dataset(repo, split=split, revision=revision)
    except DataError:
        raise
    except Exception as err:  # the hub libraries raise many types for "not cached", "no network" and "no such file"
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise DataError(
            f"cannot load the prompts {where} ({reason}): run `bench prefetch {prefetch}` where the hub is reachable, "
            f"or set {local_key}=PATH to a local copy"
        ) from None
    columns = [c for c in data.column_names if getattr(data.features[c], "dtype", None) in ("string", "large_string", "int64", "int32")]  # no image columns
    return data.select_columns(columns).to_list(), where


def prompt_url_path(spec: str, cache: Path) -> Path:
    """Where a prompt file given by URL is kept in the cache (its name, keyed by the URL without its pin)."""
    url, _ = split_pin(spec)
    return Path(cache) / "data" / "prompts" / f"{hashlib.sha256(url.encode()).hexdigest()[:12]}-{Path(url).name}"


def read_prompt_source(spec, base: Path, prefetch: str, local_key: str, cache: Path | None = None) -> tuple[list[dict], str]:
    """Rows from a prompt source: a file (relative to ``base``), an ``https://`` URL ending in
    ``#sha256=HEX`` (downloaded once into the cache and checked, ``bench.io.fetch_url``), a hub
    dataset split ``{hub, split, revision}`` or one file of a hub dataset ``{hub, file, revision}``.
    ``prefetch`` (the arguments of ``bench prefetch``) and ``local_key`` (``suite.source``) go into
    the one-line error offline."""
    if isinstance(spec, dict):
        return hub_prompt_rows(spec, prefetch, local_key)
    spec = str(spec)
    if spec.startswith(("https://", "http://", "file://")):
        from bench.io import fetch_url

        fix = f"run `bench prefetch {prefetch}` where the network is reachable, or download {split_pin(spec)[0]} and set {local_key}=PATH"
        return read_prompt_rows(fetch_url(spec, prompt_url_path(spec, cache or cache_root()), fix)), spec
    path = Path(spec) if Path(spec).is_absolute() else base / spec
    return read_prompt_rows(path), str(path)


def is_published(cfg: dict, prompts: list[str], where: str) -> bool | None:
    """Whether ``prompts`` (before ``limit``) are the published set of the suite's ``canonical``
    record (its count and the sha256 of the list); None when the suite records none."""
    canonical = cfg.get("canonical")
    if not canonical:
        return None
    ok = len(prompts) == int(canonical["count"]) and canonical.get("sha256") in (None, prompts_sha256(prompts))
    if not ok:
        log.warning("suite '%s': %s is not the published prompt set (%d prompts, expected %d, sha256 %s)", cfg["name"], where, len(prompts), int(canonical["count"]), canonical.get("sha256") or "not recorded")
    return ok


def load_suite(cfg: dict, subject: str | None = None, cache: Path | None = None) -> Suite:
    """Resolve a suite config (paths relative to its YAML) into prompts, applying ``limit``.

    ``prompts`` is a file next to the YAML or a hub dataset (``{hub, split, revision}``);
    ``suite.source=PATH`` replaces either with a local file. ``group_columns`` name the columns
    (Category, Challenge) the results are broken down by; ``canonical`` records the count and
    sha256 of the published set, so the manifest says whether this run used it.
    """
    if cfg.get("kind", "prompts") == "dreambench":
        return load_dreambench_suite(cfg, subject, cache)
    if subject:
        raise DataError(f"subject={subject} applies to DreamBench suites; suite '{cfg['name']}' has no subjects")
    base = Path(cfg.get("_dir", "."))
    rows, where = suite_rows(cfg, base, cache)
    prompts = prompts_of(rows, where, cfg.get("prompt_column"))
    set_column = set_column_of(cfg) if cfg.get("prompt_sets") else None
    groups = group_labels(cfg, rows, where, set_column)
    real = _real_images(cfg, rows, where)
    is_canonical = is_published(cfg, prompts, where)
    keep = limited(len(prompts), cfg.get("limit"), limit_labels(cfg, rows, where, groups, set_column))
    check_empty_prompts(cfg, [(i, prompts[i]) for i in keep], where)
    if len(keep) < len(prompts):
        prompts, groups = [prompts[i] for i in keep], {k: [v[i] for i in keep] for k, v in groups.items()}
        if real is not None and real.names is not None:
            real.names = [real.names[i] for i in keep]
    train = read_prompts(base / cfg["train_prompts"]) if cfg.get("train_prompts") else []
    metrics = list(cfg.get("metrics", []))
    return Suite(
        name=cfg["name"],
        prompts=prompts,
        train_prompts=train,
        images_per_prompt=int(cfg.get("images_per_prompt", 1)),
        metrics=metrics,
        reward=cfg.get("reward"),
        source=where,
        groups=groups,
        canonical=is_canonical,
        metric_scope=_metric_scope(cfg, metrics, groups),
        real_images=real,
        overall_by=overall_column(cfg, groups),
    )


def overall_column(cfg: dict, groups: dict[str, list[str]]) -> str | None:
    column = cfg.get("overall_by")
    if column and column not in groups:
        raise DataError(f"suite '{cfg['name']}': overall_by={column} is not among its groups ({', '.join(groups) or 'none'}); add it to group_columns")
    return column or None


def suite_rows(cfg: dict, base: Path, cache: Path | None) -> tuple[list[dict], str]:
    """The suite's prompt rows and where they came from: its prompt sets, ``suite.source`` (relative to
    the working folder) or ``prompts`` (relative to the YAML)."""
    if cfg.get("prompt_sets"):
        return read_prompt_sets(cfg, base, cache)
    spec = cfg.get("source") or cfg.get("prompts")
    if not spec:
        raise DataError(f"suite '{cfg['name']}' names no prompts (set suite.source=PATH)")
    return read_prompt_source(spec, Path.cwd() if cfg.get("source") else base, f"suite={cfg['name']}", "suite.source", cache)


def group_labels(cfg: dict, rows: list[dict], where: str, set_column: str | None) -> dict[str, list[str]]:
    """Each prompt's label in every column results are broken down by: the prompt set first, then the
    suite's ``group_columns`` (a column the rows lack is skipped with a warning)."""
    groups = {}
    for column in dict.fromkeys(([set_column] if set_column else []) + list(cfg.get("group_columns") or [])):
        key = _find_column(rows[0], column)
        if key is None:
            log.warning("suite '%s': %s has no column %s, so results are not broken down by it", cfg["name"], where, column)
            continue
        groups[column] = ["" if r.get(key) is None else str(r.get(key)) for r in rows]
    return groups


def limit_labels(cfg: dict, rows: list[dict], where: str, groups: dict[str, list[str]], set_column: str | None) -> list[str] | None:
    """Each prompt's label in the column ``suite.limit`` takes N prompts of each group of: ``limit_by``
    (any column of the prompt file, matched without regard to case), by default the prompt set of a
    suite of ``prompt_sets``; None (the first N in all) for any other suite without ``limit_by``."""
    column = cfg.get("limit_by") or set_column
    if not column or not cfg.get("limit"):
        return None
    if column in groups:
        return groups[column]
    key = _find_column(rows[0], column)
    if key is None:
        columns = ", ".join(dict.fromkeys(k for row in rows[:1] for k in row)) or "none"
        raise DataError(f"suite.limit_by={column}: {where} has no column {column} (its columns: {columns}); name one of them, or null for the first N prompts")
    return ["" if r.get(key) is None else str(r.get(key)) for r in rows]


def limited(count: int, limit, sets: list[str] | None) -> list[int]:
    """The prompt indices ``suite.limit`` keeps: the first N, or with ``sets`` (each prompt's label in the
    ``limit_by`` column, or its prompt set) the first N of every label, in file order, so a smoke run
    reaches every group's (and every set's) metrics."""
    if not limit:
        return list(range(count))
    n = int(limit)
    if sets is None:
        return list(range(min(n, count)))
    taken: dict[str, int] = {}
    keep = []
    for i, label in enumerate(sets):
        taken[label] = taken.get(label, 0) + 1
        if taken[label] <= n:
            keep.append(i)
    return keep


def check_empty_prompts(cfg: dict, indexed: list[tuple[int, str]], where: str) -> None:
    """An empty prompt is an image of nothing: usually a stray blank line, so it is refused unless the
    suite says it is intended (``allow_empty_prompts: true``: Pick-a-Pic's test set keeps one)."""
    empty = [i + 1 for i, prompt in indexed if not prompt.strip()]
    if empty and not cfg.get("allow_empty_prompts"):
        unit = "line" if where.endswith(".txt") else "row"
        shown = ", ".join(map(str, empty[:5])) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DataError(
            f"suite '{cfg['name']}': {where} has {len(empty)} empty prompt{'s' * (len(empty) > 1)} ({unit}{'s' * (len(empty) > 1)} {shown}): "
            "remove them, or set suite.allow_empty_prompts=true to generate images of the empty prompt"
        )


def _real_images(cfg: dict, rows: list[dict], where: str) -> RealImages | None:
    """``references`` (a folder), ``reference_file`` (each prompt's image: a template over its row,
    ``"{category}/{id}.jpg"``), ``reference_source`` (where `bench prefetch` gets them) and
    ``fid_resolution``; None when the suite names none of them."""
    if not any(cfg.get(k) for k in ("references", "reference_file", "reference_source")):
        return None
    template = cfg.get("reference_file")
    names = None
    if template:
        try:
            names = [str(template).format_map(row) for row in rows]
        except (KeyError, IndexError, ValueError) as err:
            raise DataError(f"suite '{cfg['name']}': reference_file {template!r} does not fit the rows of {where} ({type(err).__name__}: {err}); its fields must be columns of the prompt file") from None
    resolution = cfg.get("fid_resolution")
    return RealImages(str(cfg["references"]) if cfg.get("references") else None, names, template, cfg.get("reference_source"), int(resolution) if resolution else None)


def _source_name(spec) -> str:
    """The file name a prompt source has in a local copy of the set's folder."""
    return Path(spec["file"] if isinstance(spec, dict) else split_pin(str(spec))[0]).name


def set_column_of(cfg: dict) -> str:
    """The breakdown column that holds each prompt's set label (``prompt_set_column``, default "set")."""
    return cfg.get("prompt_set_column") or "set"


def read_prompt_sets(cfg: dict, base: Path, cache: Path | None) -> tuple[list[dict], str]:
    """Rows of a suite published as several prompt files, one per label (HPSv2's four styles,
    T2I-CompBench's eight categories), each row labelled in ``prompt_set_column``. With
    ``suite.source=FOLDER`` every file is read from that folder under its own file name."""
    column = set_column_of(cfg)
    folder = Path(cfg["source"]) if cfg.get("source") else None
    names = {label: _source_name(spec) for label, spec in cfg["prompt_sets"].items()}
    if folder is not None and not folder.is_dir():
        raise DataError(f"suite.source={folder} is not a folder: suite '{cfg['name']}' reads its prompt files {', '.join(names.values())} from a folder")
    rows = []
    for label, spec in cfg["prompt_sets"].items():
        part, _ = read_prompt_source(folder / names[label] if folder else spec, base, f"suite={cfg['name']}", "suite.source", cache)
        rows += [{**row, column: label} for row in part]
    return rows, str(folder) if folder else f"{len(names)} prompt files ({', '.join(names.values())})"


def _metric_scope(cfg: dict, metrics: list[str], groups: dict[str, list[str]]) -> dict[str, list[bool]]:
    """``metric_scope: {metric: [labels]}``: the metric scores only the prompts whose
    ``prompt_set_column`` label is listed (T2I-CompBench: BLIP-VQA on the attribute prompts);
    a metric not listed scores every prompt."""
    scope = cfg.get("metric_scope") or {}
    if not scope:
        return {}
    column = set_column_of(cfg)
    labels = groups.get(column)
    unknown = [m for m in scope if m not in metrics]
    if labels is None or unknown:
        raise DataError(f"suite '{cfg['name']}': metric_scope " + (f"names metrics not in its metrics list: {unknown}" if unknown else f"needs prompt_sets (the {column} of every prompt)"))
    known = set(cfg["prompt_sets"])
    for metric, wanted in scope.items():
        if set(wanted) - known:
            raise DataError(f"suite '{cfg['name']}': metric_scope of {metric} names unknown sets {sorted(set(wanted) - known)} (sets: {', '.join(known)})")
    return {metric: [label in wanted for label in labels] for metric, wanted in scope.items()}


def fetch_dreambench(cache: Path, base_url: str = DREAMBENCH_RAW, manifest: Path = DREAMBENCH_MANIFEST) -> Path:
    """The DreamBench folder from the official GitHub repository at a pinned commit, downloaded once
    into the cache file by file, each checked against the sha256 the manifest records for it (computed
    from the repository at that commit; the dataset is not on the Hugging Face hub from its authors)."""
    from urllib.parse import quote

    from bench.io import fetch_url, is_local_url, progress

    root = cache / "data" / f"dreambooth-{DREAMBENCH_COMMIT[:12]}"
    fix = f"clone {DREAMBENCH_REPO} (commit {DREAMBENCH_COMMIT[:7]}) and set suite.source=PATH to it"
    files = read_sha256sums(manifest)
    missing = [name for name in files if not (root / name).is_file()]  # the files present were checked when downloaded
    if missing and not is_local_url(base_url) and hub_offline():
        raise DataError(f"DreamBench is not in {root} ({len(missing)} of {len(files)} files missing) and downloads are off or the network is unreachable: {fix}")
    for name in progress(missing, desc="DreamBench", unit="file"):
        fetch_url(f"{base_url}/{quote(name)}", root / name, fix, sha256=files[name], show_progress=False)
    return root


def read_sha256sums(path: Path) -> dict[str, str]:
    """``sha256sum`` output (``HEX  relative/path`` per line) as {path: hex}."""
    rows = (line.split(None, 1) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())
    return {name.strip(): digest for digest, name in rows}


def load_dreambench_suite(cfg: dict, subject: str | None, cache: Path | None) -> Suite:
    """The subjects' prompts (``prompts_per_subject`` of their 25 templates), their photos as
    references, and with one subject its photos and instance prompt as training targets.

    Results are broken down by subject and by live subject / object (the two prompt lists).
    ``canonical`` is checked on the prompts of the suite's subjects, before ``subject=`` picks
    one and ``limit`` cuts, as ``limit`` is for the other suites."""
    from bench.dreambench import read_dreambench

    source = cfg.get("source") or fetch_dreambench(cache or cache_root())
    listed = list(cfg.get("subjects") or [])
    subjects = read_dreambench(source, needed=[subject] if subject else listed or None)  # only the photos used must be there
    unknown = [n for n in listed + ([subject] if subject else []) if n not in subjects]
    if unknown:
        raise DataError(f"no DreamBench subject '{unknown[0]}' in {source}; subjects: {', '.join(sorted(subjects))}")
    token, per_subject = str(cfg.get("token") or "sks"), cfg.get("prompts_per_subject")
    chosen = {name: s.prompts(token)[: int(per_subject) if per_subject else None] for name, s in subjects.items()}
    is_canonical = is_published(cfg, [p for name in listed or subjects for p in chosen[name]], str(source))
    names = [subject] if subject else listed or list(subjects)
    prompts, references, kinds = [], [], []
    for name in names:
        prompts += chosen[name]
        references += [ReferenceSet(name, tuple(subjects[name].images))] * len(chosen[name])
        kinds += ["live" if subjects[name].live else "object"] * len(chosen[name])
    if cfg.get("limit"):
        n = int(cfg["limit"])
        prompts, references, kinds = prompts[:n], references[:n], kinds[:n]
    one = subjects[names[0]] if len(names) == 1 else None
    return Suite(
        name=cfg["name"],
        prompts=prompts,
        train_prompts=[one.instance_prompt(token)] * len(one.images) if one else [],
        images_per_prompt=int(cfg.get("images_per_prompt", 1)),
        metrics=list(cfg.get("metrics", [])),
        reward=cfg.get("reward"),
        source=str(source),
        references=references,
        train_images=list(one.images) if one else [],
        prior_prompt=f"a photo of {one.class_name}" if one else None,
        subjects=names,
        groups={"subject": [r.key for r in references], "live_or_object": kinds},
        canonical=is_canonical,
    )
