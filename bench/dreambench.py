"""The DreamBench (DreamBooth) dataset layout, read from a local folder.

``<root>/dataset/<subject>/*.jpg`` holds each subject's 4-6 images and
``<root>/dataset/prompts_and_classes.txt`` the subject -> class table and the 25 object and 25
live-subject prompt templates (written as Python ``'...'.format(unique_token, class_token)``
lines, which are parsed here, never executed). Live subjects are the cats and dogs, as in the
DreamBooth paper; they get the live-subject templates.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import DataError

LIVE_CLASSES = ("cat", "dog")
REPOSITORY = "https://github.com/google/dreambooth"
COMMIT = "4f887af7970a06fc0cd3adaa1d0b368547d6a1d0"  # the release the DreamBooth and PSO papers' numbers use
RAW = f"https://raw.githubusercontent.com/google/dreambooth/{COMMIT}"  # each file's bytes at COMMIT
MANIFEST = Path(__file__).parent / "data" / f"dreambench-{COMMIT[:12]}.sha256"  # sha256 of LICENSE.md and dataset/**, from the repository at COMMIT
TEMPLATE = re.compile(r"^'(.*)'\.format\(unique_token, class_token\),?$")


@dataclass
class Subject:
    name: str
    class_name: str
    images: list[Path]
    templates: list[str] = field(repr=False, default_factory=list)

    @property
    def live(self) -> bool:
        return self.class_name in LIVE_CLASSES

    def instance_prompt(self, token: str = "sks") -> str:
        """The training prompt, 'a photo of sks dog' in the DreamBooth paper's form."""
        return f"a photo of {token} {self.class_name}"

    def prompts(self, token: str = "sks") -> list[str]:
        """The 25 evaluation prompts for this subject with its unique token and class filled in."""
        return [t.format(token, self.class_name) for t in self.templates]


def read_dreambench(root: str | Path, needed: list[str] | None = None) -> dict[str, Subject]:
    """Every subject of a DreamBench folder (the folder holding ``dataset/`` or ``dataset/`` itself).

    The photos of the ``needed`` subjects (all when None) must be there: they are the reference
    images of DINO and CLIP-I, so a missing folder is one DataError line naming it."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"DreamBench folder {root} does not exist (set suite.source=PATH to a clone of {REPOSITORY}, the folder holding dataset/)")
    data = root / "dataset" if (root / "dataset").is_dir() else root
    table = data / "prompts_and_classes.txt"
    if not table.is_file():
        raise DataError(f"no DreamBench prompts_and_classes.txt under {root} (set suite.source=PATH to the folder holding dataset/)")
    classes, templates = _parse(table)
    subjects = {}
    for name, class_name in classes.items():
        folder = data / name
        images = sorted(p for p in folder.glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png")) if folder.is_dir() else []
        if not images and (needed is None or name in needed):
            raise DataError(f"DreamBench subject '{name}' has no reference images in {folder} (expected {folder}/00.jpg ...; set suite.source=PATH to a complete copy)")
        kind = "live" if class_name in LIVE_CLASSES else "object"
        subjects[name] = Subject(name, class_name, images, templates[kind])
    return subjects


def _parse(path: Path) -> tuple[dict[str, str], dict[str, list[str]]]:
    classes: dict[str, str] = {}
    templates: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if line == "subject_name,class":
            section = "classes"
        elif line == "Object Prompts":
            section = "object"
        elif line == "Live Subject Prompts":
            section = "live"
        elif not line or line in ("Classes", "Prompts", "]") or line.startswith("prompt_list"):
            if not line and section == "classes":
                section = None
        elif section == "classes":
            name, sep, class_name = line.partition(",")
            if not sep:
                raise DataError(f"malformed DreamBench class row at {path}:{n}: {line!r} (expected subject_name,class)")
            classes[name] = class_name
        elif section in templates:
            match = TEMPLATE.match(line)
            if not match:
                raise DataError(f"malformed DreamBench prompt template at {path}:{n}: {line!r}")
            templates[section].append(match.group(1))
    if not classes or not templates["object"] or not templates["live"]:
        raise DataError(f"{path} lacks the class table or a prompt list (object and live subject prompts)")
    return classes, templates
