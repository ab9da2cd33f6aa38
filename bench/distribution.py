"""Set-level metrics (FID, KID) of a run: the generated set against the suite's real images.

* The real images are a folder (``suite.references=PATH``, or the archive ``bench prefetch``
  extracts into the cache): each prompt's own image (``reference_file``, a template over the prompt's
  row, so ``suite.limit=N`` compares with the N prompts' images and a group's FID with the group's
  images) or, without a template, every image in the folder. They are checked before any generation.
* Both sets go through one preparation: with ``fid_resolution`` R, a center crop to the short side
  and a PIL Lanczos resize to RxR (GigaGAN's COCO protocol: ``CenterCropLongEdge`` + Lanczos), then
  the metric's own features (clean-fid: bicubic to 299, Inception).
* Generated features are folded, overall and per group, into float64 streaming statistics while the
  run scores; their rows are kept (float32) for KID and for the intervals, the real set's for KID.
* Intervals come from those rows, never from another feature pass: the metric on ``n_boot`` random
  halves of the prompts (each with all its images) against the whole real set, and the value plus
  the spread of the halves' values about their mean. Halves, not a bootstrap with replacement: a
  resample's repeated rows act like fewer images and FID grows as the image count shrinks, so on
  synthetic 30k x 2048 features all 16 bootstrap FIDs tried lay above the value (by 1.1 on
  average), and the bootstrap's spread follows its number of repeats (2-9x the spread over new
  generated sets).
  Every half has n/2 distinct prompts, so the same bias, which the centring removes; for a mean,
  the variance over halves is exactly the usual estimate of the whole set's.
* Real features are computed once per (suite, feature protocol, exact file list) and cached under
  ``<cache>/fid-stats/``; a group's subset is a file list of its own, so it has its own entry.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.config import stable_hash
from bench.errors import DataError, UsageError
from bench.images import IMAGE_SUFFIXES, open_rgb, thread_map
from bench.io import progress as progress_bar
from bench.metrics import DistributionMetric
from bench.metrics.fid import FeatureSet, FeatureStats
from bench.suite import RealImages, Suite

log = logging.getLogger(__name__)
PREPROCESS = "center crop to the short side (torchvision center_crop), then PIL Lanczos to {r}x{r}, uint8 (GigaGAN's COCO evaluation)"
REFERENCE_PASSES = 0  # feature passes over real images in this process (the cache's tests count them)


# --------------------------------------------------------------------------- the real images


@dataclass
class RealSet:
    folder: Path
    files: list[Path]  # each real image once, in prompt order (paired) or sorted (a whole folder)
    sizes: list[int]
    labels: dict[str, list[str]] = field(default_factory=dict)  # group column -> label of each file (paired only)
    resolution: int | None = None
    paired: bool = True

    def list_sha256(self, index=None) -> str:
        """Identity of (a subset of) the file list: relative names and byte sizes, not contents."""
        h = hashlib.sha256()
        for i in range(len(self.files)) if index is None else index:
            h.update(f"{self.files[i].relative_to(self.folder).as_posix()}\t{self.sizes[i]}\n".encode())
        return h.hexdigest()

    def identity(self) -> dict:
        """What the run's identity and summary record (not the folder's path, which is machine-specific)."""
        return {"n_images": len(self.files), "files_sha256": self.list_sha256(), "paired": self.paired}


def _source_text(real: RealImages) -> str:
    src = real.source
    if isinstance(src, dict):
        return f"{src.get('file')} of hf://datasets/{src.get('hub')}"
    return str(src) if src else ""


def _missing_hint(suite: Suite) -> str:
    real = suite.real_images
    layout = f"holding {real.template} for every prompt" if real.template else "of real images"
    where = _source_text(real)
    fix = f"set suite.references=FOLDER (a folder {layout}" + (f"; the images of {where}" if where else "") + ")"
    if real.source:
        fix += f" or run `bench prefetch suite={suite.name}` where the network is reachable"
    return fix


def extracted_folder(suite: Suite, cache: Path) -> Path:
    """Where ``bench prefetch`` extracts the suite's reference archive."""
    from bench.io import split_pin

    source = suite.real_images.source
    source = split_pin(source)[0] if isinstance(source, str) else source  # a pin names the same bytes: the same folder
    return cache / "data" / "references" / f"{suite.name}-{stable_hash(source)[:12]}"


