"""The full DreamBench suite and its metrics: DINO, CLIP-T (CLIP-I is in test_clip_metrics.py).

DINO's official code is ``torch.hub.load('facebookresearch/dino:main', 'dino_vits16')`` with the
ImagenHub / DINO ``eval_knn`` preprocessing; the hub cannot be reached here, so its architecture is
built with timm (DINO's ``vision_transformer.py`` is a copy of timm's, same parameter names, same
forward: the CLS token after the final norm), given random weights, converted to the layout of hub
``facebook/dino-vits16`` the way transformers' ``convert_dino_to_pytorch.py`` made that file, saved
as its ``pytorch_model.bin`` and ``config.json``, and loaded through the metric's own loading path.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from bench.config import compose, to_dict
from bench.errors import DataError, WeightsMissingError
from bench.metrics import ReferenceSet
from bench.metrics import clip as clip_metrics
from bench.metrics import dino as dino_metrics
from bench.suite import load_suite

from conftest import published
from test_clip_metrics import images, saved_open_clip
PUBLISHED_SHA256 = "648eebdb478d66c58416fea3c1e38d1320f5747f884abc6e067af04028fa2b4a"  # suites/dreambench.yaml canonical
LIVE = ["cat", "cat2", "dog", "dog2", "dog3", "dog5", "dog6", "dog7", "dog8"]


def dreambench(*args, subject=None):
    return load_suite(to_dict(compose(["suite=dreambench", *args]))["suite"], subject=subject)


# ---- the suite on the real data (BENCH_TEST_DATA) and on the stand-in of tests/data/mini ----------
def test_full_dreambench_has_the_published_counts_categories_and_prompt_set(shared_data):
    root = shared_data / "dreambench"
    suite = dreambench(f"suite.source={root}")
    assert suite.metrics == ["dino", "clip-i", "clip-t"] and suite.images_per_prompt == 4
    assert len(suite.subjects) == 30 and len(suite.prompts) == 750
    assert len(set(suite.prompts)) == 375  # subjects of one class (dog, dog2, ...) share their 25 prompts: each is its own model's
    assert sum(len(r.paths) for r in {r.key: r for r in suite.references}.values()) == 158
    kinds = dict(zip(suite.groups["subject"], suite.groups["live_or_object"]))
    assert sorted(s for s, k in kinds.items() if k == "live") == LIVE and list(kinds.values()).count("object") == 21
    assert suite.groups["live_or_object"].count("live") == 9 * 25
    assert suite.sha256 == PUBLISHED_SHA256 and suite.canonical is True
    assert suite.prompts[0] == "a sks backpack in the jungle" and suite.prompts[-1] == "a cube shaped sks stuffed animal"
    dog = suite.subjects.index("dog") * 25
    assert suite.prompts[dog + 10] == "a sks dog wearing a red hat" and suite.references[dog].key == "dog"

    limited = dreambench(f"suite.source={root}", "suite.limit=4")  # limit and subject= pick from the published set
    assert limited.prompts == suite.prompts[:4] and limited.canonical is True and limited.groups["subject"] == ["backpack"] * 4
    one = dreambench(f"suite.source={root}", subject="cat2")
    assert len(one.prompts) == 25 and one.canonical is True and one.groups["live_or_object"] == ["live"] * 25
    assert dreambench(f"suite.source={root}", "suite.token=zwx").canonical is False  # another token: another prompt set
    micro = load_suite(to_dict(compose(["suite=dreambench-micro", f"suite.source={root}"]))["suite"], subject="dog2")
    assert micro.subjects == ["dog2"] and micro.canonical is None and len(micro.references) == 25  # a subject beyond the micro list


def test_the_stand_in_dreambench_takes_the_published_set_path_with_limit_subject_and_token(mini_data, caplog):
    source = f"suite.source={mini_data / 'dreambench'}"
    suite = dreambench(source, *published("suite=dreambench", source))
    assert suite.subjects == ["backpack", "backpack_dog", "cat", "dog"] and len(suite.prompts) == 12 and suite.canonical is True
    assert suite.groups["live_or_object"] == ["object"] * 6 + ["live"] * 6 and sum(len(r.paths) for r in {r.key: r for r in suite.references}.values()) == 10
    limited = dreambench(source, *published("suite=dreambench", source), "suite.limit=4")
    assert limited.prompts == suite.prompts[:4] and limited.canonical is True and limited.groups["subject"] == ["backpack"] * 3 + ["backpack_dog"]
    one = dreambench(source, *published("suite=dreambench", source), subject="cat")
    assert one.prompts == ["a sks cat in a cave", "a sks cat wearing a scarf", "a green sks cat"] and one.canonical is True
    assert dreambench(source, *published("suite=dreambench", source), "suite.token=zwx").canonical is False  # another token: another prompt set
    assert dreambench(source).canonical is False and "not the published prompt set (12 prompts, expected 750" in caplog.text


def test_dreambench_eval_end_to_end_with_tiny_scorers_prints_the_breakdowns(cli, tmp_path, mini_data):
    source = f"suite.source={mini_data / 'dreambench'}"
    code, out, err = cli("eval", "suite=dreambench", "model=tiny", "suite.limit=4", source, *published("suite=dreambench", source), "scorers=tiny")
    assert code == 0, err
    assert "scorers=tiny: random tiny scorers, scores NOT meaningful" in out
    assert all(f"| {m} " in out for m in ("dino", "clip-i", "clip-t"))
    assert "mean by subject (95% CI):" in out and "| backpack_dog" in out and "mean by live_or_object (95% CI):" in out and "| object" in out
    run_dir = next((tmp_path / "runs").iterdir())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["n_prompts"] == 4 and manifest["published_prompt_set"] is True and manifest["subjects"] == dreambench(source).subjects
    assert manifest["metrics"]["dino"]["model_id"] == "tiny-random" and "NOT MEANINGFUL" in manifest["metrics"]["clip-t"]["scale"]
    scores = pd.read_parquet(run_dir / "scores.parquet")
    assert len(scores) == 16 and list(scores["subject"]) == ["backpack"] * 12 + ["backpack_dog"] * 4 and set(scores["live_or_object"]) == {"object"}
    for m in ("dino", "clip-i", "clip-t"):
        assert scores[m].between(-1, 1).all() and scores[m].std() > 0  # cosines, and they differ between images


def test_missing_reference_folder_is_one_line_and_a_failing_exit(cli, tmp_path, mini_data):
    root = mini_data / "dreambench"
    code, _, err = cli("eval", "suite=dreambench", "model=tiny", f"suite.source={tmp_path / 'nowhere'}", "scorers=tiny")
    assert code != 0 and f"DreamBench folder {tmp_path / 'nowhere'} does not exist" in err and "suite.source=PATH" in err
    assert len(err.strip().splitlines()) == 1

    partial = tmp_path / "partial" / "dataset"  # the prompt table, but only the photos of the micro suite's subjects
    partial.mkdir(parents=True)
    shutil.copy(root / "dataset" / "prompts_and_classes.txt", partial)
    for name in ("dog", "cat", "backpack"):
        shutil.copytree(root / "dataset" / name, partial / name)
    code, _, err = cli("eval", "suite=dreambench", "model=tiny", f"suite.source={partial.parent}", "scorers=tiny")
    assert code != 0 and f"DreamBench subject 'backpack_dog' has no reference images in {partial / 'backpack_dog'}" in err
    assert len(err.strip().splitlines()) == 1
    micro = load_suite(to_dict(compose(["suite=dreambench-micro", f"suite.source={partial.parent}"]))["suite"])
    assert micro.subjects == ["dog", "cat", "backpack"] and len(micro.prompts) == 9  # what it needs is there
    with pytest.raises(DataError, match="subject 'backpack_dog' has no reference images"):
        dreambench(f"suite.source={partial.parent}", subject="backpack_dog")


# ---- DINO: parity with the official model and preprocessing -------------------------------------
def dino_layout_model(embed_dim, depth, heads, seed):
    """DINO's VisionTransformer (timm's, which DINO's file copies) with every parameter random,
    LayerNorm gains and biases included, so that a wrong mapping of any of them shows."""
    import timm

    model = timm.models.vision_transformer.VisionTransformer(
        img_size=224, patch_size=16, embed_dim=embed_dim, depth=depth, num_heads=heads, mlp_ratio=4, qkv_bias=True, num_classes=0
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1 + 0.1 * noise if "norm" in name and name.endswith("weight") else (0.05 if p.dim() > 1 else 0.1) * noise)
    for block in model.blocks:
        block.attn.fused_attn = False  # DINO's explicit softmax(q k^T * scale) v
    return model.eval()


def hub_dino_folder(model, directory):
    """``model``'s weights as hub facebook/dino-vits16 holds them: transformers' DINO conversion
    (base model: qkv split into query/key/value, ``blocks.i`` -> ``encoder.layer.i``, no pooler)
    saved as pytorch_model.bin, with that repository's config.json (layer_norm_eps 1e-12 included)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    dim, depth = model.embed_dim, len(model.blocks)
    out = {
        "embeddings.cls_token": sd.pop("cls_token"),
        "embeddings.position_embeddings": sd.pop("pos_embed"),
        "embeddings.patch_embeddings.projection.weight": sd.pop("patch_embed.proj.weight"),
        "embeddings.patch_embeddings.projection.bias": sd.pop("patch_embed.proj.bias"),
        "layernorm.weight": sd.pop("norm.weight"),
        "layernorm.bias": sd.pop("norm.bias"),
    }
    names = {"norm1": "layernorm_before", "attn.proj": "attention.output.dense", "norm2": "layernorm_after", "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
    for i in range(depth):
        for src, dst in names.items():
            for kind in ("weight", "bias"):
                out[f"encoder.layer.{i}.{dst}.{kind}"] = sd.pop(f"blocks.{i}.{src}.{kind}")
        for kind in ("weight", "bias"):
            qkv = sd.pop(f"blocks.{i}.attn.qkv.{kind}")
            for j, part in enumerate(("query", "key", "value")):
                out[f"encoder.layer.{i}.attention.attention.{part}.{kind}"] = qkv[j * dim : (j + 1) * dim].contiguous()
    assert not sd, f"unconverted DINO weights: {sorted(sd)}"
    directory.mkdir(parents=True)
    torch.save(out, directory / "pytorch_model.bin")
    config = {
        "architectures": ["ViTModel"], "attention_probs_dropout_prob": 0.0, "hidden_act": "gelu", "hidden_dropout_prob": 0.0,
        "hidden_size": dim, "image_size": 224, "initializer_range": 0.02, "intermediate_size": 4 * dim, "layer_norm_eps": 1e-12,
        "model_type": "vit", "num_attention_heads": model.blocks[0].attn.num_heads, "num_channels": 3, "num_hidden_layers": depth,
        "patch_size": 16, "torch_dtype": "float32", "transformers_version": "4.10.0.dev0",
    }
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def imagenhub_dino_transform():
    """ImagenHub ``VITs16.get_transform`` (= DINO eval_knn.py), as written there."""
    from torchvision import transforms

    return transforms.Compose(
        [transforms.Resize(256, interpolation=3), transforms.CenterCrop(224), transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )


def imagenhub_dino_score(model, real, generated):
    """ImagenHub ``evaluate_dino_score``: one real and one generated PIL image, numpy cosine."""
    preprocess = imagenhub_dino_transform()
    with torch.no_grad():
        emb_1 = model(preprocess(real).unsqueeze(0)).numpy()
        emb_2 = model(preprocess(generated).unsqueeze(0)).permute(1, 0).numpy()
    return np.dot(emb_1 / np.linalg.norm(np.float32(emb_1), ord=2), emb_2 / np.linalg.norm(np.float32(emb_2), ord=2))[0][0]


def varied_images(n=4, size=96, seed=0):
    """Noise over a different colour per image, not square (the crop matters): a random network
    tells these apart, where it sees all plain noise images alike."""
    g = torch.Generator().manual_seed(seed)
    colours = torch.randint(0, 256, (n, 1, 1, 3), generator=g).float()
    noise = torch.randint(0, 256, (n, size, size + 32, 3), generator=g).float()
    pixels = (0.6 * colours + 0.4 * noise).round().to(torch.uint8)
    return pixels.permute(0, 3, 1, 2).float() / 255, [Image.fromarray(p.numpy()) for p in pixels]


def subject_photos(tmp_path, seed):
    """Five JPEG photos of two subjects, at their own (non-square) sizes, as in the dataset."""
    _, pils = varied_images(n=5, size=200, seed=seed)
    paths = []
    for i, pil in enumerate(pils):
        paths.append(tmp_path / f"{i:02d}.jpg")
        pil.resize((300 + 20 * i, 260)).save(paths[-1], quality=95)
    return ReferenceSet("dog", tuple(paths[:3])), ReferenceSet("cat", tuple(paths[3:]))


def check_dino_parity(tmp_path, embed_dim, depth, heads):
    from bench.metrics import _LOADED

    official = dino_layout_model(embed_dim, depth, heads, seed=21)
    folder = hub_dino_folder(official, tmp_path / "dino-vits16")
    LocalDino = type("LocalDino", (dino_metrics.Dino,), {"info": replace(dino_metrics.Dino.info, model_id=str(folder))})
    metric = LocalDino()
    dog, cat = subject_photos(tmp_path, seed=22)
    tensors, pils = varied_images(n=4, seed=23)  # the generated images: stored uint8 pixels, decoded to floats
    refs = [dog, cat, dog, cat]
    ours = metric.score(tensors, ["p"] * 4, refs)

    model = metric.loaded()[0]
    assert all(m.eps == 1e-6 for m in model.modules() if isinstance(m, torch.nn.LayerNorm))  # DINO's, not the hub config's 1e-12
    transform = imagenhub_dino_transform()
    with torch.no_grad():
        expected_emb = official(torch.stack([transform(p) for p in pils]))
    assert torch.allclose(metric.embed(tensors), expected_emb / expected_emb.norm(dim=-1, keepdim=True), atol=1e-5, rtol=0)
    expected = [np.mean([imagenhub_dino_score(official, Image.open(path).convert("RGB"), pils[i]) for path in r.paths]) for i, r in enumerate(refs)]
    expected = torch.tensor(expected, dtype=torch.float64)
    assert torch.allclose(ours, expected, atol=1e-4, rtol=0), (ours, expected)
    assert ours.std() > 1e-2  # the scores differ: a constant would not test anything
    assert set(metric._reference_embeddings) == {"dog", "cat"} and metric._reference_embeddings["dog"].shape[0] == 3
    print(f"DINO parity, width {embed_dim} depth {depth}: max |ours - ImagenHub| = {(ours - expected).abs().max().item():.2e}, scores {ours.tolist()}")
    _LOADED.clear()


def test_dino_equals_imagenhub_on_the_official_architecture_with_the_same_weights(tmp_path):
    check_dino_parity(tmp_path, embed_dim=48, depth=2, heads=4)


@pytest.mark.slow
def test_dino_equals_imagenhub_on_the_real_vit_s16_architecture(tmp_path):
    """dino_vits16 itself: 12 blocks, width 384, 6 heads (21.7M random parameters)."""
    check_dino_parity(tmp_path, embed_dim=384, depth=12, heads=6)


def test_dino_preprocessing_is_resize_256_bicubic_crop_224_imagenet():
    from torchvision.transforms import InterpolationMode

    resize, crop, _, norm = dino_metrics.dino_transform().transforms
    assert resize.size == 256 and resize.interpolation == InterpolationMode.BICUBIC and crop.size == (224, 224)
    assert tuple(norm.mean) == (0.485, 0.456, 0.406) and tuple(norm.std) == (0.229, 0.224, 0.225)
    assert dino_metrics.Dino.info.model_id == "facebook/dino-vits16" and dino_metrics.Dino.hub_files == (
        ("facebook/dino-vits16", "a7a4d161f5c0bd70478c05ca5777ec7cd8848021", ("config.json", "model.safetensors", "pytorch_model.bin")),
    )


def test_dino_tiny_is_seeded_labelled_and_offline_official_is_one_line(tmp_path):
    from bench.metrics import _LOADED

    dog, cat = subject_photos(tmp_path, seed=31)
    tensors, _ = images(n=2, seed=32)
    a = dino_metrics.Dino("tiny").score(tensors, ["a", "b"], [dog, cat])
    _LOADED.clear()
    b = dino_metrics.Dino("tiny").score(tensors, ["a", "b"], [dog, cat])
    assert torch.equal(a, b) and a.shape == (2,)
    info = dino_metrics.Dino("tiny").info
    assert info.model_id == "tiny-random" and "NOT MEANINGFUL" in info.scale and info.version.endswith("+tiny-random")
    with pytest.raises(WeightsMissingError) as err:
        dino_metrics.Dino().score(tensors, ["a", "b"], [dog, cat])
    message = str(err.value)
    assert "\n" not in message and "facebook/dino-vits16@a7a4d16 (config.json, model.safetensors or pytorch_model.bin)" in message and "bench prefetch metrics=dino" in message


# ---- CLIP-T ------------------------------------------------------------------------------------
def test_clip_t_is_the_cosine_with_the_prompt_as_generated(tmp_path):
    """ImagenHub ``evaluate_clipt_score`` by hand (open_clip README embeddings, numpy cosine), on the
    prompts with their unique token: the metric scores exactly that text."""
    import open_clip

    arch = clip_metrics._register_tiny_open_clip()
    LocalClipT, model, preprocess = saved_open_clip(tmp_path, arch, 41, clip_metrics.ClipT)
    tokenizer = open_clip.get_tokenizer(arch)
    prompts = ["a sks dog in the jungle", "a sks backpack on the beach", "a sks cat wearing a red hat", "a purple sks teapot"]
    tensors, pils = images(seed=42)
    ours = LocalClipT().score(tensors, prompts)

    def by_hand(pil, text):
        with torch.no_grad():
            image = model.encode_image(preprocess(pil).unsqueeze(0)).numpy()
            words = model.encode_text(tokenizer([text])).permute(1, 0).numpy()
        return np.dot(image / np.linalg.norm(np.float32(image), ord=2), words / np.linalg.norm(np.float32(words), ord=2))[0][0]

    expected = torch.tensor([by_hand(p, t) for p, t in zip(pils, prompts)], dtype=torch.float64)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=0) and ours.std() > 1e-4
    without_token = torch.tensor([by_hand(p, t.replace("sks ", "")) for p, t in zip(pils, prompts)], dtype=torch.float64)
    assert (ours - without_token).abs().max() > 1e-3  # the token is part of the scored text, and it matters


def test_clip_t_shares_the_clip_i_backbone_and_equals_clip_b32():
    from bench.metrics import _LOADED

    _LOADED.clear()
    assert clip_metrics.ClipT("tiny").backbone() == clip_metrics.ClipI("tiny").backbone() == clip_metrics.ClipB32("tiny").backbone()
    tensors, _ = images(n=2, seed=43)
    t = clip_metrics.ClipT("tiny").score(tensors, ["a sks dog", "a sks cat"])
    b32 = clip_metrics.ClipB32("tiny").score(tensors, ["a sks dog", "a sks cat"])
    assert torch.equal(t, b32) and len(_LOADED) == 1


def test_bench_score_compares_a_folder_with_reference_photos(cli, tmp_path):
    """``bench score refs=FOLDER``: every image against the same photos, as the metric scores them."""
    folder, photos = tmp_path / "images", tmp_path / "photos"
    folder.mkdir()
    photos.mkdir()
    tensors, pils = images(n=3, seed=3)
    for i, pil in enumerate(pils):
        pil.save(folder / f"{i}.png")
    for i, pil in enumerate(images(n=2, size=120, seed=4)[1]):
        pil.save(photos / f"{i:02d}.jpg")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a sks dog\na sks dog on a beach\na sks dog in the snow\n")
    out = tmp_path / "scores.parquet"
    code, stdout, err = cli("score", f"images={folder}", f"prompts={prompts}", "metrics=dino,clip-i", f"refs={photos}", "scorers=tiny", f"out={out}")
    assert code == 0, err
    scores = pd.read_parquet(out)
    refs = [ReferenceSet(str(photos.resolve()), tuple(sorted(photos.glob("*.jpg"))))] * 3
    for name, metric in (("dino", dino_metrics.Dino("tiny")), ("clip-i", clip_metrics.ClipI("tiny"))):
        direct = metric.score(tensors, ["a sks dog"] * 3, refs)
        assert np.allclose(scores[name].to_numpy(), direct.numpy(), atol=1e-6), name

    code, _, err = cli("score", f"images={folder}", f"prompts={prompts}", "metrics=pickscore,dino", "scorers=tiny")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "metric dino compares each image with reference photos: add refs=FOLDER" in err
    code, _, err = cli("score", f"images={folder}", f"prompts={prompts}", "metrics=dino", f"refs={tmp_path / 'nowhere'}", "scorers=tiny")
    assert code != 0 and len(err.strip().splitlines()) == 1 and "is not a folder of images" in err
