"""The FID suites: mjhq30k (a synthesized meta_data.json and reference folder in its layout) and
coco30k (the stand-in COCO-30k CSV of tests/data/mini, synthesized images for its ids), end to end
with tiny scorers; the real CSV's contents (BENCH_TEST_DATA); the reference statistics cache; and the
one-line failures when the real images are missing."""

from __future__ import annotations

import hashlib
import json
import zipfile

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from bench import distribution
from bench.config import compose, to_dict
from bench.errors import DataError, UsageError
from bench.suite import load_suite, read_prompt_rows
from conftest import photo, stand_in, synth_mjhq

COCO_CSV = "coco/rohitgandikota-erasing/coco_30k.csv"  # relative to the data folder: the real one or tests/data/mini
COCO_SHA256 = "bea67ba57b09ec8fbc6ecdfb0dc562ebbf2eb92273cad91a1cc2d006a7bd76bb"


def suite(name, *overrides):
    return load_suite(to_dict(compose([f"suite={name}", *overrides]))["suite"])


def run_dir_of(tmp_path, prefix):
    return next(d for d in (tmp_path / "runs").iterdir() if d.name.startswith(prefix))


def count_feature_images(monkeypatch) -> list[int]:
    """The batch sizes every Inception feature pass sees (generated and real images alike)."""
    from bench.metrics.fid import InceptionFeatures

    seen, features = [], InceptionFeatures.features
    monkeypatch.setattr(InceptionFeatures, "features", lambda self, images: seen.append(len(images)) or features(self, images))
    return seen


def test_mjhq30k_eval_end_to_end_prints_fid_overall_and_by_category_and_caches_the_reference(cli, tmp_path, cache_dir, monkeypatch):
    meta, refs = synth_mjhq(tmp_path)
    args = ["eval", "suite=mjhq30k", "model=tiny", "suite.limit=4", f"suite.source={meta}", f"suite.references={refs}", "scorers=tiny", "gen.steps=2"]
    passes = distribution.REFERENCE_PASSES
    seen = count_feature_images(monkeypatch)
    code, out, err = cli(*args)
    assert code == 0, err
    assert distribution.REFERENCE_PASSES == passes + 1
    assert sum(seen) == 4 + 4  # each generated and each real image once: the intervals reuse those features
    assert "set-level metrics (the generated set against the real images):" in out and "set-level metrics by category:" in out
    assert "| fid " in out and "| kid " in out and "| animals " in out and "| food " in out and "NOT MEANINGFUL" in out
    run_dir = run_dir_of(tmp_path, "mjhq30k-")
    summary = json.loads((run_dir / "summary.json").read_text())
    fid, kid = summary["sets"]["fid"], summary["sets"]["kid"]
    assert fid["n_images"] == 4 and fid["n_reference"] == 4 and fid["value"] > 0 and kid["value"] is not None and fid["higher_is_better"] is False
    assert {g: (v["n_images"], v["n_reference"]) for g, v in fid["by_group"]["category"].items()} == {"animals": (2, 2), "food": (2, 2)}
    assert all(v["value"] > 0 for v in fid["by_group"]["category"].values())
    for m in (fid, kid):  # 4 prompts: halves of 2; a category's 2 prompts are too few for an interval
        assert m["ci"][0] < m["value"] < m["ci"][1] and m["n_boot"] == 200 and m["level"] == 0.95
        assert all("ci" not in v for v in m["by_group"]["category"].values())
    assert kid["std"] == pytest.approx(0, abs=1e-12) and "std" not in fid  # 4 images: each of KID's subsets is all of them
    assert "95% CI" in out and "subset std" in out and "over 200 random halves of the prompts" in out
    protocol = fid["protocol"]
    assert protocol["library"] == "clean-fid" and protocol["mode"] == "clean" and protocol["resolution"] == 1024 and "bicubic to 299x299" in protocol["resize"]
    assert "Lanczos to 1024x1024" in protocol["preprocess"] and "NOT MEANINGFUL" in protocol["feature_extractor"]
    assert protocol["reference"]["n_images"] == 4 and protocol["reference"]["paired"] is True and kid["protocol"]["kid"]["num_subsets"] == 100
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["metrics"]["fid"]["protocol"] == protocol and manifest["identity"]["real_images"]["resolution"] == 1024
    assert list(manifest["set_metrics"]["reference_features_computed"].values()) == [True]  # fid and kid share one feature pass
    scores = pd.read_parquet(run_dir / "scores.parquet")
    assert "fid" not in scores.columns and "kid" not in scores.columns and {"clip-h14", "pickscore", "category"} <= set(scores.columns)

    stats = sorted((cache_dir / "fid-stats").glob("mjhq30k-*.npz"))
    assert len(stats) == 3  # overall, animals, food: one file list each
    mtimes = [p.stat().st_mtime_ns for p in stats]
    with np.load(stats[0]) as data:
        assert {"mu", "sigma", "n", "feats"} <= set(data.files)
    summary_bytes = (run_dir / "summary.json").read_bytes()

    del seen[:]
    code, out2, err = cli(*args)  # cached images and cached reference statistics: nothing recomputed, same bytes
    assert code == 0, err
    assert distribution.REFERENCE_PASSES == passes + 1 and [p.stat().st_mtime_ns for p in stats] == mtimes
    assert sum(seen) == 4  # the generated images' features (scoring); none for the real set or the intervals
    assert (run_dir / "summary.json").read_bytes() == summary_bytes
    assert list(json.loads((run_dir / "manifest.json").read_text())["set_metrics"]["reference_features_computed"].values()) == [False]

    code, out3, err = cli(*args, "suite.fid_resolution=64")  # another protocol: another cache entry
    assert code == 0, err
    assert distribution.REFERENCE_PASSES == passes + 2 and len(list((cache_dir / "fid-stats").glob("mjhq30k-*.npz"))) == 6

    from bench.report import check, collect_runs

    board = collect_runs(tmp_path / "runs")
    assert {"fid@1024px", "fid@64px", "kid@1024px"} <= set(board.columns)  # FIDs at two resolutions never share a column
    assert [r["ok"] for r in check(summary, {"sets.fid.value": {"min": 0.0}, "sets.fid.by_group.category.food.value": {"max": -1.0}})] == [True, False]


