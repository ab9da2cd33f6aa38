"""Metric contract and the built-in metric table.

A metric scores a batch of images (float32 tensor ``(N, 3, H, W)`` in ``[0, 1]``,
decoded from the stored uint8 PNGs so that a cached re-run scores exactly the
same pixels) and returns one float per image. Its identity is its name, its
version and its scale: two numbers with different identities never share a
column.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple, Sequence

import torch

from bench.errors import UsageError, WeightsMissingError
from bench.io import hub_offline


@dataclass(frozen=True)
class MetricInfo:
    name: str
    version: str
    higher_is_better: bool
    scale: str  # what one unit means, e.g. "kB of JPEG at quality 95", "logit_scale * cos"
    model_id: str | None = None
    revision: str | None = None


class HubFiles(NamedTuple):
    """Files of one hub repository a metric loads, at a pinned commit: ``bench prefetch`` downloads
    ``patterns`` at ``revision`` and loading asks for the same revision (``LearnedMetric.pin``), so the
    prefetched snapshot is the one loaded. ``revision`` is None only for the ids listed, with their
    reason, in ``tests/test_pins.py`` (no commit of them could be verified)."""

    repo: str
    revision: str | None
    patterns: tuple[str, ...]


@dataclass(frozen=True)
class ReferenceSet:
    """The real images a generated image is compared with (a DreamBench subject's photos)."""

    key: str
    paths: tuple[Path, ...]


class Metric:
    """Base class: subclasses set ``info`` and implement :meth:`score`.

    A metric with ``needs_refs = True`` (DINO, CLIP-I) also gets, for every image, the
    ``ReferenceSet`` of its prompt, and only runs on suites that have them. A
    ``differentiable`` one can be a reward that methods back-propagate through.
    """

    info: MetricInfo
    needs_refs = False
    differentiable = False  # True: ``score`` is built from differentiable torch ops (reward back-propagation)
    needs_prompts = True  # False: the score reads only the pixels (and references), so `bench score` needs no prompts=

    def __init__(self, scorers: str = "official"):
        """``scorers`` selects the weights of learned metrics (``LearnedMetric``); weight-free ones have none."""

    @property
    def name(self) -> str:
        return self.info.name

    @property
    def higher_is_better(self) -> bool:
        return self.info.higher_is_better

    def to(self, device: torch.device | str) -> "Metric":
        return self

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs: Sequence[ReferenceSet] | None = None) -> torch.Tensor:
        """Return a float64 tensor ``(N,)`` of per-image scores."""
        raise NotImplementedError


class ComposedMetric(Metric):
    """A metric built from several loaded parts (a detector and CLIP), moved and prefetched together."""

    def __init__(self, scorers: str = "official"):
        self.info = scorer_info(self.info, scorers)
        self.scorers = scorers
        self.parts: dict[str, "LearnedMetric"] = {}

    def to(self, device):
        for part in self.parts.values():
            part.to(device)
        return self

    def download(self) -> list[str]:
        return [p for part in self.parts.values() for p in part.download()]


class DistributionMetric(Metric):
    """A set-level metric (FID, KID): the whole generated set against a set of real images.

    It maps images to features; the harness folds the generated images' features, overall and per
    group, into streaming statistics while it scores (keeping the rows themselves only when
    ``keeps_features``), computes the real images' once per protocol (cached), and calls
    ``compute``. Metrics with equal ``feature_protocol()`` share one feature pass. Its identity is
    its ``protocol()``: two values computed differently never share a column.
    """

    needs_prompts = False  # the generated set against the real one

    keeps_features = False  # True: ``compute`` needs every feature row (KID), not only mean and covariance

    def features(self, images) -> torch.Tensor:
        """``(N, D)`` features of uint8 RGB PIL images of any size."""
        raise NotImplementedError

    def feature_protocol(self) -> dict:
        """Everything that determines the features (library, mode, resize, extractor, weights)."""
        raise NotImplementedError

    def protocol(self) -> dict:
        return self.feature_protocol()

    def compute(self, gen, ref) -> float:
        """The metric from the generated and real ``FeatureSet`` (``bench.metrics.fid``)."""
        raise NotImplementedError

    def reduce(self, gen, ref) -> dict:
        """``{"value": ...}`` and any spread the metric reports beside it (KID: ``std``)."""
        return {"value": float(self.compute(gen, ref))}

    def replicates(self, gen, ref, masks):
        """The metric (up to a constant) on each subset of the generated rows (``masks``: one bool row
        per subset) against the whole real set, from the rows in ``gen``; None: no interval."""
        return None

    def score(self, images, prompts, refs=None) -> torch.Tensor:
        raise UsageError(f"metric {self.name} compares a whole generated set with real images, not one image: use it in a suite with reference images (`bench eval suite=...`)")


