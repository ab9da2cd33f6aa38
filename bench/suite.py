"""Suites: a prompt set, how many images per prompt, the generation protocol and the metrics.

Prompt files may be ``.txt`` (one prompt per line), ``.json`` (a list of
strings, or of objects with a ``prompt``/``caption`` field), ``.jsonl``, or
``.csv``/``.tsv`` (a ``prompt``/``caption``/``Prompt`` column). The sha256 of the
prompt list (not of the file) identifies the prompt set in every manifest.
"""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from bench.errors import DataError

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

    @property
    def sha256(self) -> str:
        return prompts_sha256(self.prompts)


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


def load_suite(cfg: dict) -> Suite:
    """Resolve a suite config (paths relative to its YAML) into prompts, applying ``limit``."""
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
