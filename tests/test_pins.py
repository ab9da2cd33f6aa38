"""Every hub repository the harness can load is pinned to a commit (issue 17, item 1).

The ids are collected statically: the ``hub_files`` and ``MetricInfo`` of every built-in metric (and of
the parts a composite metric loads), the open_clip repositories behind the CLIP-score metrics, the
hub-id constants of the metric modules, and the ``repo``/``hub``/``source`` fields of every model,
suite, protocol, method and dataset YAML. Each needs a 40-hex revision, except the ids of
``UNPINNED`` below, each with the reason no commit could be used; a new unpinned id fails here.
The prefetch and loading paths are checked to ask for those revisions, with the hub functions
replaced by recorders (no network).
"""

from __future__ import annotations

import importlib
import pkgutil
import re
from pathlib import Path

import pytest
import yaml

import bench
from bench.metrics import BUILTIN_METRICS, HubFiles, LearnedMetric
from bench.scoring import make_metric

BENCH = Path(bench.__file__).parent
COMMIT = re.compile(r"^[0-9a-f]{40}$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
CLIP_SCORE_METRICS = ("clip-h14", "clip-l14", "clip-b32", "clip-i", "clip-t", "aesthetic")

# (where, hub id) -> why it stays on `main`. Only add an id with its reason; a pinned id must leave the list.
UNPINNED: dict[tuple[str, str], str] = {
    ("metric aesthetic", "christophschuhmann/improved-aesthetic-predictor"): "a GitHub repository, not a hub id: the head is fetched at commit 6934dd8 by URL, sha256-checked",
    ("suites/pickapic.yaml", "yuvalkirstain/pickapic_v1_no_images"): "no commit of it could be verified",
    ("suites/protocols/dspo-table1.yaml", "yuvalkirstain/pickapic_v2_no_images"): "no commit of it could be verified",
    ("datasets/pokemon-blip-captions.yaml", "reach-vb/pokemon-blip-captions"): "no commit of it could be verified",
    ("metric geneval-m2f", "facebook/mask2former-swin-small-coco-instance"): "no commit of it could be verified (no public project pins it)",
    ("bench.metrics.geneval.M2F_REPO", "facebook/mask2former-swin-small-coco-instance"): "the same repository, named as a constant",
}


def metric_parts(metric) -> list:
    """The metric and the learned metrics it is built from (T2I-CompBench's composites)."""
    parts = getattr(metric, "parts", {}) or {}
    return [metric, *(p for part in parts.values() for p in metric_parts(part))]


def open_clip_repo(metric) -> str | None:
    """The hub repository open_clip downloads for a CLIP-score metric (HPS replaces those weights: none)."""
    from bench.metrics.clip import OpenClipScore
    from bench.metrics.hps import HPSv2

    if not isinstance(metric, OpenClipScore) or isinstance(metric, HPSv2):
        return None
    import open_clip

    return open_clip.get_pretrained_cfg(metric.arch, metric.tag)["hf_hub"].strip("/")


def metric_pins() -> list[tuple[str, str, str | None]]:
    """(where, hub id, revision) for every repository a built-in metric loads or names."""
    out = []
    for name in BUILTIN_METRICS:
        where, parts = f"metric {name}", metric_parts(make_metric(name))
        files = [f for part in parts for f in getattr(part, "hub_files", ()) or ()]
        out += [(where, f.repo, f.revision) for f in files]
        for part in parts:
            model_id = (part.info.model_id or "").split(" ")[0]  # "google/owlv2-... + Intel/dpt-...": the first
            repo = "/".join(model_id.split("/")[:2])  # SPO's "owner/name/checkpoint.bin"
            if HUB_ID.match(repo):
                out.append((where, repo, part.info.revision or next((f.revision for f in files if f.repo == repo), None)))
            if open_clip_repo(part):  # fetched by us at its pin, then loaded by open_clip from the file
                out.append((where, open_clip_repo(part), part.pin(open_clip_repo(part))))
    return out


def constant_ids() -> list[tuple[str, str]]:
    """(module.NAME, hub id) for the hub-id constants of the metric modules (BERT_TOKENIZER, PROCESSOR_ID,
    FLORENCE_REPOS, SPACY_REPO, BERT_REPO, ...): every upper-case str, or dict of str, shaped owner/name."""
    import bench.metrics as package

    out = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"bench.metrics.{info.name}")
        for name, value in vars(module).items():
            if name.isupper() and not name.startswith("_"):
                values = value.values() if isinstance(value, dict) else [value]
                out += [(f"{module.__name__}.{name}", v) for v in values if isinstance(v, str) and HUB_ID.match(v)]
    return out


