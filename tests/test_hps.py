"""HPSv2 / HPSv2.1: this project's batched scorer gives the official ``hpsv2`` package's numbers, and
the ``hpsv2`` suite reads the benchmark's four style files.

The parity tests run the official code path itself: ``hpsv2.score(images, prompt, hps_version=...)``
(``img_score.score``: its checkpoint download, ``torch.load``, ``load_state_dict(checkpoint['state_dict'])``,
its tokenizer, its fork's validation transform, ``image_features @ text_features.T``), with the model
its ``initialize_model`` would build made by the fork's ``create_model_and_transforms`` with the same
arguments (pretrained=None: the laion weights it would download are all replaced by the checkpoint)
and ``hf_hub_download`` answering with a local checkpoint of seeded random weights. The official
package must be importable: these tests fail, they do not skip, without it.
"""

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from bench.errors import WeightsMissingError
from bench.metrics import _LOADED
from bench.metrics import clip as clip_metrics
from bench.metrics import hps

PROMPTS = ["a red cube on a table", "", "an astronaut riding a horse " * 20, "a cat in the style of studio ghibli"]
OFFICIAL_PIP = "pip install hpsv2==1.2.0 --no-deps && pip install clint"  # its other pins (pytest==7.2.0, protobuf<4) conflict; the score() path needs only clint
BPE_COPY = (
    "python -c \"import importlib.util as u, pathlib, shutil, open_clip; "
    "shutil.copy(pathlib.Path(open_clip.__file__).parent / 'bpe_simple_vocab_16e6.txt.gz', "
    "pathlib.Path(u.find_spec('hpsv2').origin).parent / 'src' / 'open_clip')\""
)


def official_hpsv2():
    """The official package, or a failure that says how to install it (never a silent skip)."""
    spec = importlib.util.find_spec("hpsv2")
    if spec is None:
        pytest.fail(f"the official hpsv2 package is needed for the HPSv2 parity tests: {OFFICIAL_PIP}, then copy open_clip's BPE vocabulary into it: {BPE_COPY}")
    if not (Path(spec.origin).parent / "src" / "open_clip" / "bpe_simple_vocab_16e6.txt.gz").is_file():
        pytest.fail(f"the hpsv2 wheel lacks bpe_simple_vocab_16e6.txt.gz (open_clip ships the identical file): {BPE_COPY}")
    import hpsv2

    return hpsv2


def images(sizes, seed=0):
    """uint8 images of the given (height, width), as the float batch a metric gets and as PIL images."""
    g = torch.Generator().manual_seed(seed)
    pixels = [torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8) for h, w in sizes]
    return [p.permute(2, 0, 1).float().unsqueeze(0) / 255 for p in pixels], [Image.fromarray(p.numpy()) for p in pixels]


def official_model(arch):
    """What ``img_score.initialize_model`` builds, for ``arch``: the fork's ViT with its validation transform."""
    from hpsv2.src.open_clip import create_model_and_transforms

    model, _, preprocess_val = create_model_and_transforms(
        arch, None, precision="amp", device="cpu", jit=False, force_quick_gelu=False, force_custom_text=False,
        force_patch_dropout=False, force_image_size=None, pretrained_image=False, image_mean=None, image_std=None,
        light_augmentation=True, aug_cfg={}, output_dict=True, with_score_predictor=False, with_region_predictor=False,
    )
    return model, preprocess_val


def official_scores(monkeypatch, arch, checkpoint, hps_version, pils, prompts):
    """``hpsv2.score([image], prompt, hps_version)`` for each pair, the checkpoint download answered with
    ``checkpoint``; also returns the (repo, file) it asked the hub for and the seconds per call."""
    hpsv2 = official_hpsv2()
    import huggingface_hub
    from hpsv2 import img_score

    model, preprocess_val = official_model(arch)
    monkeypatch.setitem(img_score.model_dict, "model", model)
    monkeypatch.setitem(img_score.model_dict, "preprocess_val", preprocess_val)
    asked = []

    def hub_download(repo_id, filename, **kwargs):
        asked.append((repo_id, filename))
        return str(checkpoint)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hub_download)
    start = time.perf_counter()
    scores = [float(hpsv2.score([pil], prompt, hps_version=hps_version)[0]) for pil, prompt in zip(pils, prompts)]
    return torch.tensor(scores, dtype=torch.float64), asked, (time.perf_counter() - start) / len(pils)


def saved_checkpoint(tmp_path, arch, seed, name):
    """Seeded random open_clip weights saved as HPS saves them: ``{'state_dict': ...}`` in a .pt file."""
    import open_clip

    with torch.random.fork_rng(devices=[]), clip_metrics.quiet_root_logger():
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None)
    path = tmp_path / name
    torch.save({"state_dict": model.state_dict()}, path)
    del model
    return path


def local_metric(metric_cls, arch, checkpoint):
    """``metric_cls`` loading ``checkpoint`` (a local file) into ``arch`` through its own loading path."""
    return type(f"Local{metric_cls.__name__}", (metric_cls,), {"arch": arch, "checkpoint": str(checkpoint)})()