@pytest.fixture
def coco_csv(mini_data):
    return mini_data / COCO_CSV


@pytest.fixture
def mini_coco(coco_csv):
    """Overrides for the coco30k suite on the stand-in CSV, recorded as the published set."""
    return stand_in("coco30k", coco_csv)


def test_coco30k_loads_the_real_csv_with_its_image_ids_and_quoted_newlines(shared_data):
    csv = shared_data / COCO_CSV
    s = suite("coco30k", f"suite.source={csv}")
    assert len(s.prompts) == 30000 and s.canonical is True and s.sha256 == COCO_SHA256
    assert sum("\n" in p for p in s.prompts) == 97 and s.prompts[0] == "A bicycle replica with a clock as the front wheel."
    real = s.real_images
    assert real.names[0] == "COCO_val2014_000000203564.jpg" and len(set(real.names)) == 30000 and real.resolution == 256
    assert real.folder is None and real.source == "http://images.cocodataset.org/zips/val2014.zip#sha256=fe9be816052049c34717e077d9e34aa60814a55679f804cd043e3cbee3b9fde0"
    assert s.metrics == ["fid", "kid", "clip-b32"]
    limited = suite("coco30k", f"suite.source={csv}", "suite.limit=3")
    assert limited.real_images.names == real.names[:3] and limited.canonical is True


def test_coco30k_reads_the_stand_in_csv_with_its_image_ids_and_quoted_newlines(mini_coco):
    s = suite("coco30k", *mini_coco)
    assert len(s.prompts) == 6 and s.canonical is True and s.prompts[1] == "A plate with rice\nand two forks."
    assert sum("\n" in p for p in s.prompts) == 1 and s.prompts[4] == "A bus, a car and a bicycle at a crossing."
    real = s.real_images
    assert real.names == [f"COCO_val2014_0000000000{i}{i}.jpg" for i in range(1, 7)] and real.resolution == 256
    assert real.folder is None and real.source.startswith("http://images.cocodataset.org/zips/val2014.zip#sha256=")
    limited = suite("coco30k", *mini_coco, "suite.limit=3")
    assert limited.real_images.names == real.names[:3] and limited.canonical is True
    assert suite("coco30k", mini_coco[0]).canonical is False  # 6 of 30,000


def test_unpadded_coco_ids_are_padded_and_a_template_that_does_not_fit_is_one_line(tmp_path):
    path = tmp_path / "coco.csv"
    path.write_text("image_id,prompt\n42,a cat on a mat\n")
    assert suite("coco30k", f"suite.source={path}").real_images.names == ["COCO_val2014_000000000042.jpg"]
    path.write_text("id,prompt\n42,a cat on a mat\n")
    with pytest.raises(DataError) as err:
        suite("coco30k", f"suite.source={path}")
    assert "reference_file" in str(err.value) and "image_id" in str(err.value) and "\n" not in str(err.value)