def yaml_pins() -> list[tuple[str, str, str | None]]:
    """(file, hub id, revision) from every model, suite, protocol, method and dataset YAML: a mapping with
    ``hub`` or ``repo`` (its own ``revision``), and a top-level ``source`` hub id (the file's ``revision``)."""
    out = []

    def walk(node, where):
        if isinstance(node, dict):
            for key in ("hub", "repo"):
                if isinstance(node.get(key), str) and HUB_ID.match(node[key]):
                    out.append((where, node[key], node.get("revision")))
            for value in node.values():
                walk(value, where)
        elif isinstance(node, list):
            for value in node:
                walk(value, where)

    for folder in ("models/configs", "suites", "datasets", "methods"):
        for path in sorted((BENCH / folder).rglob("*.yaml")):
            where = str(path.relative_to(BENCH)).removeprefix("models/configs/")
            cfg = yaml.safe_load(path.read_text()) or {}
            source = cfg.get("source")
            if isinstance(source, str) and HUB_ID.match(source) and not source.endswith(".parquet"):
                out.append((where, source, cfg.get("revision", "(no revision key)")))
            walk(cfg, where)
    return out


def all_pins() -> list[tuple[str, str, str | None]]:
    from bench.metrics.nlp import SPACY_REPO, SPACY_REVISION
    from bench.metrics.text_alignment import FLORENCE_REPOS, FLORENCE_REVISIONS

    florence = [("bench.metrics.text_alignment", FLORENCE_REPOS[size], FLORENCE_REVISIONS[size]) for size in FLORENCE_REPOS]  # text_alignment's size option
    return metric_pins() + yaml_pins() + [("bench.metrics.nlp", SPACY_REPO, SPACY_REVISION), *florence]


def test_the_collection_finds_the_ids_the_issue_names():
    ids = {repo for _, repo, _ in all_pins()} | {v for _, v in constant_ids()}
    for repo in ["THUDM/ImageReward", "google-bert/bert-base-uncased", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "FacebookAI/roberta-large",
                 "florence-community/Florence-2-base", "spacy/en_core_web_sm", "Intel/dpt-hybrid-midas", "latent-consistency/lcm-sdxl",
                 "nateraw/parti-prompts", "zhwang/HPDv2", "playgroundai/MJHQ-30K", "yuvalkirstain/pickapic_v2", "segmind/SSD-1B"]:
        assert repo in ids, repo


def test_every_hub_id_is_pinned_to_a_commit_or_listed_with_its_reason():
    unpinned = sorted({(w, r, str(v)) for w, r, v in all_pins() if not (isinstance(v, str) and COMMIT.match(v)) and (w, r) not in UNPINNED})
    assert unpinned == [], "pin these to a 40-hex commit (revision), or add them to UNPINNED with the reason"
    listed_but_pinned = sorted((w, r) for w, r, v in all_pins() if (w, r) in UNPINNED and v)
    assert listed_but_pinned == [], "these are pinned now: take them off UNPINNED"
    found = {(w, r) for w, r, _ in all_pins()} | set(constant_ids())
    assert sorted(set(UNPINNED) - found) == [], "UNPINNED lists ids nothing loads any more"