def tiny_arch_in_both_registries(tmp_path):
    """The tiny open_clip config of clip.py, registered in open_clip and in the HPSv2 fork."""
    official_hpsv2()
    from hpsv2.src.open_clip import factory

    name = clip_metrics._register_tiny_open_clip()
    (tmp_path / f"{name}.json").write_text(json.dumps(clip_metrics.TINY_OPEN_CLIP))
    factory.add_model_config(tmp_path)
    return name


# Sizes that exercise the fork's transform: upscaling with an odd vertical pad, downscaling (antialiased)
# with an odd horizontal pad, a square image, and a tall one.
SIZES = [(100, 131), (333, 251), (64, 64), (260, 90)]


def check_parity(monkeypatch, tmp_path, arch, metric_cls, hps_version, seed, sizes=SIZES):
    checkpoint = saved_checkpoint(tmp_path, arch, seed, metric_cls.checkpoint)
    batches, pils = images(sizes, seed=seed)
    metric = local_metric(metric_cls, arch, checkpoint)
    start = time.perf_counter()
    metric.loaded()
    timing = {"ours_load": time.perf_counter() - start}
    start = time.perf_counter()
    ours = torch.cat([metric.score(b, [p]) for b, p in zip(batches, PROMPTS)])  # sizes differ: one batch each
    timing["ours_per_image"] = (time.perf_counter() - start) / len(pils)
    _LOADED.clear()
    official, asked, timing["official_per_image"] = official_scores(monkeypatch, arch, checkpoint, hps_version, pils, PROMPTS)
    assert asked == [("xswu/HPSv2", metric_cls.checkpoint)] * len(pils)  # the hub file the package downloads for this version
    assert torch.allclose(ours, 100 * official, atol=1e-4, rtol=0), (ours, 100 * official)
    assert ours.std() > 1e-2  # the scores differ: a constant would test nothing
    return ours, official, timing


@pytest.mark.parametrize("metric_cls,version", [(hps.HPSv2, "v2.0"), (hps.HPSv21, "v2.1")])
def test_hps_equals_the_official_package_on_the_same_weights(monkeypatch, tmp_path, metric_cls, version):
    check_parity(monkeypatch, tmp_path, tiny_arch_in_both_registries(tmp_path), metric_cls, version, seed=3)


@pytest.mark.slow
def test_hps_equals_the_official_package_on_the_real_vit_h14_architecture(monkeypatch, tmp_path, capsys):
    """ViT-H-14 (32 vision, 24 text layers), random weights; prints the seconds per image of both paths."""
    import gc

    official_hpsv2()
    ours, official, timing = check_parity(monkeypatch, tmp_path, "ViT-H-14", hps.HPSv21, "v2.1", seed=4)
    _LOADED.clear()
    gc.collect()
    with capsys.disabled():
        print(f"\nViT-H-14 on CPU: ours {timing['ours_load']:.1f} s to load once, then {timing['ours_per_image']:.2f} s per image "
              f"(one image per batch here); official hpsv2.score {timing['official_per_image']:.2f} s per image (reloads the checkpoint); "
              f"max |diff| {(ours - 100 * official).abs().max():.2e} (100 * cos)")


def test_preprocessing_equals_the_forks_validation_transform():
    """The batched transform is the fork's ``preprocess_val`` of the PIL image, to float rounding."""
    official_hpsv2()
    from hpsv2.src.open_clip.transform import image_transform

    preprocess_val = image_transform(224, is_train=False, resize_longest_max=True)  # what light_augmentation=True builds
    for size in SIZES + [(224, 224), (1024, 1024), (512, 768)]:
        (batch,), (pil,) = images([size], seed=sum(size))
        ours = hps.hps_preprocess(batch)[0]
        assert ours.shape == (3, 224, 224)
        assert torch.allclose(ours, preprocess_val(pil), atol=1e-5, rtol=0), size


def test_batch_scores_equal_one_image_at_a_time():
    _LOADED.clear()
    batch, _ = images([(96, 128)] * 5, seed=1)
    batch = torch.cat(batch)
    metric = hps.HPSv21("tiny")
    prompts = PROMPTS + ["one more"]
    together = metric.score(batch, prompts)
    alone = torch.cat([metric.score(batch[i : i + 1], prompts[i : i + 1]) for i in range(5)])
    assert together.shape == (5,) and torch.allclose(together, alone, atol=1e-4, rtol=0)
    assert together.std() > 1e-2