def coco_references(csv, folder, n: int, skip=()):
    rows = read_prompt_rows(csv)[:n]
    folder.mkdir(parents=True)
    for i, row in enumerate(rows):
        if i not in skip:
            photo(100 + i, [(64, 48), (48, 64), (80, 60), (50, 50)][i % 4]).save(folder / f"COCO_val2014_{row['image_id']}.jpg")
    return rows


def test_coco30k_eval_on_the_csv_equals_clean_fid_on_the_runs_own_images(cli, tmp_path, cache_dir, coco_csv, mini_coco):
    """The run's FID against clean-fid's ``compute_fid`` over the same generated PNGs and real JPEGs,
    with GigaGAN's 256 px center crop + Lanczos as its custom transform and our tiny extractor."""
    from cleanfid.fid import compute_fid

    from bench.metrics.fid import FID

    refs = tmp_path / "val2014"
    coco_references(coco_csv, refs, 6)
    code, out, err = cli("eval", "suite=coco30k", "model=tiny", "suite.limit=6", *mini_coco, f"suite.references={refs}", "scorers=tiny", "gen.steps=2")
    assert code == 0, err
    assert "| fid " in out and "| clip-b32 " in out and "by category" not in out
    run_dir = run_dir_of(tmp_path, "coco30k-")
    summary = json.loads((run_dir / "summary.json").read_text())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["published_prompt_set"] is True and manifest["n_prompts"] == 6 and manifest["prompts_sha256"] != COCO_SHA256
    fid = summary["sets"]["fid"]
    assert fid["n_images"] == 6 and fid["n_reference"] == 6 and fid["protocol"]["resolution"] == 256 and "by_group" not in fid

    generated = tmp_path / "generated"
    generated.mkdir()
    for key in pd.read_parquet(run_dir / "scores.parquet")["image_key"]:
        (generated / f"{key}.png").write_bytes((cache_dir / "images" / key[:2] / f"{key}.png").read_bytes())

    def gigagan_256(pixels):
        from torchvision.transforms.functional import center_crop

        image = Image.fromarray(pixels)
        return np.array(center_crop(image, min(image.size)).resize((256, 256), Image.Resampling.LANCZOS))

    want = compute_fid(str(generated), str(refs), mode="clean", custom_feat_extractor=FID("tiny").embed, device=torch.device("cpu"),
                       use_dataparallel=False, num_workers=0, verbose=False, custom_image_tranform=gigagan_256)
    print(f"coco30k parity: run {fid['value']!r} clean-fid {want!r} rel {abs(fid['value'] - want) / want:.2e}")
    assert fid["value"] == pytest.approx(want, rel=1e-6)


def test_a_missing_reference_folder_is_one_line_before_anything_is_generated(cli, tmp_path, coco_csv):
    fresh = tmp_path / "cache"
    base = ["eval", "suite=coco30k", "model=tiny", "suite.limit=4", f"suite.source={coco_csv}", "scorers=tiny"]
    code, out, err = cli(*base, f"suite.references={tmp_path / 'nowhere'}", cache=fresh)
    assert code == 3 and len(err.strip().splitlines()) == 1
    assert "suite.references=" in err and "nowhere is not a folder" in err and "COCO_val2014_{image_id:0>12}.jpg" in err and "images.cocodataset.org/zips/val2014.zip" in err
    assert not (fresh / "images").exists() and not (fresh / "models").exists()  # checked before the model was even built

    code, out, err = cli(*base, cache=fresh)  # references: null and no prefetched copy
    assert code == 3 and len(err.strip().splitlines()) == 1
    assert "suite.references=FOLDER" in err and "bench prefetch suite=coco30k" in err

    rows = coco_references(coco_csv, tmp_path / "val2014", 4, skip={1, 3})
    code, out, err = cli(*base, f"suite.references={tmp_path / 'val2014'}", cache=fresh)
    assert code == 3 and len(err.strip().splitlines()) == 1
    assert "2 of 4 reference images are missing" in err and f"(first: COCO_val2014_{rows[1]['image_id']}.jpg)" in err