def test_every_hub_id_constant_is_pinned_wherever_it_is_loaded():
    """A module constant names a repository that some metric loads: it must be pinned there (or listed)."""
    pinned = {r for _, r, v in all_pins() if v and COMMIT.match(v)}
    missing = sorted((where, repo) for where, repo in constant_ids() if repo not in pinned and (where, repo) not in UNPINNED)
    assert missing == []


def test_one_repository_has_one_pin_everywhere():
    """PickScore_v1 and the laion ViT-H/14 are loaded by two metrics each: the same commit in both."""
    revisions: dict[str, set] = {}
    for _, repo, revision in all_pins():
        if revision and COMMIT.match(revision):
            revisions.setdefault(repo, set()).add(revision)
    assert {r: v for r, v in revisions.items() if len(v) > 1} == {}


def test_the_pins_are_the_researched_commits():
    pins = {repo: revision for _, repo, revision in all_pins()}
    assert pins["latent-consistency/lcm-sdxl"] == "843cb4058e2bb79edc70a6d8002e1a96feddfd14"
    assert pins["latent-consistency/lcm-ssd-1b"] == "9855549ae774a7069116db8bcbfebcf64bfcdf13"
    assert pins["THUDM/ImageReward"] == "ba3af6204edef2c89cb0e47a0a7c62b9b2fc8514"
    assert pins["google-bert/bert-base-uncased"] == "86b5e0934494bd15c9632b12f734a8a67f723594"
    assert pins["facebook/dino-vits16"] == "a7a4d161f5c0bd70478c05ca5777ec7cd8848021"
    assert pins["google/owlv2-base-patch16-ensemble"] == "cfd3195ba4ea9592eec887ded089f4c08eff231d"
    assert pins["Intel/dpt-hybrid-midas"] == "11eaf7a1cf4bd70740697dbc216f98980c0aeb03"
    assert pins["FacebookAI/roberta-large"] == "722cf37b1afa9454edce342e7895e588b6ff1d59"
    assert pins["spacy/en_core_web_sm"] == "8fb6f8155286360bf5486fe399e2738d1df7ded2"
    assert pins["yuvalkirstain/PickScore_v1"] == "a4e4367c6dfa7288a00c550414478f865b875800"
    assert pins["stabilityai/stable-diffusion-xl-base-1.0"] == "462165984030d82259a11f4367a4eed129e94a7b"
    assert pins["yuvalkirstain/pickapic_v2"] == "12d45c8a6fcbc35c18a067efb24d993caaf4b8a7"
    assert pins["nateraw/parti-prompts"] == "944b156abfdad7627c3221b5ec4f6a6fb060a197"
    assert pins["sayakpaul/drawbench"] == "ad794cba698c253ffdb6d18eff3fc87b004c1135"
    assert pins["playgroundai/MJHQ-30K"] == "15b0a659e066e763d0e9a6cd8f00e25f8af5e084"
    assert pins["zhwang/HPDv2"] == "b9517430f34b1080d4f741118d2a440155a165cd"
    assert pins["florence-community/Florence-2-large"] == "4271c66b88cdbc05735372ec13b2360108de5317"
    assert pins["timm/vit_large_patch14_clip_224.openai"] == "18d0535469bb561bf468d76c1d73aa35156c922b"
    assert pins["timm/vit_base_patch32_clip_224.openai"] == "a6f597a30f7b82c51704746581f9a4e41421e878"
    laion = {v for w, r, v in all_pins() if r == "laion/CLIP-ViT-H-14-laion2B-s32B-b79K" and v}
    assert laion == {"1c2b8495b28150b8a4922ee1c8edee224c284c0c"}


# --------------------------------------------------------------------------- prefetch and loading ask for the pins