def test_tiny_scorers_are_labelled_and_each_version_has_its_own_weights():
    _LOADED.clear()
    v20, v21 = hps.HPSv2("tiny"), hps.HPSv21("tiny")
    for metric in (v20, v21):
        assert metric.info.model_id == "tiny-random" and metric.info.version.endswith("+tiny-random") and "NOT MEANINGFUL" in metric.info.scale
    assert v20.backbone() != v21.backbone()  # v2.0 and v2.1 are different checkpoints: never one shared copy
    assert hps.HPSv2("tiny").loaded() is v20.loaded()  # the same version loads once per process
    official = hps.HPSv21()
    assert (official.info.name, official.info.version, official.info.model_id) == ("hpsv2.1", "v2.1", "xswu/HPSv2")
    assert official.info.scale.startswith("100 * cos") and official.hub_files == (("xswu/HPSv2", hps.HPS_REVISION, ("HPS_v2.1_compressed.pt",)),)
    assert hps.HPSv2().hub_files == (("xswu/HPSv2", hps.HPS_REVISION, ("HPS_v2_compressed.pt",)),)


@pytest.mark.parametrize("metric_cls", [hps.HPSv2, hps.HPSv21])
def test_missing_weights_offline_is_one_line_naming_the_file_and_prefetch(metric_cls):
    _LOADED.clear()
    batch, _ = images([(64, 64)])
    with pytest.raises(WeightsMissingError) as err:
        metric_cls().score(batch[0], ["a cat"])
    message = str(err.value)
    assert "\n" not in message and metric_cls.checkpoint in message and "xswu/HPSv2" in message
    assert f"bench prefetch metrics={metric_cls.info.name}" in message


# --------------------------------------------------------------------------- the hpsv2 suite

STYLES = ["anime", "concept-art", "paintings", "photo"]


def benchmark_folder(tmp_path, n=3):
    """Four style files in the benchmark's format: a JSON list of prompt strings each."""
    folder = tmp_path / "benchmark"
    folder.mkdir()
    for style in STYLES:
        (folder / f"{style}.json").write_text(json.dumps([f"{style} prompt {i}" for i in range(n)]))
    return folder


def hpsv2_suite(*overrides):
    from bench.config import compose, to_dict
    from bench.suite import load_suite

    return load_suite(to_dict(compose(["suite=hpsv2", *overrides]))["suite"])


def test_hpsv2_suite_reads_the_four_styles_from_a_folder_and_limits_per_style(tmp_path):
    folder = benchmark_folder(tmp_path)
    full = hpsv2_suite(f"suite.source={folder}")
    assert full.prompts == [f"{s} prompt {i}" for s in STYLES for i in range(3)]
    assert full.groups == {"style": [s for s in STYLES for _ in range(3)]} and full.canonical is False  # 12 prompts, not the 3,200
    assert full.images_per_prompt == 1 and full.reward == "hpsv2.1" and full.metrics[:2] == ["hpsv2.1", "hpsv2"]
    limited = hpsv2_suite(f"suite.source={folder}", "suite.limit=2")
    assert limited.prompts == [f"{s} prompt {i}" for s in STYLES for i in range(2)]
    assert limited.groups["style"] == [s for s in STYLES for _ in range(2)]


def test_hpsv2_suite_names_the_hub_files_the_package_downloads():
    from bench.config import compose, to_dict

    cfg = to_dict(compose(["suite=hpsv2"]))["suite"]
    assert list(cfg["prompt_sets"]) == STYLES and cfg["prompt_set_column"] == "style"
    for style, spec in cfg["prompt_sets"].items():
        assert spec == {"hub": "zhwang/HPDv2", "file": f"benchmark/{style}.json", "revision": "b9517430f34b1080d4f741118d2a440155a165cd"}
    assert cfg["canonical"]["count"] == 3200


def test_hpsv2_suite_offline_without_a_cached_copy_is_one_line(cli):
    code, out, err = cli("eval", "suite=hpsv2", "model=tiny", "scorers=tiny")
    assert code != 0 and len(err.strip().splitlines()) == 1
    assert "zhwang/HPDv2" in err and "bench prefetch suite=hpsv2" in err and "suite.source=PATH" in err


def test_hpsv2_eval_end_to_end_prints_the_means_by_style(cli, tmp_path):
    folder = benchmark_folder(tmp_path)
    code, out, err = cli("eval", "suite=hpsv2", "model=tiny", "suite.limit=2", f"suite.source={folder}", "scorers=tiny", "gen.steps=2")
    assert code == 0, err
    assert "| hpsv2.1" in out and "| hpsv2 " in out and "mean by style" in out
    for style in STYLES:
        assert f"| {style}" in out
    run_dir = next((tmp_path / "runs").iterdir())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["n_prompts"] == 8 and manifest["metrics"]["hpsv2.1"]["model_id"] == "tiny-random"
    summary = json.loads((run_dir / "summary.json").read_text())
    (by_style,) = summary["by_group"]
    assert by_style["by"] == "style" and by_style["n_prompts"] == {s: 2 for s in STYLES}
    # the benchmark's "Average" is the mean over all images; with equal counts per style it is the mean of the style means
    style_means = by_style["means"]["hpsv2.1"]
    assert abs(summary["metrics"]["hpsv2.1"]["mean"] - sum(style_means.values()) / 4) < 1e-9