def world_source(source) -> bool:
    """``reference_source: {world: {seed, per_tag}}``: the real set is rendered, not downloaded."""
    return isinstance(source, dict) and "world" in source


def render_world_references(spec: dict, dest: Path) -> Path:
    """The micro world's exact renders of ``make_prompts(per_tag, seed)`` (64 px PNGs) as a real set in
    ``dest``: a pure function of the two numbers, written once to a sibling and renamed."""
    from bench.world.scene import make_prompts

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))
    for i, scene in enumerate(make_prompts(int(spec["per_tag"]), int(spec["seed"]))):
        Image.fromarray(scene.render(64)).save(tmp / f"{i:05d}-{scene.tag}.png")
    try:
        tmp.replace(dest)
    except OSError:
        if not dest.is_dir():  # another worker finishing first is no failure
            raise
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def real_set(suite: Suite, cache: Path) -> RealSet:
    """The suite's real images, checked now (before any generation): one DataError line naming
    ``suite.references`` and where to get them when the folder or any image is missing."""
    real = suite.real_images
    if real is None:
        raise DataError(f"suite '{suite.name}' names no real images for its set-level metrics: set references (a folder) and reference_file in its YAML")
    if real.folder:
        folder = Path(real.folder).expanduser()
        if not folder.is_dir():
            raise DataError(f"suite.references={real.folder} is not a folder: {_missing_hint(suite)}")
    else:
        folder = extracted_folder(suite, cache)
        if not folder.is_dir() and world_source(real.source):
            render_world_references(real.source["world"], folder)
        if not folder.is_dir():
            raise DataError(f"suite '{suite.name}' has no reference images here (needed by its set-level metrics): {_missing_hint(suite)}")
    if real.names is None:
        files = _image_files(folder)
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}: {_missing_hint(suite)}")
        return RealSet(folder, files, [f.stat().st_size for f in files], {}, real.resolution, paired=False)
    names = list(dict.fromkeys(real.names))
    if names and not (folder / names[0]).is_file():  # an archive's single top folder (COCO's val2014/)
        subdirs = [d for d in folder.iterdir() if d.is_dir()]
        if len(subdirs) == 1 and (subdirs[0] / names[0]).is_file():
            folder = subdirs[0]
    sizes, missing = [], []
    for name in names:
        try:
            sizes.append((folder / name).stat().st_size)
        except OSError:
            missing.append(name)
    if missing:
        raise DataError(f"{len(missing)} of {len(names)} reference images are missing from {folder} (first: {missing[0]}): {_missing_hint(suite)}")
    first = {}
    for i, name in enumerate(real.names):
        first.setdefault(name, i)  # a file shared by prompts takes the labels of its first prompt
    labels = {column: [values[first[n]] for n in names] for column, values in suite.groups.items()}
    return RealSet(folder, [folder / n for n in names], sizes, labels, real.resolution, paired=True)


