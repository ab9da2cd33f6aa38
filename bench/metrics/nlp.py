"""The English parser T2I-CompBench reads its prompts with: spaCy's ``en_core_web_sm``.

Its scripts take noun chunks (BLIP-VQA questions), part-of-speech tags (the two objects of a spatial
prompt, the adjectives the complex CLIP score drops) and tokens (numeracy) from
``spacy.load("en_core_web_sm")``. Here the pipeline is loaded once per process, from an installed
``en_core_web_sm`` package or else from the wheel that ``spacy/en_core_web_sm`` publishes on the hub
(``bench prefetch`` downloads it; it is unpacked once into the cache).

spaCy is an optional dependency (``pip install "spacy>=3.8,<3.9"``). T2I-CompBench pinned spaCy 3.5.3
with ``en_core_web_sm`` 3.5.0, which do not install beside numpy 2. The hub wheel is read at a pinned
commit (``SPACY_REVISION``, Nov 2023); which pipeline version that wheel holds is not verified here (the
date predates the 3.8 pipelines, so probably a 3.7 one, which spaCy 3.8 loads with a version warning),
and its parses can differ from 3.5's on a few prompts. An installed ``en_core_web_sm`` package wins.

``scorers=tiny`` parses with :class:`TinyParser`, a few pure-Python rules with the same interface, so
that smoke runs need neither spaCy nor a download; like the tiny models, its output means nothing.
"""

from __future__ import annotations

import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from bench.errors import UsageError, WeightsMissingError

SPACY_REPO = "spacy/en_core_web_sm"
# HF commits page of main, 2023-11-21. Which spaCy version the wheel at this commit holds is NOT verified
# (no copy could be read here); `bench prefetch` and loading both take this commit.
SPACY_REVISION = "8fb6f8155286360bf5486fe399e2738d1df7ded2"
SPACY_WHEEL = "en_core_web_sm-any-py3-none-any.whl"
SPACY_PIP = 'pip install "spacy>=3.8,<3.9"'


def load_spacy(metric: str):
    """``en_core_web_sm``: ``$BENCH_SPACY_MODEL`` (a pipeline folder or a model wheel), else the
    installed package, else the hub wheel (unpacked once into the cache)."""
    import os

    try:
        import spacy
    except ImportError:
        raise UsageError(f"metric {metric} parses prompts with spaCy, which is not installed: {SPACY_PIP}") from None
    local = os.environ.get("BENCH_SPACY_MODEL")
    if local:
        path = Path(local)
        if not path.exists():
            raise UsageError(f"BENCH_SPACY_MODEL={local} does not exist: point it at an en_core_web_sm folder or wheel, or unset it")
        return spacy.load(unpack_spacy_wheel(path) if path.suffix == ".whl" else path)
    try:
        return spacy.load("en_core_web_sm")
    except OSError:  # not installed as a package: the hub copy
        pass
    from huggingface_hub import hf_hub_download

    from bench.io import hub_offline

    try:
        wheel = hf_hub_download(SPACY_REPO, SPACY_WHEEL, revision=SPACY_REVISION, local_files_only=hub_offline())
    except Exception:  # not cached offline, no network
        raise WeightsMissingError(
            f"metric {metric}: the spaCy pipeline en_core_web_sm is neither installed nor in the hub cache ({SPACY_REPO}@{SPACY_REVISION[:7]}/{SPACY_WHEEL}): "
            f"run `bench prefetch metrics={metric}` where the hub is reachable (same HF_HOME), or use scorers=tiny for a smoke test"
        ) from None
    return spacy.load(unpack_spacy_wheel(Path(wheel)))


def unpack_spacy_wheel(wheel: Path) -> Path:
    """The pipeline folder (the one holding ``config.cfg``) of a spaCy model wheel, unpacked once
    beside the cache: ``<package>/<package>-<version>/``."""
    from bench.io import cache_root

    with zipfile.ZipFile(wheel) as archive:
        configs = [n for n in archive.namelist() if n.endswith("/config.cfg") and n.count("/") == 2]
        if not configs:
            raise WeightsMissingError(f"{wheel} holds no spaCy pipeline (no <package>/<package>-<version>/config.cfg): delete it and run `bench prefetch` again")
        inner = configs[0].rsplit("/", 1)[0]
        dest = cache_root() / "weights" / "spacy" / inner.split("/")[-1]
        if not (dest / "config.cfg").is_file():
            tmp = dest.with_name(dest.name + ".part")
            for name in archive.namelist():
                if name.startswith(inner + "/") and not name.endswith("/"):
                    target = tmp / name[len(inner) + 1 :]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(name))
            tmp.replace(dest)
    return dest