class Recorder:
    """Stands in for ``snapshot_download`` / ``hf_hub_download``: records (repo, file, revision), returns a path."""

    def __init__(self, tmp_path: Path):
        self.calls: list[tuple[str, str | None, str | None]] = []
        self.tmp_path = tmp_path

    def snapshot(self, repo_id, revision=None, allow_patterns=None, **kwargs):
        self.calls.append((repo_id, None, revision))
        return str(self.tmp_path)

    def file(self, repo_id, filename, revision=None, **kwargs):
        self.calls.append((repo_id, filename, revision))
        return str(self.tmp_path / Path(filename).name)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Recorder:
    import huggingface_hub

    recorder = Recorder(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", recorder.snapshot)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", recorder.file)
    monkeypatch.setattr(LearnedMetric, "url_weights", lambda self, url, sha256: tmp_path / Path(url).name)  # BLIP-VQA, aesthetic: not the hub
    return recorder


@pytest.mark.parametrize("name", ["pickscore", "imagereward", "blip-vqa", "dino", "hpsv2.1", "spm-sd15", "text_alignment", "t2i-3d-spatial-owlv2"])
def test_prefetch_downloads_every_repository_at_its_pin(name, hub):
    metric = make_metric(name)
    metric.download()
    files = [f for part in metric_parts(metric) for f in getattr(part, "hub_files", ())]
    assert files and all(isinstance(f, HubFiles) for f in files)
    from bench.metrics.nlp import SPACY_REPO, SPACY_REVISION

    expected = {(f.repo, f.revision) for f in files} | ({(SPACY_REPO, SPACY_REVISION)} if name in ("blip-vqa", "t2i-3d-spatial-owlv2") else set())
    assert {(repo, revision) for repo, _, revision in hub.calls} == expected  # every repository, each at its pin


def test_prefetch_takes_the_secondary_repositories_at_their_own_pins(hub):
    """Not only the metric's own repository: ImageReward's BERT tokenizer, PickScore's laion processor,
    the step-aware model's PickScore config and laion tokenizer, text_alignment's RoBERTa, spaCy's wheel."""
    for name in ("imagereward", "pickscore", "spm-sdxl", "text_alignment", "t2i-numeracy-owlv2"):
        make_metric(name).download()
    asked = {(repo, revision) for repo, _, revision in hub.calls}
    assert ("google-bert/bert-base-uncased", "86b5e0934494bd15c9632b12f734a8a67f723594") in asked
    assert ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", "1c2b8495b28150b8a4922ee1c8edee224c284c0c") in asked
    assert ("yuvalkirstain/PickScore_v1", "a4e4367c6dfa7288a00c550414478f865b875800") in asked
    assert ("FacebookAI/roberta-large", "722cf37b1afa9454edce342e7895e588b6ff1d59") in asked
    assert ("spacy/en_core_web_sm", "8fb6f8155286360bf5486fe399e2738d1df7ded2") in asked
    assert ("florence-community/Florence-2-large", "4271c66b88cdbc05735372ec13b2360108de5317") in asked
    assert {r for r, _, v in hub.calls if v is None} == set()


class Stop(Exception):
    """Ends a load once the recorded call is made."""


def recording(calls: list, stop: bool = False):
    def from_pretrained(name, *args, **kwargs):
        calls.append((str(name), kwargs.get("revision")))
        if stop:
            raise Stop
        return object()

    return staticmethod(from_pretrained)


