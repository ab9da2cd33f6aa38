"""FID from streaming float64 statistics: equal to clean-fid's on the same features, independent
of how the features are batched, and saved statistics read back exactly."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from bench.errors import DataError
from bench.metrics import fid as fid_module
from bench.metrics.fid import FeatureStats, fid, frechet_distance


def features(seed: int, n: int, dim: int = 48, shift: float = 0.0):
    r = np.random.default_rng(seed)
    mix = r.normal(size=(dim, dim)) / np.sqrt(dim)
    return 5.0 + shift + r.normal(size=(n, dim)) @ mix  # far from zero: a one-pass sum of squares would lose digits


def streamed(feats, chunk):
    stats = FeatureStats(feats.shape[1])
    for start in range(0, len(feats), chunk):
        stats.update(torch.from_numpy(feats[start : start + chunk]))
    return stats


def test_fid_equals_clean_fid_on_the_same_features():
    from cleanfid.fid import fid_from_feats

    a, b = features(0, 400), features(1, 300, shift=0.1)
    want = fid_from_feats(a, b)
    got = fid(streamed(a, 64), streamed(b, 7))
    assert got == pytest.approx(want, rel=1e-6)
    assert streamed(a, 400).cov == pytest.approx(np.cov(a, rowvar=False), rel=1e-10, abs=1e-12)


def test_batching_does_not_change_the_statistics():
    a = features(2, 257)
    one, many = streamed(a, 257), streamed(a, 10)
    assert np.allclose(one.mean, many.mean, rtol=0, atol=1e-12) and np.allclose(one.cov, many.cov, rtol=0, atol=1e-12)


def test_identical_statistics_give_zero_and_saved_statistics_read_back(tmp_path):
    a = streamed(features(3, 200), 50)
    assert fid(a, a) == pytest.approx(0.0, abs=1e-6)
    a.save(tmp_path / "ref.npz")
    mu, sigma, n = FeatureStats.load(tmp_path / "ref.npz")
    assert n == 200 and np.array_equal(mu, a.mean) and np.array_equal(sigma, a.cov)
    assert frechet_distance(mu, sigma, a.mean, a.cov) == pytest.approx(0.0, abs=1e-6)
    (tmp_path / "bad.npz").write_bytes(b"not npz")
    with pytest.raises(DataError, match="cannot read FID statistics .*bad.npz.*delete the file"):
        FeatureStats.load(tmp_path / "bad.npz")
    with pytest.raises(DataError, match="at least 2 images"):
        FeatureStats(4).update(np.ones((1, 4))).cov
    with pytest.raises(ValueError, match=r"expected features of shape \(N, 4\)"):
        FeatureStats(4).update(np.ones((3, 5)))


# ---- KID, the clean-fid resize and feature path, folder against folder ----------------------------

from pathlib import Path  # noqa: E402

from PIL import Image  # noqa: E402

from bench.errors import WeightsMissingError  # noqa: E402
from bench.metrics.fid import FID, KID, FeatureSet, clean_resize, kernel_distance  # noqa: E402


@pytest.mark.parametrize("n1,n2,subsets,size", [(300, 250, 10, 100), (40, 60, 5, 1000)])
def test_kid_equals_clean_fid_kernel_distance_on_the_same_features(n1, n2, subsets, size):
    from cleanfid.fid import kernel_distance as clean_kernel_distance

    a, b = features(4, n1), features(5, n2, shift=0.2)
    np.random.seed(7)  # clean-fid draws its subsets from numpy's global generator
    want = clean_kernel_distance(a, b, num_subsets=subsets, max_subset_size=size)
    got = kernel_distance(a, b, num_subsets=subsets, max_subset_size=size, seed=7)
    assert got == pytest.approx(want, rel=1e-9)
    assert kernel_distance(a, b, subsets, size, seed=8) != got  # the seed picks the subsets
    with pytest.raises(DataError, match="KID needs at least 2 images"):
        kernel_distance(a[:1], b)


def smooth_image(rng, size) -> Image.Image:
    """A random low-frequency colour field: features vary between images (noise would average out)."""
    small = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return small.resize(size, Image.Resampling.BILINEAR)


def test_clean_resize_is_clean_fids_resize_to_the_bit():
    from cleanfid.resize import build_resizer

    rng = np.random.default_rng(0)
    for size in [(37, 53), (512, 300), (299, 299)]:
        image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
        want = build_resizer("clean")(np.asarray(image))
        got = clean_resize(image)
        assert got.dtype == np.float32 and got.shape == (299, 299, 3) and np.array_equal(got, want)


def write_folder(folder: Path, seed: int, sizes, suffix=".png") -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    for i, size in enumerate(sizes):
        smooth_image(rng, size).save(folder / f"{i:03d}{suffix}")
    return folder


def gigagan_transform(resolution):
    """GigaGAN evaluation.py's custom_image_tranform, written out here independently of bench."""
    from torchvision.transforms.functional import center_crop

    def transform(pixels):
        image = Image.fromarray(pixels)
        image = center_crop(image, min(image.size))
        return np.array(image.resize((resolution, resolution), Image.Resampling.LANCZOS))

    return transform