def download_spacy() -> str:
    """``bench prefetch``: the hub wheel of ``en_core_web_sm``, at the commit loading asks for."""
    from huggingface_hub import hf_hub_download

    return hf_hub_download(SPACY_REPO, SPACY_WHEEL, revision=SPACY_REVISION)


def english(scorers: str, metric: str):
    """The parser, once per process: spaCy's ``en_core_web_sm``, or with ``scorers=tiny`` the rules."""
    from bench.metrics import _LOADED

    key = ("spacy", SPACY_REPO, scorers)
    if key not in _LOADED:
        _LOADED[key] = TinyParser() if scorers == "tiny" else load_spacy(metric)
    return _LOADED[key]


# --------------------------------------------------------------------------- the tiny stand-in

DETERMINERS = {"a", "an", "the", "this", "that", "these", "those", "some", "each", "every", "its", "their", "his", "her"}
NUMBERS = {"one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"}
ADPOSITIONS = {"on", "of", "in", "at", "to", "with", "near", "next", "behind", "above", "below", "under", "over", "by", "from", "into", "onto", "beside", "between", "through", "against", "across", "past", "front", "side", "top", "bottom", "left", "right"}
CONJUNCTIONS = {"and", "or", "but"}
VERBS = {"is", "are", "was", "were", "be", "been", "has", "have", "had", "sat", "lay", "hung", "stood"}


@dataclass
class Token:
    text: str
    pos_: str
    i: int
    dep_: str = ""


@dataclass
class Span:
    tokens: list[Token] = field(default_factory=list)

    @property
    def text(self) -> str:
        return " ".join(t.text for t in self.tokens)

    @property
    def root(self) -> Token:
        return self.tokens[-1]

    def __iter__(self):
        return iter(self.tokens)

    def __len__(self):
        return len(self.tokens)

    def __str__(self):
        return self.text


class TinyDoc:
    """A parsed prompt with spaCy's ``Doc`` interface as far as this project uses it."""

    def __init__(self, tokens: list[Token]):
        self.tokens = tokens

    def __len__(self):
        return len(self.tokens)

    def __iter__(self):
        return iter(self.tokens)

    def __getitem__(self, index):
        return Span(self.tokens[index]) if isinstance(index, slice) else self.tokens[index]

    @property
    def noun_chunks(self):
        """Maximal runs of determiners/numbers, modifiers and a noun."""
        chunk: list[Token] = []
        for token in self.tokens:
            if token.pos_ in ("DET", "NUM", "ADJ", "NOUN"):
                chunk.append(token)
                if token.pos_ == "NOUN":
                    yield Span(chunk)
                    chunk = []
            else:
                chunk = []


class TinyParser:
    """``scorers=tiny``: a word is a noun when the next word is not a modifier of the same phrase
    (it ends the prompt, or precedes a preposition, a conjunction, a verb or punctuation)."""

    def __call__(self, text: str) -> TinyDoc:
        words = re.findall(r"[A-Za-z0-9'-]+|[^\sA-Za-z0-9]", text)
        kinds = []
        for w in words:
            lw = w.lower()
            kinds.append(
                "PUNCT" if not w[0].isalnum() else "DET" if lw in DETERMINERS else "NUM" if lw in NUMBERS or lw.isdigit()
                else "ADP" if lw in ADPOSITIONS else "CCONJ" if lw in CONJUNCTIONS else "VERB" if lw in VERBS else None
            )
        for i, kind in enumerate(kinds):
            if kind is None:
                last = i + 1 == len(kinds) or kinds[i + 1] is not None
                kinds[i] = "NOUN" if last else "ADJ"
        return TinyDoc([Token(w, k, i, "amod" if k == "ADJ" else "") for i, (w, k) in enumerate(zip(words, kinds))])