def test_prefetch_offline_names_the_archive_and_the_folder_key(cli, tmp_path, coco_csv):
    code, out, err = cli("prefetch", "suite=coco30k", f"suite.source={coco_csv}", cache=tmp_path / "cache")
    assert code == 3 and len(err.strip().splitlines()) == 1 and "val2014.zip" in err and "suite.references=FOLDER" in err


def test_the_reference_archive_is_extracted_once_and_found_under_its_top_folder(tmp_path, coco_csv):
    """``bench prefetch``'s download-and-extract step on a local archive in COCO's layout (val2014/...)."""
    rows = coco_references(coco_csv, tmp_path / "src" / "val2014", 4)
    archive = tmp_path / "val2014.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted((tmp_path / "src").rglob("*.jpg")):
            zf.write(path, path.relative_to(tmp_path / "src").as_posix())
    pin = hashlib.sha256(archive.read_bytes()).hexdigest()  # a file:// URL needs no network, offline as the tests are
    with pytest.raises(DataError, match=r"has no pinned sha256, so bench does not download it: set BENCH_ALLOW_UNPINNED=1"):
        distribution.fetch_real_images(suite("coco30k", f"suite.source={coco_csv}", "suite.limit=4", f"suite.reference_source=file://{archive}"), tmp_path / "cache")
    s = suite("coco30k", f"suite.source={coco_csv}", "suite.limit=4", f"suite.reference_source=file://{archive}#sha256={pin}")
    cache = tmp_path / "cache"
    folder = distribution.fetch_real_images(s, cache)
    assert folder == distribution.extracted_folder(s, cache) and distribution.fetch_real_images(s, cache) == folder
    assert [p.name for p in folder.parent.iterdir()] == [folder.name] and not any((cache / "data" / "downloads").iterdir())  # no temp folder, no archive kept
    real = distribution.real_set(s, cache)
    assert real.folder == folder / "val2014" and [p.name for p in real.files] == [f"COCO_val2014_{r['image_id']}.jpg" for r in rows]


def test_without_a_template_every_image_of_the_folder_is_the_real_set(tmp_path):
    """``suite.reference_file=null``: an unpaired real set (GigaGAN compares with all 40,504 val2014 images), no per-group values."""
    meta, refs = synth_mjhq(tmp_path, wrap="mjhq30k_imgs")
    s = suite("mjhq30k", f"suite.source={meta}", f"suite.references={refs}", "suite.reference_file=null", "suite.limit=2")
    real = distribution.real_set(s, tmp_path)
    assert real.paired is False and len(real.files) == 5 and real.labels == {}
    paired = distribution.real_set(suite("mjhq30k", f"suite.source={meta}", f"suite.references={refs}", "suite.limit=2"), tmp_path)
    assert paired.folder == refs / "mjhq30k_imgs" and [p.relative_to(paired.folder).as_posix() for p in paired.files] == ["animals/a1f0.jpg", "food/f9c2.jpg"]
    assert paired.labels == {"category": ["animals", "food"]} and paired.list_sha256() != real.list_sha256()


def test_per_group_statistics_are_those_of_the_group_alone():
    from bench.metrics.fid import FeatureStats

    rng = np.random.default_rng(0)
    feats = rng.normal(size=(10, 6))
    labels = ["a", "b", "a", "a", "b", "b", "a", "b", "a", "b"]
    acc = distribution.Accumulator({"k": labels}, keep=True)
    for start in range(0, 10, 3):
        acc.add(torch.from_numpy(feats[start : start + 3]), list(range(start, min(start + 3, 10))))
    for label in "ab":
        rows = feats[[x == label for x in labels]]
        group = acc.subset(("k", label))
        assert np.allclose(group.stats.mean, rows.mean(0)) and np.allclose(group.stats.cov, np.cov(rows, rowvar=False))
        assert np.array_equal(group.feats, rows.astype(np.float32))
        assert group.owners.tolist() == [i for i, x in enumerate(labels) if x == label]  # each row's prompt: what a half keeps together
    assert np.allclose(acc.subset(None).stats.cov, FeatureStats(6).update(feats).cov)


def scorer(tmp_path, n_boot=100, seed=0):
    from bench.metrics.fid import FID, KID

    real = distribution.RealSet(tmp_path, [], [], {}, None)
    return distribution.SetScorer({"fid": FID("tiny"), "kid": KID("tiny")}, {}, real, tmp_path, "t", n_boot=n_boot, seed=seed)