@pytest.mark.parametrize("resolution", [None, 64])
def test_folder_fid_equals_clean_fid_compute_fid_with_the_same_extractor(tmp_path, resolution):
    """Our folder-vs-folder path (read, prepare at fid_resolution, clean resize, features, streaming
    statistics) against ``cleanfid.fid.compute_fid`` with our tiny network as its custom extractor."""
    from cleanfid.fid import compute_fid

    from bench.distribution import compare_folders

    gen = write_folder(tmp_path / "gen", 0, [(48, 48)] * 24)
    ref = write_folder(tmp_path / "ref", 1, [(64, 48), (50, 70), (90, 90)] * 8, ".jpg")
    metric = FID("tiny")
    got = compare_folders(gen, ref, {"fid": metric, "kid": KID("tiny")}, resolution, batch_size=16)
    want = compute_fid(
        str(gen), str(ref), mode="clean", custom_feat_extractor=metric.embed, device=torch.device("cpu"), use_dataparallel=False,
        num_workers=0, verbose=False, custom_image_tranform=gigagan_transform(resolution) if resolution else None,
    )
    print(f"parity resolution={resolution}: ours {got['fid']!r} clean-fid {want!r} rel {abs(got['fid'] - want) / want:.2e}")
    assert got["fid"] > 0 and got["fid"] == pytest.approx(want, rel=1e-6)
    assert got["kid"] > 0  # KID's parity with clean-fid is the kernel test above (compute_kid takes no custom extractor)


def save_stand_in(home: Path, layers: torch.nn.Module, dim: int) -> Path:
    return fid_module.save_stand_in(home / "weights" / "inception-2015-12-05.pt", layers, dim)


def check_official_path_equals_clean_fid(home: Path, monkeypatch, dim: int):
    """Our loading and feature path with the weights at the official file name, against clean-fid's
    own ``InceptionV3W`` (clean mode) fed by its own resizer, on the same images."""
    from cleanfid.inception_torchscript import InceptionV3W
    from cleanfid.resize import build_resizer

    monkeypatch.setenv("BENCH_HOME", str(home))
    stand_in = (home / "weights" / fid_module.INCEPTION_FILE).read_bytes()  # checked like the real file, against its own pin
    monkeypatch.setattr(fid_module.InceptionFeatures, "weights_sha256", hashlib.sha256(stand_in).hexdigest())
    rng = np.random.default_rng(2)
    images = [smooth_image(rng, size) for size in [(80, 60), (299, 299), (33, 90)]]
    ours = FID("official").to("cpu").features(images)
    theirs_model = InceptionV3W(str(home / "weights"), download=False, resize_inside=False).eval()
    batch = torch.stack([torch.from_numpy(build_resizer("clean")(np.asarray(im))).permute(2, 0, 1) for im in images])
    with torch.no_grad():
        theirs = theirs_model(batch)
    assert ours.shape == (3, dim) and torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert (ours[0] - ours[1]).abs().max() > 1e-3 * ours.abs().max()  # features that tell images apart: the check is not vacuous
    assert FID("official").feature_protocol()["weights"].endswith("/inception-2015-12-05.pt")


@pytest.mark.filterwarnings("ignore::FutureWarning")  # clean-fid's own torch.jit.load
def test_the_official_torchscript_loading_path_equals_clean_fids_with_a_stand_in(tmp_path, monkeypatch):
    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 9, stride=8), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Conv2d(8, 2048, 1))
    save_stand_in(tmp_path, layers, 2048)  # 2048: InceptionV3W reshapes to it
    check_official_path_equals_clean_fid(tmp_path, monkeypatch, 2048)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_the_official_path_with_a_scripted_full_size_inception_v3(tmp_path, monkeypatch):
    """The real architecture (torchvision Inception-v3 up to pool3, 2048-d, random weights) scripted
    into the official file name: TorchScript of that size loads and runs through our path."""
    save_stand_in(tmp_path, fid_module.random_inception_pool3(), 2048)
    check_official_path_equals_clean_fid(tmp_path, monkeypatch, 2048)