_LOADED: dict[tuple, tuple] = {}  # one copy of each scorer's weights per process, shared by the metrics on it
SCORERS = ("official", "tiny")


def scorer_info(info: MetricInfo, scorers: str) -> MetricInfo:
    """``info`` for the chosen weights: with ``scorers=tiny`` (random tiny models) its version, scale
    and model id say the scores mean nothing, so they never share a column with real ones."""
    if scorers not in SCORERS:
        raise UsageError(f"unknown scorers={scorers}: use official (the canonical weights) or tiny (random tiny models, no download)")
    if scorers == "official":
        return info
    return replace(info, version=f"{info.version}+tiny-random", scale="NOT MEANINGFUL: a random tiny scorer (scorers=tiny)", model_id="tiny-random", revision=None)


@contextmanager
def seeded(seed: int = 0):
    """Build a ``scorers=tiny`` model from a fixed seed without touching the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class LearnedMetric(Metric):
    """A metric with weights, loaded on first use and shared by every metric on the same backbone.

    Subclasses implement ``load_official()`` (the canonical hub weights) and ``load_tiny()`` (a small
    seeded random model of the same family, for ``scorers=tiny`` smoke runs), each returning a
    tuple of the parts ``score`` needs; modules among them are moved to the device, in float16 on GPU.
    ``hub_files`` lists what ``bench prefetch`` downloads, one ``HubFiles(repo, revision, patterns)`` per
    repository loaded (the metric's own and any other: a tokenizer, a processor); loading passes
    ``self.pin(repo)``, the same revision.
    """

    hub_files: tuple = ()
    weight_files = ""  # what the weights are, for the one-line error when they are missing

    def __init__(self, scorers: str = "official"):
        self.info = scorer_info(self.info, scorers)
        self.scorers = scorers
        self.device, self.dtype = torch.device("cpu"), torch.float32

    def to(self, device) -> "LearnedMetric":
        self.device = torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        return self

    def backbone(self) -> tuple:
        """What identifies the loaded weights; metrics returning the same tuple share one copy."""
        return (type(self).__name__, self.info.model_id)

    def hub_kwargs(self, repo: str | None = None) -> dict:
        """``from_pretrained``/``hf_hub_download`` keywords; with ``repo``, also its pinned ``revision``
        (left out for a local folder and an unpinned id, which then load as before: ``main``)."""
        revision = self.pin(repo) if repo is not None else None
        return {"local_files_only": hub_offline(), **({"revision": revision} if revision else {})}

    def pin(self, repo: str) -> str | None:
        """The revision ``hub_files`` pins ``repo`` to (what ``bench prefetch`` downloads); None for a
        local folder (tests, a user's copy). A hub id missing from ``hub_files`` is a bug in the metric:
        it would load ``main`` and never be prefetched, so it raises rather than load unpinned."""
        if Path(repo).exists():
            return None
        for files in self.hub_files:
            if files.repo == repo:
                return files.revision
        raise LookupError(f"{type(self).__name__} loads {repo}, which its hub_files do not list: add HubFiles({repo!r}, REVISION, patterns)")

    def load_official(self) -> tuple:
        raise NotImplementedError

    def load_tiny(self) -> tuple:
        raise NotImplementedError

    def loaded(self) -> tuple:
        key = (*self.backbone(), self.scorers, str(self.device), self.dtype)
        if key not in _LOADED:
            if self.scorers == "tiny":
                parts = self.load_tiny()
            else:
                offline = hub_offline()
                try:
                    parts = self.load_official()
                except (OSError, ValueError, RuntimeError) as err:
                    reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
                    where = "the hub is offline or unreachable" if offline else f"the download failed ({reason})"
                    raise WeightsMissingError(
                        f"metric {self.name}: weights {self.weight_files or self.info.model_id} are not on disk and {where}: run "
                        f"`bench prefetch metrics={self.name}` where the hub is reachable (same HF_HOME), or use scorers=tiny for a smoke test"
                    ) from None
            parts = tuple(p.to(self.device, self.dtype).eval() if isinstance(p, torch.nn.Module) else p for p in parts)
            _LOADED[key] = parts
        return _LOADED[key]

    def url_weights(self, url: str, sha256: str | None) -> Path:
        """A weights file published at a URL, not on the hub (the aesthetic head, clean-fid's Inception,
        BLIP-VQA): ``url`` itself when it is a local file (tests), else downloaded once into
        ``$BENCH_HOME/weights`` and checked against its pinned ``sha256`` (``bench.io.fetch_url``);
        offline without it, one line naming the file and ``bench prefetch``."""
        from bench.errors import DataError
        from bench.io import cache_root, fetch_url

        if Path(url).is_file():
            return Path(url)
        fix = f"run `bench prefetch metrics={self.name}` where the network is reachable (same BENCH_HOME), or save {url} there, or use scorers=tiny for a smoke test"
        try:
            return fetch_url(url, cache_root() / "weights" / Path(url).name, fix, sha256=sha256)
        except DataError as err:
            raise WeightsMissingError(f"metric {self.name}: {err}") from None

    def download(self) -> list[str]:
        """Fetch the weights into the hub cache (``bench prefetch``): every repository of ``hub_files`` at
        its pinned revision, the one loading asks for; returns the local folders."""
        from huggingface_hub import snapshot_download

        return [snapshot_download(f.repo, allow_patterns=list(f.patterns), revision=f.revision) for f in self.hub_files]


# name -> ("module:Class", one-line description); imported lazily by the registry.
BUILTIN_METRICS: dict[str, tuple[str, str]] = {
    "brightness": ("bench.metrics.weightfree:Brightness", "mean Rec.601 luma in [0, 1] (weight-free)"),
    "world-geneval": ("bench.metrics.world:WorldGenEval", "the micro world's exact detector under GenEval's rules: 1 if the image shows what its world caption asks (weight-free)"),
    "world-gold": ("bench.metrics.world:WorldGold", "the micro world's gold utility: correct (0/1) + 0.25 * object size + 0.25 * centering, from its exact detector (weight-free)"),
    "world-clip": ("bench.metrics.world:WorldClip", "CLIP score in the micro world: cos of a tiny CLIP trained on its renders (shipped weights, no download)"),
    "world-clip-i": ("bench.metrics.world:WorldClipI", "CLIP-I in the micro world: mean cos of the world CLIP's image embeddings with 4 exact renders of the caption (its subject photos)"),
    "world-fid": ("bench.metrics.world:WorldFID", "FID in the micro world (set-level): Frechet distance of the world CLIP's image embeddings to exact renders of its grammar"),
    "world-pick": ("bench.metrics.world:WorldPick", "the micro world's learned preference (PickScore's form), trained on pairs its gold utility labelled: the proxy reward (shipped weights)"),
    "colorfulness": (
        "bench.metrics.weightfree:Colorfulness",
        "Hasler-Suesstrunk colorfulness on the 0-255 scale (weight-free)",
    ),
    "jpeg_compressibility": (
        "bench.metrics.weightfree:JpegCompressibility",
        "minus the JPEG size in kB at quality 95, as DDPO defines it (weight-free)",
    ),
    "contrast": ("bench.metrics.weightfree:Contrast", "standard deviation of Rec.601 luma in [0, 1] (weight-free)"),
    "ref_color": (
        "bench.metrics.reference:ColorHistogramSimilarity",
        "histogram intersection of 8x8x8 RGB histograms with the prompt's reference images, in [0, 1] (weight-free)",
    ),
    "pickscore": ("bench.metrics.clip:PickScore", "PickScore v1: logit_scale * cos of yuvalkirstain/PickScore_v1 (CLIP ViT-H/14 fine-tuned on Pick-a-Pic)"),
    "clip-h14": ("bench.metrics.clip:ClipH14", "CLIP score: cos(image, prompt), open_clip ViT-H-14 laion2b_s32b_b79k (as the PSO and Diffusion-DPO tables)"),
    "clip-l14": ("bench.metrics.clip:ClipL14", "CLIP score: cos(image, prompt), OpenAI CLIP ViT-L/14"),
    "clip-b32": ("bench.metrics.clip:ClipB32", "CLIP score: cos(image, prompt), OpenAI CLIP ViT-B/32 (T2I-CompBench's non-spatial backbone)"),
    "aesthetic": ("bench.metrics.clip:Aesthetic", "LAION aesthetic predictor v2 (sac+logos+ava1-l14-linearMSE MLP on OpenAI CLIP ViT-L/14), about 1-10"),
    "clip-i": ("bench.metrics.clip:ClipI", "CLIP-I (DreamBench): cos of OpenAI CLIP ViT-B/32 image embeddings with the subject's photos, mean over photos"),
    "ref_layout": (
        "bench.metrics.reference:ThumbnailCorrelation",
        "Pearson correlation of 8x8 RGB thumbnails with the prompt's reference images, in [-1, 1] (weight-free)",
    ),
    "dino": ("bench.metrics.dino:Dino", "DINO (DreamBench): cos of DINO ViT-S/16 CLS embeddings (facebook/dino-vits16) with the subject's photos, mean over photos"),
    "clip-t": ("bench.metrics.clip:ClipT", "CLIP-T (DreamBench): cos(image, prompt as generated, unique token included), OpenAI CLIP ViT-B/32 (the CLIP-I backbone)"),
    "hpsv2": ("bench.metrics.hps:HPSv2", "HPS v2.0: 100 * cos of xswu/HPSv2 HPS_v2_compressed.pt (open_clip ViT-H-14 fine-tuned on HPD v2); README benchmark models 23.3-28.5"),
    "hpsv2.1": ("bench.metrics.hps:HPSv21", "HPS v2.1: 100 * cos of xswu/HPSv2 HPS_v2.1_compressed.pt (the HPSv2 benchmark's current version); README benchmark models 13.5-33.3"),
    "imagereward": (
        "bench.metrics.imagereward:ImageReward",
        "ImageReward v1.0 (THUDM/ImageReward: BLIP ViT-L + BERT, MLP head), standardized to mean 0 / std 1; differentiable",
    ),
    "text_alignment": (
        "bench.metrics.text_alignment:TextAlignment",
        "LaSRO's Text Alignment Score: BERTScore F1 (roberta-large L17) of the Florence-2-large <DETAILED_CAPTION> caption vs the prompt (not differentiable)",
    ),
    "spm-sd15": (
        "bench.metrics.step_aware:StepAwarePreference",
        "SPO's step-aware preference model for SD1.5 (timestep-conditioned PickScore ViT-H/14; SPO-Diffusion-Models/Step-Aware_Preference_Models): logit_scale * cos at t = 0",
    ),
    "spm-sdxl": (
        "bench.metrics.step_aware:StepAwarePreferenceSDXL",
        "SPO's step-aware preference model for SDXL (sdxl_step-aware_preference_model.bin): logit_scale * cos at t = 0",
    ),
    "fid": ("bench.metrics.fid:FID", "FID (set-level) on the clean-fid 'clean' protocol: PIL bicubic to 299, TorchScript Inception-v3 inception-2015-12-05.pt"),
    "kid": ("bench.metrics.fid:KID", "KID (set-level, raw) on the clean-fid 'clean' protocol: cubic polynomial kernel, 100 subsets of at most 1,000 images, seeded"),
    "geneval-m2f": (
        "bench.metrics.geneval:GenEvalMask2Former",
        "GenEval's rules (objects, count, CLIP ViT-L/14 color, position) on Mask2Former Swin-S COCO instances; NON-CANONICAL: mmdetection's checkpoint unavailable",
    ),
    "blip-vqa": (
        "bench.metrics.vqa:BlipVqa",
        "T2I-CompBench BLIP-VQA: product over the prompt's noun chunks of P(yes), BLIP model_base_vqa_capfilt_large at 480 (color, shape, texture)",
    ),
    "attribute_binding": (
        "bench.metrics.vqa:AttributeBinding",
        "LaSRO Attribute Binding Score: fraction of yes answers of BLIP-VQA to 'is there X?' / 'is the X <attribute>?' per noun chunk",
    ),
    "t2i-spatial-owlv2": (
        "bench.metrics.compbench:Spatial2D",
        "T2I-CompBench 2D spatial rule (2D_spatial_eval.py) on OWLv2 boxes; NON-CANONICAL: UniDet unavailable",
    ),
    "t2i-3d-spatial-owlv2": (
        "bench.metrics.compbench:Spatial3D",
        "T2I-CompBench 3D spatial rule (3D_spatial_eval.py) on OWLv2 boxes and MiDaS DPT-Hybrid depth; NON-CANONICAL: UniDet unavailable",
    ),
    "t2i-numeracy-owlv2": (
        "bench.metrics.compbench:Numeracy",
        "T2I-CompBench numeracy rule (numeracy_eval.py) on OWLv2 boxes; NON-CANONICAL: UniDet unavailable",
    ),
    "t2i-complex-3in1-owlv2": (
        "bench.metrics.compbench:Complex3in1",
        "T2I-CompBench complex 3-in-1: BLIP-VQA, 2D spatial (OWLv2) and CLIP ViT-B/32 without adjectives per sub-list; NON-CANONICAL spatial part",
    ),
}
