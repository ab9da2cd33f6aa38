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
import json
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import DataError
from bench.io import cache_root, hub_offline
from bench.metrics import ReferenceSet

PROMPT_FIELDS = ("prompt", "caption", "Prompt", "text")


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
    groups: list[str] | None = None  # one label per prompt (a subject, a category) for the breakdown table
    group_by: str | None = None  # what the labels are, the breakdown's column name

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


def _field(row: dict, path: Path, where: str) -> str:
    for key in PROMPT_FIELDS:
        if key in row:
            return str(row[key])
    raise DataError(f"malformed prompt file {path}: {where} has none of the fields {', '.join(PROMPT_FIELDS)}")


def read_prompts(path: str | Path) -> list[str]:
    """Read a prompt file; any problem is one DataError line naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"prompt file not found: {path} (set suite.source=PATH to a .txt/.json/.jsonl/.csv/.tsv file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"malformed prompt file {path}: not UTF-8 text (byte {err.start})") from None
    suffix = path.suffix.lower()
    if suffix == ".txt":
        prompts = text.splitlines()
    elif suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"malformed prompt file {path}: invalid JSON at line {err.lineno} column {err.colno}") from None
        if not isinstance(data, list):
            raise DataError(f"malformed prompt file {path}: expected a JSON list of prompts, got {type(data).__name__}")
        prompts = [d if isinstance(d, str) else _field(d, path, f"item {i}") if isinstance(d, dict) else None for i, d in enumerate(data)]
        if None in prompts:
            raise DataError(f"malformed prompt file {path}: item {prompts.index(None)} is neither a string nor an object")
    elif suffix == ".jsonl":
        prompts = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                raise DataError(f"malformed prompt file {path}: line {n} is not valid JSON") from None
            prompts.append(row if isinstance(row, str) else _field(row, path, f"line {n}"))
    elif suffix in (".csv", ".tsv"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if suffix == ".tsv" else ",")
        if not reader.fieldnames or not any(f in reader.fieldnames for f in PROMPT_FIELDS):
            raise DataError(f"malformed prompt file {path}: no column named {', '.join(PROMPT_FIELDS)} in its header")
        prompts = [_field(row, path, f"row {n}") for n, row in enumerate(reader, 2)]
    else:
        raise DataError(f"unsupported prompt file {path}: use .txt, .json, .jsonl, .csv or .tsv")
    if not prompts:
        raise DataError(f"prompt file {path} holds no prompts")
    return prompts


def load_suite(cfg: dict, subject: str | None = None, cache: Path | None = None) -> Suite:
    """Resolve a suite config (paths relative to its YAML) into prompts, applying ``limit``."""
    if cfg.get("kind", "prompts") == "dreambench":
        return load_dreambench_suite(cfg, subject, cache)
    if subject:
        raise DataError(f"subject={subject} applies to DreamBench suites; suite '{cfg['name']}' has no subjects")
    base = Path(cfg.get("_dir", "."))
    source = cfg.get("source") or cfg.get("prompts")
    if not source:
        raise DataError(f"suite '{cfg['name']}' names no prompts (set suite.source=PATH)")
    path = Path(source) if Path(source).is_absolute() or cfg.get("source") else base / source
    prompts = read_prompts(path)
    if cfg.get("limit"):
        prompts = prompts[: int(cfg["limit"])]
    train = read_prompts(base / cfg["train_prompts"]) if cfg.get("train_prompts") else []
    return Suite(
        name=cfg["name"],
        prompts=prompts,
        train_prompts=train,
        images_per_prompt=int(cfg.get("images_per_prompt", 1)),
        metrics=list(cfg.get("metrics", [])),
        reward=cfg.get("reward"),
        source=str(path),
    )


DREAMBENCH_REPO = "https://github.com/google/dreambooth"
DREAMBENCH_COMMIT = "4f887af7970a06fc0cd3adaa1d0b368547d6a1d0"  # the release the DreamBooth and PSO papers' numbers use


def fetch_dreambench(cache: Path) -> Path:
    """The DreamBench folder from the official GitHub repository at a pinned commit, downloaded
    once into the cache (the dataset is not on the Hugging Face hub from its authors)."""
    import tarfile
    import urllib.request

    root = cache / "data" / f"dreambooth-{DREAMBENCH_COMMIT[:12]}"
    if (root / "dataset" / "prompts_and_classes.txt").is_file():
        return root
    fix = f"clone {DREAMBENCH_REPO} (commit {DREAMBENCH_COMMIT[:7]}) and set suite.source=PATH to it"
    if hub_offline():
        raise DataError(f"DreamBench is not in {root} and downloads are off (HF_HUB_OFFLINE): {fix}")
    archive = root.with_suffix(".tar.gz")
    archive.parent.mkdir(parents=True, exist_ok=True)
    try:
        urllib.request.urlretrieve(f"{DREAMBENCH_REPO}/archive/{DREAMBENCH_COMMIT}.tar.gz", archive)
        with tarfile.open(archive) as tar:
            tmp = root.with_name(root.name + ".tmp")
            tar.extractall(tmp, filter="data")
        (tmp / f"dreambooth-{DREAMBENCH_COMMIT}").rename(root)
    except (OSError, tarfile.TarError) as err:
        raise DataError(f"cannot download DreamBench ({err}): {fix}") from None
    finally:
        archive.unlink(missing_ok=True)
    return root


def load_dreambench_suite(cfg: dict, subject: str | None, cache: Path | None) -> Suite:
    """The subjects' prompts (``prompts_per_subject`` of their 25 templates), their photos as
    references, and with one subject its photos and instance prompt as training targets."""
    from bench.dreambench import read_dreambench

    source = cfg.get("source") or fetch_dreambench(cache or cache_root())
    subjects = read_dreambench(source)
    names = list(cfg.get("subjects") or subjects)
    unknown = [n for n in names + ([subject] if subject else []) if n not in subjects]
    if unknown:
        raise DataError(f"no DreamBench subject '{unknown[0]}' in {source}; subjects: {', '.join(sorted(subjects))}")
    if subject:
        names = [subject]
    token, per_subject = str(cfg.get("token") or "sks"), cfg.get("prompts_per_subject")
    prompts, references = [], []
    for name in names:
        chosen = subjects[name].prompts(token)[: int(per_subject) if per_subject else None]
        prompts += chosen
        references += [ReferenceSet(name, tuple(subjects[name].images))] * len(chosen)
    if cfg.get("limit"):
        prompts, references = prompts[: int(cfg["limit"])], references[: int(cfg["limit"])]
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
        groups=[r.key for r in references],
        group_by="subject",
    )