def test_absent_weights_offline_fail_with_one_line_naming_the_file_and_prefetch(tmp_path, monkeypatch, cli):
    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsMissingError) as err:
        FID("official").features([Image.new("RGB", (8, 8))])
    message = str(err.value)
    assert "\n" not in message and "inception-2015-12-05.pt" in message and "bench prefetch metrics=fid" in message and "scorers=tiny" in message
    code, out, err = cli("prefetch", "metrics=fid")
    assert code == 5 and len(err.strip().splitlines()) == 1 and "inception-2015-12-05.pt" in err and "nvlabs-fi-cdn.nvidia.com" in err
    folder = write_folder(tmp_path / "images", 0, [(16, 16)] * 2)
    (tmp_path / "prompts.txt").write_text("a\nb\n")
    code, out, err = cli("score", f"images={folder}", f"prompts={tmp_path / 'prompts.txt'}", "metrics=fid", "scorers=tiny")
    assert code == 2 and "compares a whole generated set with real images" in err and len(err.strip().splitlines()) == 1


def test_feature_sets_save_their_rows_and_read_back(tmp_path):
    feats = features(6, 50).astype(np.float32)
    saved = FeatureSet(streamed(feats, 9), feats)
    saved.save(tmp_path / "ref.npz")
    back = FeatureSet.load(tmp_path / "ref.npz")
    assert back.stats.n == 50 and np.array_equal(back.feats, feats) and np.allclose(back.stats.cov, saved.stats.cov, rtol=1e-12, atol=0)
    assert np.array_equal(back.stats.mean, saved.stats.mean)
    FeatureSet(streamed(feats, 50)).save(tmp_path / "stats.npz")
    assert FeatureSet.load(tmp_path / "stats.npz").feats is None


# ---- what the intervals recompute from the features: FID and KID of subsets, KID's subset spread -------------

from bench.metrics.fid import FrechetToReal, kid_replicates, kid_subsets  # noqa: E402


@pytest.mark.parametrize("n", [200, 30])  # more images than dimensions, and fewer (a singular covariance)
def test_the_fast_frechet_distance_of_a_subset_equals_frechet_distance(n):
    gen, real = features(7, 300, shift=0.1).astype(np.float32), features(8, 400)
    ref = streamed(real, 64)
    fast = FrechetToReal(gen, ref)
    rows = np.random.default_rng(0).choice(300, n, replace=False)
    x = gen[rows].astype(np.float64)
    want = frechet_distance(x.mean(0), np.cov(x, rowvar=False), ref.mean, ref.cov)
    assert want > 1 and fast(rows) == pytest.approx(want, rel=1e-6)
    assert fast(np.arange(300)) == pytest.approx(fid(streamed(gen, 300), ref), rel=1e-6)


def kernel(a, b):
    return (a @ b.T / a.shape[1] + 1) ** 3


def test_kid_reports_the_std_of_its_subset_values_written_out():
    """KID's ``std`` is the std (ddof 0, torchmetrics' and torch-fidelity's) of the per-subset unbiased
    MMD^2, here written out pair by pair on the subsets clean-fid draws (numpy's global generator)."""
    gen, real = features(9, 40, dim=6), features(10, 30, dim=6, shift=0.3)
    np.random.seed(3)
    written = []
    for _ in range(7):
        x, y = real[np.random.choice(30, 12, replace=False)], gen[np.random.choice(40, 12, replace=False)]
        pairs = [(i, j) for i in range(12) for j in range(12) if i != j]
        within = sum(kernel(x[i : i + 1], x[j : j + 1])[0, 0] + kernel(y[i : i + 1], y[j : j + 1])[0, 0] for i, j in pairs) / len(pairs)
        written.append(within - 2 * kernel(x, y).mean())
    values = kid_subsets(gen, real, num_subsets=7, max_subset_size=12, seed=3)
    assert values == pytest.approx(written, rel=1e-9) and values.std() > 0
    out = KID("tiny").reduce(FeatureSet(streamed(gen, 40), gen), FeatureSet(streamed(real, 30), real))
    default = kid_subsets(gen, real)  # the metric's own 100 subsets (of min(40, 30, 1000) = 30 images)
    assert out["value"] == kernel_distance(gen, real) and out["std"] > 0
    assert out["std"] == pytest.approx(np.sqrt(np.mean((default - default.mean()) ** 2)), rel=1e-12)


def test_kid_of_subsets_with_every_pair_equals_the_written_out_sum():
    gen, real = features(11, 20, dim=5), features(12, 15, dim=5, shift=0.2)
    masks = np.random.default_rng(1).random((4, 20)) < 0.5
    own = kernel(real, real)
    real_term = (own.sum() - np.trace(own)) / (15 * 14)  # the same for every subset: kid_replicates leaves it out
    for mask, got in zip(masks, kid_replicates(gen, real, masks)):
        x = gen[mask]
        k = len(x)
        within = sum(kernel(x[i : i + 1], x[j : j + 1])[0, 0] for i in range(k) for j in range(k) if i != j) / (k * (k - 1))
        assert got + real_term == pytest.approx(within + real_term - 2 * kernel(x, real).mean(), rel=1e-9)
