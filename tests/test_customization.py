"""Concept customization and style transfer: the reference-image metrics by hand, the DreamBench
suites read from the real DreamBench (BENCH_TEST_DATA/dreambench) and the stand-in of tests/data/mini, target images (a subject's photos, a captioned style
folder) reaching the methods, and the DreamBooth loss by hand."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image

from bench.config import compose, to_dict
from bench.errors import DataError, UsageError
from bench.generate import image_seed
from bench.images import TargetImages, read_captioned_images, square
from bench.method import TrainContext
from bench.methods.dreambooth import DreamBooth
from bench.methods.preference_data import image_pairs
from bench.metrics import ReferenceSet
from bench.metrics.reference import ColorHistogramSimilarity, ThumbnailCorrelation
from bench.suite import load_suite



@pytest.fixture
def dreambench(mini_data):
    """The stand-in DreamBench: subjects backpack, backpack_dog (objects, 3 prompts each), cat, dog (live)."""
    return mini_data / "dreambench"


def save(path, array):
    Image.fromarray(array.astype("uint8")).save(path)
    return path


# ---- reference-image metrics ------------------------------------------------------------------
def test_color_histogram_intersection_by_hand(tmp_path):
    import numpy as np

    red = np.zeros((64, 64, 3)); red[..., 0] = 255
    half = red.copy(); half[:, 32:] = (0, 0, 255)
    refs = ReferenceSet("s", (save(tmp_path / "red.png", red), save(tmp_path / "half.png", half)))
    gen = torch.zeros(2, 3, 32, 32)
    gen[0, 0] = 1.0  # all red: intersection 1 with the red reference, 1/2 with the half-blue one
    gen[1, 1] = 1.0  # all green: shares no bin with either
    got = ColorHistogramSimilarity().score(gen, ["", ""], [refs, refs])
    assert got.tolist() == [pytest.approx(0.75), pytest.approx(0.0)]


def test_thumbnail_correlation_by_hand(tmp_path):
    blocks = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))
    big = blocks.repeat_interleave(8, 1).repeat_interleave(8, 2)  # 64 x 64, constant 8 x 8 blocks
    refs = ReferenceSet("s", (save(tmp_path / "r.png", (big * 255).round().permute(1, 2, 0).numpy()),))
    stored = (big * 255).round() / 255  # what the reference holds after uint8
    gen = torch.stack([stored, 1 - stored])[..., ::2, ::2]  # the same picture at 32 px, and its negative
    got = ThumbnailCorrelation().score(gen, ["", ""], [refs, refs])
    assert got.tolist() == [pytest.approx(1.0, abs=1e-9), pytest.approx(-1.0, abs=1e-9)]
    with pytest.raises(ValueError, match="one reference set per image"):
        ThumbnailCorrelation().score(gen, ["", ""])


def test_square_resizes_the_short_side_and_center_crops():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    img.paste((255, 255, 255), (10, 0, 30, 20))  # a white band in the middle half
    out = square(img, 10)
    assert out.shape == (3, 10, 10) and out.dtype == torch.uint8
    assert out[:, :, 1:9].min() >= 250  # the crop keeps the centre: all white but the resampled edges


# ---- DreamBench suites ------------------------------------------------------------------------
def suite_cfg(*args):
    return to_dict(compose(["suite=dreambench-micro", *args]))


def test_dreambench_micro_reads_subjects_prompts_and_references(shared_data):
    cfg = suite_cfg(f"suite.source={shared_data / 'dreambench'}")
    suite = load_suite(cfg["suite"])
    assert suite.subjects == ["dog", "cat", "backpack"] and len(suite.prompts) == 75
    assert suite.prompts[0] == "a sks dog in the jungle" and suite.prompts[50] == "a sks backpack in the jungle"
    assert [r.key for r in suite.references[::25]] == ["dog", "cat", "backpack"]
    assert len(suite.references[0].paths) == 5 and suite.references[0].paths[0].name == "00.jpg"
    assert suite.train_images == [] and suite.train_prompts == []
    assert len(suite.references_sha256) == 64

    dog = load_suite(cfg["suite"], subject="dog")
    assert dog.subjects == ["dog"] and len(dog.prompts) == 25 and len(dog.train_images) == 5
    assert dog.train_prompts == ["a photo of sks dog"] * 5 and dog.prior_prompt == "a photo of dog"
    assert dog.references_sha256 != suite.references_sha256

    with pytest.raises(DataError, match="no DreamBench subject 'corgi'.*subjects: backpack, backpack_dog"):
        load_suite(cfg["suite"], subject="corgi")
    with pytest.raises(DataError, match="subject=dog applies to DreamBench suites"):
        load_suite(to_dict(compose(["suite=smoke"]))["suite"], subject="dog")


def test_dreambench_micro_reads_the_stand_ins_subjects_prompts_and_references(dreambench):
    cfg = suite_cfg(f"suite.source={dreambench}")
    suite = load_suite(cfg["suite"])
    assert suite.subjects == ["dog", "cat", "backpack"] and len(suite.prompts) == 9 and suite.canonical is None
    assert suite.prompts[0] == "a sks dog in a cave" and suite.prompts[4] == "a sks cat wearing a scarf" and suite.prompts[7] == "a sks backpack on a wooden table"
    assert [r.key for r in suite.references[::3]] == ["dog", "cat", "backpack"] and suite.groups["live_or_object"] == ["live"] * 6 + ["object"] * 3
    assert len(suite.references[0].paths) == 3 and suite.references[0].paths[0].name == "00.png"
    assert suite.train_images == [] and suite.train_prompts == [] and len(suite.references_sha256) == 64

    dog = load_suite(cfg["suite"], subject="dog")
    assert dog.subjects == ["dog"] and len(dog.prompts) == 3 and len(dog.train_images) == 3
    assert dog.train_prompts == ["a photo of sks dog"] * 3 and dog.prior_prompt == "a photo of dog"
    assert dog.references_sha256 != suite.references_sha256
    assert load_suite(suite_cfg(f"suite.source={dreambench}", "suite.prompts_per_subject=2")["suite"]).prompts[2:4] == ["a sks cat in a cave", "a sks cat wearing a scarf"]
    with pytest.raises(DataError, match="no DreamBench subject 'corgi'.*subjects: backpack, backpack_dog, cat, dog"):
        load_suite(cfg["suite"], subject="corgi")


def test_dreambench_without_a_folder_offline_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError, match=r"clone https://github.com/google/dreambooth \(commit 4f887af\) and set suite.source=PATH"):
        load_suite(suite_cfg()["suite"], cache=tmp_path)


def test_customization_needs_one_subject_and_reference_metrics_need_references(cli, dreambench):
    code, _, err = cli("run", "suite=dreambench-micro", "model=tiny-fewstep", "method=pso-dreambooth", f"suite.source={dreambench}")
    assert code != 0 and "set subject=NAME to fine-tune on one (dog, cat, backpack)" in err
    code, _, err = cli("eval", "suite=smoke", "suite.metrics=[brightness,ref_color]")
    assert code != 0 and "metric ref_color compares with reference images and suite 'smoke' has none" in err


# ---- target images reach the methods ----------------------------------------------------------
def style_folder(root, n=3):
    root.mkdir()
    rows = []
    for i in range(n):
        Image.new("RGB", (48, 40), (200, 40 * i, 30)).save(root / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": f"a pokemon number {i}"}))
    (root / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return root


def test_a_captioned_folder_is_a_style_set(tmp_path):
    folder = style_folder(tmp_path / "style")
    cfg = to_dict(compose(["method=pso-offline", f"data={folder}"]))
    assert cfg["data"]["kind"] == "images" and cfg["data"]["source"] == str(folder)
    images = read_captioned_images(cfg["data"], 16)
    assert images.pixels.shape == (3, 3, 16, 16) and images.captions == [f"a pokemon number {i}" for i in range(3)]
    assert images.pixels[1, :, 8, 8].tolist() == [200, 40, 30]
    (folder / "metadata.jsonl").unlink()
    with pytest.raises(DataError, match="has no metadata.jsonl or metadata.csv"):
        read_captioned_images(cfg["data"], 16)
    preset = to_dict(compose(["method=pso-style-turbo"]))
    assert preset["model"]["name"] == "sdxl-turbo" and preset["data"]["source"] == "reach-vb/pokemon-blip-captions"
    assert preset["method"]["beta"] == 50 and preset["train"]["steps"] == 3000 and preset["train"]["lora_rank"] == 16


def targets(n=3, size=32, prior="a photo of dog"):
    g = torch.Generator().manual_seed(0)
    return TargetImages(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8), ["a photo of sks dog"] * n, "test", prior)


def test_image_pairs_are_the_encoded_targets_and_seeded_base_samples(fewstep_lora):
    model = fewstep_lora
    ctx = TrainContext(model, ["a photo of sks dog"] * 3, None, 0, torch.device("cpu"), 2, progress=False, images=targets())
    with torch.no_grad():
        data = image_pairs(ctx, seed=7)
        want_w = model.encode(ctx.images.pixels.double() / 255).float()
        gens = [torch.Generator().manual_seed(image_seed("train-references", i, 0, 7)) for i in range(3)]
        want_l = model.sample(["a photo of sks dog"] * 3, gens).float()
    assert torch.allclose(data["latents_w"], want_w, atol=1e-6) and torch.allclose(data["latents_l"], want_l, atol=1e-6)
    assert data["prompt_index"].tolist() == [0, 1, 2]
    assert "latents_l" not in image_pairs(ctx, seed=7, references=False)


def test_dreambooth_loss_is_instance_plus_weighted_prior_by_hand(fewstep_lora):
    model = copy.deepcopy(fewstep_lora)
    ctx = TrainContext(model, ["a photo of sks dog"] * 3, None, 0, torch.device("cpu"), 2, progress=False, images=targets())
    method = DreamBooth({"seed": 0, "prior_loss_weight": 0.5, "num_class_images": 3, "prompt_dropout": 0.0})
    data = method.prepare(ctx)
    assert data["latents_class"].shape == (3, 4, 8, 8)
    with torch.no_grad():
        got, logs = method.loss(ctx, data, torch.Generator().manual_seed(3))

        g = torch.Generator().manual_seed(3)

        def eps_loss(x0, prompts):  # || eps - eps_theta(sqrt(a) x0 + sqrt(1 - a) eps, t, c) ||^2, t ~ U[0, T)
            t = torch.randint(0, 1000, (2,), generator=g)
            eps = torch.randn(x0.shape, generator=g, dtype=torch.float64)
            a = model.alphas_cumprod[t].view(-1, 1, 1, 1)
            pred = model.unet(a.sqrt() * x0 + (1 - a).sqrt() * eps, t, encoder_hidden_states=model.encode_prompts(prompts).hidden).sample
            return ((pred.float() - eps.float()) ** 2).mean()

        idx = torch.randint(0, 3, (2,), generator=g)
        instance = eps_loss(data["latents_w"][idx].double(), ["a photo of sks dog"] * 2)
        idx = torch.randint(0, 3, (2,), generator=g)
        prior = eps_loss(data["latents_class"][idx].double(), ["a photo of dog"] * 2)
    assert got.item() == pytest.approx((instance + 0.5 * prior).item(), rel=1e-5)
    assert logs["instance"] == pytest.approx(instance.item(), rel=1e-5) and logs["prior"] == pytest.approx(prior.item(), rel=1e-5)

    ctx.images = targets(prior=None)
    with pytest.raises(UsageError, match="prior preservation needs a class prompt"):
        method.prepare(ctx)


def test_a_subject_trains_through_the_cli_and_lands_in_the_manifest(cli, cache_dir, dreambench):
    code, out, err = cli("train", "suite=dreambench-micro", "model=tiny-fewstep", "method=dreambooth", "subject=dog", f"suite.source={dreambench}",
                         "train.steps=2", "train.batch_size=2", "method.num_class_images=2")
    assert code == 0, err
    meta = json.loads(next((cache_dir / "checkpoints").glob("dreambooth-*/final/train.json")).read_text())
    assert meta["steps"] == 2 and meta["data"]["images"] == 3 and meta["data"]["unique_captions"] == 1
    assert meta["data"]["source"].endswith("(dog)") and meta["data"]["base_references"] is False


def test_the_summary_breaks_means_down_by_subject():
    import pandas as pd

    from bench.report import render_table, summarize

    scores = pd.DataFrame({"prompt_index": [0, 0, 1, 2], "subject": ["dog", "dog", "dog", "cat"], "ref_color": [0.1, 0.3, 0.5, 0.9]})
    info = {"ref_color": {"higher_is_better": True, "version": "1", "scale": "x"}}
    summary = summarize(scores, info, None, n_boot=10, group_by=["subject"])
    ci = {"cat": [0.9, 0.9], "dog": [pytest.approx(0.2), pytest.approx(0.5)]}  # dog's prompts average 0.2 and 0.5
    assert summary["by_group"] == [{"by": "subject", "n_prompts": {"cat": 1, "dog": 2}, "means": {"ref_color": {"cat": 0.9, "dog": pytest.approx(0.3)}}, "ci": {"ref_color": ci}}]
    table = render_table(summary, "t")
    assert "mean by subject (95% CI):" in table and "| dog       | 2         | 0.3 [0.2, 0.5] |" in table


def test_a_style_folder_trains_offline_pso_through_the_cli(cli, cache_dir, tmp_path):
    folder = style_folder(tmp_path / "style")
    code, _, err = cli("train", "model=tiny-fewstep", "method=pso-offline", f"data={folder}", "train.steps=2", "train.batch_size=2")
    assert code == 0, err
    metas = [json.loads(p.read_text()) for p in (cache_dir / "checkpoints").glob("pso-offline-*/final/train.json")]
    (meta,) = [m for m in metas if m["method"] == "pso-offline"]  # not pso-offline-dmd2 of another test in this session
    assert meta["data"]["source"] == str(folder) and meta["data"]["images"] == 3 and meta["data"]["base_references"] is True


def test_a_subject_needs_no_reward_but_an_online_method_may_name_one(dreambench):
    from bench.runner import Session

    def resolve(*args):
        return Session(compose(["suite=dreambench-micro", "model=tiny-fewstep", "subject=dog", f"suite.source={dreambench}", *args]), progress=False).resolve_method()

    assert resolve("method=pso-dreambooth")[1] is None
    assert resolve("method=pso-online", "method.reward=brightness")[1].name == "brightness"


def test_the_official_pso_customization_trains_on_class_prompt_negatives(cli, cache_dir, dreambench):
    """pso-dreambooth-official (the authors' script): the subject's photos against negatives of the class prompt."""
    code, out, err = cli("train", "suite=dreambench-micro", "model=tiny-fewstep", "method=pso-dreambooth-official", "subject=dog",
                         f"suite.source={dreambench}", "train.steps=2", "train.grad_accum=2", "method.num_negatives=2",
                         "train.mixed_precision=no")
    assert code == 0, err
    meta = json.loads(next((cache_dir / "checkpoints").glob("pso-dreambooth-official-*/final/train.json")).read_text())
    assert meta["steps"] == 2 and meta["lora_rank"] == 16 and meta["data"]["images"] == 3
    negatives = list((cache_dir / "data").glob("pso-dreambooth-official-*.safetensors"))
    assert len(negatives) == 1
    from safetensors.torch import load_file

    assert load_file(negatives[0])["latents_neg"].shape[0] == 2