def test_loading_asks_for_the_pins_of_the_secondary_repositories(hub, monkeypatch):
    import transformers

    from bench.metrics import clip, imagereward, step_aware, text_alignment

    calls: list = []
    monkeypatch.setattr(transformers.CLIPModel, "from_pretrained", recording(calls))
    monkeypatch.setattr(transformers.CLIPTokenizer, "from_pretrained", recording(calls))
    clip.PickScore().load_official()
    monkeypatch.setattr(transformers.BertTokenizer, "from_pretrained", recording(calls, stop=True))
    with pytest.raises(Stop):
        imagereward.ImageReward().load_official()
    monkeypatch.setattr(transformers.CLIPConfig, "from_pretrained", recording(calls))
    monkeypatch.setattr(step_aware, "load_step_aware", lambda path, config: object())
    step_aware.StepAwarePreference().load_official()
    monkeypatch.setattr(transformers.Florence2ForConditionalGeneration, "from_pretrained", recording(calls))
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", recording(calls))
    monkeypatch.setattr(transformers.AutoModel, "from_pretrained", recording(calls, stop=True))
    with pytest.raises(Stop):
        text_alignment.TextAlignment().load_official()
    assert calls == [
        ("yuvalkirstain/PickScore_v1", clip.PICKSCORE_REVISION), ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", clip.LAION_H14_REVISION),
        ("google-bert/bert-base-uncased", imagereward.BERT_TOKENIZER_REVISION),
        ("yuvalkirstain/PickScore_v1", clip.PICKSCORE_REVISION), ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", clip.LAION_H14_REVISION),
        ("florence-community/Florence-2-large", text_alignment.FLORENCE_REVISIONS["large"]), ("florence-community/Florence-2-large", text_alignment.FLORENCE_REVISIONS["large"]),
        ("FacebookAI/roberta-large", text_alignment.BERT_REVISION),
    ]
    files = [(r, f, v) for r, f, v in hub.calls]
    assert ("THUDM/ImageReward", "ImageReward.pt", imagereward.IMAGEREWARD_REVISION) in files
    assert (step_aware.SPM_REPO, "sd-v1-5_step-aware_preference_model.bin", step_aware.SPM_REVISION) in files


def test_a_hub_id_missing_from_hub_files_is_refused_not_loaded_unpinned():
    from bench.metrics.clip import PickScore

    with pytest.raises(LookupError, match="loads someone/else, which its hub_files do not list"):
        PickScore().pin("someone/else")
    assert PickScore().pin(str(Path(__file__).parent)) is None  # a local folder has no revision


def test_bench_prefetch_of_a_model_takes_its_unet_at_its_pin(hub, tmp_path):
    from bench.cli import main

    assert main(["prefetch", "model=sdxl-lcm", "metrics=", f"cache_dir={tmp_path}"]) == 0
    assert hub.calls == [
        ("stabilityai/stable-diffusion-xl-base-1.0", None, "462165984030d82259a11f4367a4eed129e94a7b"),
        ("latent-consistency/lcm-sdxl", None, "843cb4058e2bb79edc70a6d8002e1a96feddfd14"),
        ("madebyollin/sdxl-vae-fp16-fix", None, "207b116dae70ace3637169f1ddd2434b91b3a8cd"),
    ]


def test_hub_prompt_sets_load_at_their_pins(hub, tmp_path, monkeypatch):
    import json

    import datasets

    from bench.config import compose, to_dict
    from bench.suite import load_suite

    asked = []

    def load_dataset(repo, split=None, revision=None, **kwargs):
        asked.append((repo, split, revision))
        return datasets.Dataset.from_list([{"Prompt": "a cat", "Category": "Animals", "Challenge": "Basic"}])

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    suite = load_suite(to_dict(compose(["suite=parti"]))["suite"])
    assert asked == [("nateraw/parti-prompts", "train", "944b156abfdad7627c3221b5ec4f6a6fb060a197")]
    assert suite.source == "hf://datasets/nateraw/parti-prompts@944b156abfdad7627c3221b5ec4f6a6fb060a197 [train]"
    for style in ("anime", "concept-art", "paintings", "photo"):
        (tmp_path / f"{style}.json").write_text(json.dumps([f"a {style} prompt"]))
    load_suite(to_dict(compose(["suite=hpsv2"]))["suite"])
    assert {(r, v) for r, _, v in hub.calls} == {("zhwang/HPDv2", "b9517430f34b1080d4f741118d2a440155a165cd")} and len(hub.calls) == 4