def test_set_intervals_bracket_the_value_and_repeat_to_the_byte(tmp_path):
    """Intervals from 30 prompts x 2 images of 8-d features: around the value, not empty, the same bytes
    from a new scorer, and other halves with another seed."""
    from bench.metrics.fid import FeatureSet, FeatureStats

    rng = np.random.default_rng(0)
    gen = rng.normal(size=(60, 8)) @ rng.normal(size=(8, 8))
    real = rng.normal(size=(50, 8)) @ rng.normal(size=(8, 8)) + 0.5
    acc = distribution.Accumulator({}, keep=True)
    acc.add(torch.from_numpy(gen), [i // 2 for i in range(60)])
    ref = FeatureSet(FeatureStats(8).update(real), real.astype(np.float32))

    def values(**kw):
        s = scorer(tmp_path, **kw)
        return {name: s.value(metric, acc.subset(None), ref) for name, metric in s.metrics.items()}

    first = values()
    for name, v in first.items():
        assert v["ci"][0] < v["value"] < v["ci"][1] and v["n_boot"] == 100 and v["n_images"] == 60, name
    assert json.dumps(values()) == json.dumps(first)
    assert values(seed=1)["fid"]["ci"] != first["fid"]["ci"]
    assert "ci" not in values(n_boot=0)["fid"]
    with pytest.raises(UsageError, match="stats.n_boot_sets >= 0"):
        scorer(tmp_path, n_boot=-1)


def test_a_half_holds_half_the_prompts_each_with_all_its_images():
    owners = np.array([7, 7, 3, 3, 9, 9, 1, 1, 5, 5])  # 5 prompts x 2 images
    halves = distribution.half_samples(owners, 50, 0)
    assert halves.shape == (50, 10) and (halves.sum(1) == 4).all()  # 2 of 5 prompts, 2 images each
    assert (halves[:, ::2] == halves[:, 1::2]).all() and len({h.tobytes() for h in halves}) == 10  # every one of the C(5, 2) halves
    assert np.array_equal(distribution.half_samples(owners, 50, 0), halves)
    assert distribution.half_samples(owners[:6], 50, 0) is None  # 3 prompts: a half of 1 has no covariance


def test_the_table_shows_the_base_value_and_a_dash_where_a_group_is_too_small():
    from bench.report import render_sets

    protocol = {"library": "clean-fid", "mode": "clean", "resolution": 256, "feature_extractor": "Inception-v3 pool3, 2048-d"}
    sets = {
        "fid": {
            "value": 12.345678, "baseline": 15.0, "n_images": 30, "n_reference": 30, "higher_is_better": False, "protocol": protocol,
            "by_group": {"category": {"art": {"value": 20.5, "n_images": 29, "n_reference": 29}, "logo": {"value": None, "n_images": 1, "n_reference": 1, "note": "needs at least 2"}}},
        }
    }
    text = render_sets(sets)
    assert "| fid      | 12.35   | ↓           | 15     | 30       | 30                 | clean-fid clean, 256px center crop, Inception-v3 pool3, 2048-d |" in text
    assert "set-level metrics by category:" in text and "| art        | 29       | 29                 | 20.5  |" in text and "| logo       | 1        | 1                  | -     |" in text


def test_the_table_shows_each_interval_and_kids_subset_std():
    from bench.report import render_sets

    protocol = {"library": "clean-fid", "mode": "clean", "resolution": 256, "feature_extractor": "Inception-v3 pool3, 2048-d"}
    common = {"n_boot": 200, "level": 0.95, "n_images": 30, "n_reference": 30, "higher_is_better": False, "protocol": protocol}
    sets = {
        "fid": {
            "value": 12.345678, "ci": [11.9, 12.81], **common,
            "by_group": {"category": {"art": {"value": 20.5, "ci": [19.25, 21.5], "n_images": 29, "n_reference": 29}, "logo": {"value": 3.0, "n_images": 2, "n_reference": 2}}},
        },
        "kid": {"value": 0.0123, "std": 0.00041, "ci": [0.0118, 0.0129], **common},
    }
    text = render_sets(sets)
    assert "| fid      | 12.35   | [11.9, 12.81]    | -            | ↓ " in text and "| kid      | 0.0123  | [0.0118, 0.0129] | 0.00041      | ↓ " in text
    assert "intervals: the spread of the metric over 200 random halves of the prompts (real images fixed), centred on the value" in text
    assert "| art        | 29       | 29                 | 20.5 [19.25, 21.5] |" in text and "| logo       | 2        | 2                  | 3                  |" in text