def fetch_real_images(suite: Suite, cache: Path) -> Path:
    """``bench prefetch``: download the suite's reference archive (``{hub, file}`` of a hub dataset,
    or a URL) and extract it once into the cache."""
    real = suite.real_images
    if real is None or real.folder:
        return Path(real.folder) if real and real.folder else None
    dest = extracted_folder(suite, cache)
    if dest.is_dir():
        return dest
    if world_source(real.source):
        return render_world_references(real.source["world"], dest)
    if not real.source:
        raise DataError(f"suite '{suite.name}' names no reference_source to download: {_missing_hint(suite)}")
    from bench.io import fetch_url, hub_offline, split_pin

    fix = _missing_hint(suite)
    src = real.source
    if isinstance(src, dict):
        if hub_offline():
            raise DataError(f"cannot download {_source_text(real)}: the hub is offline or unreachable; {fix}")
        from huggingface_hub import hf_hub_download

        archive = Path(hf_hub_download(src["hub"], src["file"], repo_type=src.get("repo_type") or "dataset", revision=src.get("revision")))
    else:
        archive = fetch_url(str(src), cache / "data" / "downloads" / Path(split_pin(str(src))[0]).name, fix)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"))  # this process's own: parallel workers never share one
    try:
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        tmp.replace(dest)
    except (OSError, zipfile.BadZipFile) as err:
        if not dest.is_dir():  # another worker finishing first is no failure
            raise DataError(f"cannot extract {archive} ({err}): {fix}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not isinstance(src, dict):
        archive.unlink(missing_ok=True)  # extracted: the archive (6 GB for COCO val2014) is not kept twice
    return dest


# --------------------------------------------------------------------------- preparation and features


def at_resolution(image: Image.Image, size: int | None) -> Image.Image:
    """``fid_resolution``: center crop to the short side, then Lanczos to size x size (None: as is)."""
    if size is None:
        return image
    from torchvision.transforms.functional import center_crop

    side = min(image.size)
    if image.size != (side, side):
        image = center_crop(image, [side, side])
    return image.resize((size, size), Image.Resampling.LANCZOS)


def feature_protocol(metric: DistributionMetric, resolution: int | None) -> dict:
    """What determines a set's features: the metric's extractor and the suite's preparation."""
    return {**metric.feature_protocol(), "resolution": resolution, "preprocess": PREPROCESS.format(r=resolution) if resolution else "none"}


class Accumulator:
    """Features folded into streaming statistics, overall and per (column, label); the rows are kept
    only if ``keep``. ``owners`` name each row's entry in the label lists (a prompt or a real file)."""

    def __init__(self, labels: dict[str, list[str]], keep: bool):
        self.labels, self.keep = labels, keep
        self.all: FeatureStats | None = None
        self.by: dict[tuple[str, str], FeatureStats] = {}
        self.rows: list[np.ndarray] = []
        self.owners: list[int] = []  # each row's prompt (generated) or real file

    def add(self, feats: torch.Tensor, owners: list[int]) -> None:
        feats = feats.detach().double().cpu()
        if self.all is None:
            self.all = FeatureStats(feats.shape[1])
        self.all.update(feats)
        for column, labels in self.labels.items():
            for label in dict.fromkeys(labels[o] for o in owners):
                rows = [i for i, o in enumerate(owners) if labels[o] == label]
                self.by.setdefault((column, label), FeatureStats(feats.shape[1])).update(feats[rows])
        if self.keep:
            self.rows.append(feats.float().numpy())
            self.owners.extend(owners)

    def subset(self, group: tuple[str, str] | None) -> FeatureSet:
        stats = self.all if group is None else self.by[group]
        if not self.keep:
            return FeatureSet(stats)
        if len(self.rows) > 1:
            self.rows = [np.concatenate(self.rows)]  # once, not once per group
        rows, owners = self.rows[0], np.asarray(self.owners)
        if group is not None:
            labels = self.labels[group[0]]
            keep = np.array([labels[o] == group[1] for o in self.owners])
            rows, owners = rows[keep], owners[keep]
        return FeatureSet(stats, rows, owners)


def _feature_pass(files: list[Path], extractor: DistributionMetric, resolution, acc: Accumulator, batch_size: int, progress: bool, desc: str) -> None:
    for start in progress_bar(range(0, len(files), batch_size), progress, desc=desc, unit="batch"):
        batch = files[start : start + batch_size]
        images = thread_map(lambda p: at_resolution(open_rgb(p), resolution), batch)
        acc.add(extractor.features(images), list(range(start, start + len(batch))))


def half_samples(owners: np.ndarray, n: int, seed: int) -> np.ndarray | None:
    """``n`` random halves of the prompts in ``owners`` (each row's prompt), as a bool mask over the
    rows, one per half; all drawn in one call, so they depend on the seed alone. None below 4 prompts
    (a half needs 2 for a covariance)."""
    prompts, row_prompt = np.unique(owners, return_inverse=True)
    if len(prompts) < 4 or n < 1:
        return None
    order = np.random.default_rng(seed).random((n, len(prompts))).argsort(axis=1, kind="stable")
    chosen = np.zeros((n, len(prompts)), dtype=bool)
    np.put_along_axis(chosen, order[:, : len(prompts) // 2], True, axis=1)
    return chosen[:, row_prompt]


def centered_interval(value: float, replicates: np.ndarray, level: float) -> list[float]:
    """``value`` plus the central ``level`` range of the replicates about their own mean (their
    level is not the value's: a half set's FID is higher)."""
    alpha = (1 - level) / 2
    lo, hi = np.quantile(replicates - replicates.mean(), [alpha, 1 - alpha])
    return [float(value + lo), float(value + hi)]


class SetScorer:
    """The set-level metrics of one run: fed batch by batch by ``score_images``, reduced by ``results``.
    ``n_boot`` prompt halves give each value an interval at ``level`` (0: none), drawn from ``seed``."""

    def __init__(self, metrics: dict[str, DistributionMetric], groups: dict[str, list[str]], real: RealSet, cache: Path, dataset: str, batch_size: int = 32,
                 progress: bool = True, n_boot: int = 0, level: float = 0.95, seed: int = 0):
        self.metrics, self.real, self.cache, self.dataset = metrics, real, Path(cache), dataset
        self.batch_size, self.progress = batch_size, progress
        if n_boot < 0 or not 0 < level < 1:
            raise UsageError(f"set-level intervals need stats.n_boot_sets >= 0 and 0 < stats.level < 1, got {n_boot} and {level}")
        self.n_boot, self.level, self.seed = n_boot, level, seed
        self.groups = {c: v for c, v in groups.items() if c in real.labels}  # per group only with each prompt's own real image
        self.extractors: dict[str, DistributionMetric] = {}  # feature protocol hash -> the metric that computes them
        self.keep: dict[str, bool] = {}
        self.key_of: dict[str, str] = {}
        for name, metric in metrics.items():
            key = stable_hash(feature_protocol(metric, real.resolution))
            self.extractors.setdefault(key, metric)
            self.keep[key] = self.keep.get(key, False) or metric.keeps_features
            self.key_of[name] = key
        self.gen = {key: Accumulator(self.groups, self.keep[key] or n_boot > 0) for key in self.extractors}
        self.cache_files: dict[str, list[str]] = {}
        self.computed: dict[str, bool] = {}

    def add(self, jobs, pixels: torch.Tensor) -> None:
        """A scored batch: its jobs and their uint8 ``(N, H, W, 3)`` pixels."""
        self.add_features(jobs, self.features(pixels))

    def features(self, pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        """A batch's features under each feature protocol (keyed as ``extractors``)."""
        images = thread_map(lambda p: at_resolution(Image.fromarray(p), self.real.resolution), list(pixels.cpu().numpy()))
        return {key: extractor.features(images).detach().cpu() for key, extractor in self.extractors.items()}

    def add_features(self, jobs, features: dict[str, torch.Tensor]) -> None:
        """A batch's features (``features``: computed here, or by another rank) folded in, batch by batch
        in the order one process scores them, so the statistics are the same sums in the same order."""
        owners = [j.prompt_index for j in jobs]
        for key in self.extractors:
            self.gen[key].add(features[key], owners)


    def reference(self, key: str) -> dict:
        """The real set's FeatureSets (overall: None, and per group), from the cache or one feature pass."""
        global REFERENCE_PASSES
        real = self.real
        subsets: dict = {None: list(range(len(real.files)))}
        for column, labels in real.labels.items():
            if column in self.groups:
                for label in sorted(set(labels)):
                    subsets[(column, label)] = [i for i, v in enumerate(labels) if v == label]
        folder = self.cache / "fid-stats"
        paths = {s: folder / f"{self.dataset}-{key[:12]}-{real.list_sha256(idx)[:16]}.npz" for s, idx in subsets.items()}
        self.cache_files[key] = [str(p) for p in paths.values()]
        if all(_cached(p, self.keep[key]) for p in paths.values()):
            self.computed[key] = False
            return {s: FeatureSet.load(p) for s, p in paths.items()}
        REFERENCE_PASSES += 1
        self.computed[key] = True
        log.info("features of %d real images from %s (cached in %s for the next runs)", len(real.files), real.folder, folder)
        acc = Accumulator({c: v for c, v in real.labels.items() if c in self.groups}, self.keep[key])
        _feature_pass(real.files, self.extractors[key], real.resolution, acc, self.batch_size, self.progress, "reference features")
        sets = {s: acc.subset(s) for s in subsets}
        for s, p in paths.items():
            sets[s].save(p)
        return sets

    def results(self, baseline: dict | None = None) -> dict:
        """summary["sets"]: per metric its value, image counts, protocol and real set, and per group."""
        refs = {key: self.reference(key) for key in self.extractors}
        out = {}
        for name, metric in self.metrics.items():
            key = self.key_of[name]
            gen, ref = self.gen[key], refs[key]
            if gen.all is None:
                raise DataError(f"metric {name}: no generated images were scored")
            if self.n_boot:
                log.info("%s: intervals from %d halves of the prompts, overall and per group", name, self.n_boot)
            entry = {
                **self.value(metric, gen.subset(None), ref[None]),
                "higher_is_better": bool(metric.info.higher_is_better),
                "version": metric.info.version,
                "scale": metric.info.scale,
                "protocol": {**metric.protocol(), **feature_protocol(metric, self.real.resolution), "reference": self.real.identity()},
            }
            if baseline and name in baseline and baseline[name].get("value") is not None:
                entry["baseline"] = baseline[name]["value"]
            for group in sorted(gen.by):
                if group in ref:
                    entry.setdefault("by_group", {}).setdefault(group[0], {})[group[1]] = self.value(metric, gen.subset(group), ref[group])
            out[name] = entry
        return out

    def value(self, metric: DistributionMetric, gen: FeatureSet, ref: FeatureSet) -> dict:
        """The metric's value (and spread), its interval where there are 4 prompts or more, and the image counts."""
        out = {"n_images": int(gen.stats.n), "n_reference": int(ref.stats.n)}
        if gen.stats.n < 2 or ref.stats.n < 2:
            return {"value": None, **out, "note": "needs at least 2 generated and 2 real images"}
        try:
            value = metric.reduce(gen, ref)
        except (ValueError, DataError) as err:
            return {"value": None, **out, "note": str(err)}
        halves = half_samples(gen.owners, self.n_boot, self.seed) if gen.owners is not None else None
        try:
            replicates = metric.replicates(gen, ref, halves) if halves is not None else None
        except (ValueError, DataError) as err:
            return {**value, **out, "note": f"no interval: {err}"}
        if replicates is not None:
            value.update(ci=centered_interval(value["value"], replicates, self.level), n_boot=len(replicates), level=self.level)
        return {**value, **out}

    def manifest(self) -> dict:
        return {"reference": {"folder": str(self.real.folder), **self.real.identity()}, "cache_files": self.cache_files, "reference_features_computed": self.computed}


class FeatureRecorder:
    """Stands in for a ``SetScorer`` while a rank scores its share: keeps each batch's features, in
    order, for rank 0 to fold in with everyone's (``SetScorer.add_features``)."""

    def __init__(self, sets: SetScorer):
        self.sets = sets
        self.batches: dict[str, list[torch.Tensor]] = {key: [] for key in sets.extractors}

    def add(self, jobs, pixels: torch.Tensor) -> None:
        for key, feats in self.sets.features(pixels).items():
            self.batches[key].append(feats)


def _cached(path: Path, with_rows: bool) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path) as data:
            return not with_rows or "feats" in data.files
    except (OSError, ValueError):
        return False  # unreadable: recomputed and rewritten


def compare_folders(generated, real, metrics: dict[str, DistributionMetric], resolution: int | None = None, batch_size: int = 32, progress: bool = False) -> dict[str, float]:
    """Folder against folder (every image in each, recursively) with the same preparation and
    features as a run: what ``cleanfid.fid.compute_fid(generated, real)`` computes."""
    keys = {name: stable_hash(feature_protocol(m, resolution)) for name, m in metrics.items()}
    sets = []
    for folder in (Path(generated), Path(real)):
        files = _image_files(folder)
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
        sets.append({})
        for key in dict.fromkeys(keys.values()):  # one feature pass per feature protocol
            users = [metrics[n] for n, k in keys.items() if k == key]
            acc = Accumulator({}, any(m.keeps_features for m in users))
            _feature_pass(files, users[0], resolution, acc, batch_size, progress, f"features {folder.name}")
            sets[-1][key] = acc.subset(None)
    return {name: float(metric.compute(sets[0][keys[name]], sets[1][keys[name]])) for name, metric in metrics.items()}