def test_a_local_parquet_in_place_of_pickapic_keeps_no_hub_revision(tmp_path):
    """data=FILE.parquet takes pickapic-v2.yaml's settings but not its hub commit: the checkpoint key of a
    local run is the one it had before the dataset was pinned."""
    from bench.config import compose, to_dict
    from bench.trainer import data_identity

    parquet = tmp_path / "pairs.parquet"
    parquet.write_bytes(b"")
    data = to_dict(compose([f"data={parquet}"]))["data"]
    assert data["source"] == str(parquet) and data["revision"] is None
    hub = to_dict(compose(["data=pickapic-v2"]))["data"]
    assert hub["revision"] == "12d45c8a6fcbc35c18a067efb24d993caaf4b8a7" and data_identity(hub)["revision"] == hub["revision"]
    assert data_identity({**hub, "source": str(parquet)})["revision"] is None  # data=pickapic-v2 data.source=FILE alike


def test_dpt_loads_the_pytorch_bin_of_its_pinned_commit_from_the_hub_cache_offline(tmp_path, monkeypatch):
    """Intel/dpt-hybrid-midas at 11eaf7a has pytorch_model.bin and no model.safetensors: a hub cache holding
    that snapshot loads (offline, through the weights-only unpickler), and prefetch asks for the .bin."""
    import huggingface_hub.constants
    import torch

    from bench.metrics.compbench import DPT_REVISION, MidasDepth

    tiny = MidasDepth("tiny").load_tiny()[0]
    snapshot = tmp_path / "hub" / "models--Intel--dpt-hybrid-midas" / "snapshots" / DPT_REVISION
    tiny.config.save_pretrained(snapshot)
    torch.save(tiny.state_dict(), snapshot / "pytorch_model.bin")  # transformers 5 writes safetensors only
    assert sorted(p.name for p in snapshot.iterdir()) == ["config.json", "pytorch_model.bin"]
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    (model,) = MidasDepth().load_official()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), tiny.state_dict().values()))
    assert "pytorch_model.bin" in MidasDepth.hub_files[0].patterns


def test_open_clip_weights_load_at_their_pin_with_the_tags_preprocessing(hub, monkeypatch, tmp_path):
    """open_clip fetches a tag's weights from the hub's main; we fetch the same file at the pinned commit
    and load it from disk with the preprocessing open_clip applies for the tag (equal, checked here with
    weight loading off: ViT-B-32 'openai')."""
    import open_clip

    from bench.metrics import clip

    weights = tmp_path / clip.OPEN_CLIP_WEIGHTS
    weights.write_bytes(b"")
    fetched = []
    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda repo, name, **kw: fetched.append((repo, name, kw.get("revision"))) or str(weights))
    real_create = open_clip.create_model_and_transforms
    made = {}
    monkeypatch.setattr(open_clip, "create_model_and_transforms", lambda arch, **kw: made.setdefault("ours", real_create(arch, load_weights=False, **kw)))
    clip.ClipB32().load_official()
    assert fetched == [("timm/vit_base_patch32_clip_224.openai", "open_clip_model.safetensors", "a6f597a30f7b82c51704746581f9a4e41421e878")]
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda cfg, **kw: str(weights))
    theirs = real_create("ViT-B-32", pretrained="openai", load_weights=False)
    ours = made["ours"]
    assert repr(ours[2]) == repr(theirs[2]) and repr(ours[1]) == repr(theirs[1])  # the eval and train transforms
    assert type(ours[0].visual.transformer.resblocks[0].mlp.gelu) is type(theirs[0].visual.transformer.resblocks[0].mlp.gelu)
    for arch, tag in (("ViT-L-14", "openai"), ("ViT-H-14", "laion2b_s32b_b79k")):
        cfg = open_clip.get_pretrained_cfg(arch, tag)
        assert clip.tag_preprocess(cfg) == {f"image_{k}": cfg[k] for k in ("mean", "std", "interpolation", "resize_mode") if cfg.get(k) is not None}
