"""PickScore and CLIP score: this project's batched scorers give the official code's numbers.

The official PickScore code is its README's ``calc_probs`` (transformers ``CLIPModel``, the laion
ViT-H/14 processor, one prompt and its images per call); it ran on transformers 4, whose
``CLIPImageProcessor`` is transformers 5's ``CLIPImageProcessorPil``. The official CLIP score is
open_clip's README recipe, one image per call. Both are written out below and fed the same weights
(saved to disk and loaded through the metric's own loading path) and the same images.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from PIL import Image

from bench.errors import WeightsMissingError
from bench.metrics import clip as clip_metrics
from bench.models.tiny import clip_tokenizer_files

PROMPTS = ["a red cube on a table", "", "an astronaut riding a horse " * 20, "a cat"]  # empty and over-long prompts too

LAION_PREPROCESSOR = {  # laion/CLIP-ViT-H-14-laion2B-s32B-b79K preprocessor_config.json
    "crop_size": 224, "do_center_crop": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
}


def images(n=4, size=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, size, size + 32, 3), generator=g, dtype=torch.uint8)  # not square: the crop matters
    return pixels.permute(0, 3, 1, 2).float() / 255, [Image.fromarray(p.numpy()) for p in pixels]


def readme_pickscore(model_dir, processor_dir, prompt, pil_images):
    """PickScore README ``calc_probs`` up to the scores, for one prompt and its images."""
    from transformers import CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil.from_pretrained(processor_dir), tokenizer=CLIPTokenizer.from_pretrained(processor_dir))
    model = CLIPModel.from_pretrained(model_dir).eval()
    image_inputs = processor(images=pil_images, padding=True, truncation=True, max_length=77, return_tensors="pt")
    text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = model.get_image_features(**image_inputs)
        image_embs = getattr(image_embs, "pooler_output", image_embs)
        image_embs = image_embs / torch.norm(image_embs, dim=-1, keepdim=True)
        text_embs = model.get_text_features(**text_inputs)
        text_embs = getattr(text_embs, "pooler_output", text_embs)
        text_embs = text_embs / torch.norm(text_embs, dim=-1, keepdim=True)
        return model.logit_scale.exp() * (text_embs @ image_embs.T)[0]


def saved_pickscore(tmp_path, model):
    model_dir, processor_dir = tmp_path / "pickscore", tmp_path / "processor"
    model.save_pretrained(model_dir)
    clip_tokenizer_files(processor_dir)
    (processor_dir / "preprocessor_config.json").write_text(json.dumps(LAION_PREPROCESSOR))

    class LocalPickScore(clip_metrics.PickScore):
        info = replace(clip_metrics.PickScore.info, model_id=str(model_dir))
        processor_id = str(processor_dir)

    return LocalPickScore(), model_dir, processor_dir


def check_pickscore_parity(tmp_path, model):
    metric, model_dir, processor_dir = saved_pickscore(tmp_path, model)
    tensors, pils = images()
    ours = metric.score(tensors, PROMPTS)  # one batch: four prompts, one image each
    official = torch.stack([readme_pickscore(model_dir, processor_dir, p, [im])[0] for p, im in zip(PROMPTS, pils)])
    assert ours.shape == (4,)
    assert torch.allclose(ours, official.double(), atol=1e-4, rtol=0), (ours, official)
    assert ours.std() > 1e-3  # the four scores differ: a constant would not test anything


def test_pickscore_equals_readme_code_on_the_same_weights(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(1)
    config = CLIPConfig(
        text_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408, max_position_embeddings=77),
        vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, image_size=224, patch_size=14),
        projection_dim=32, logit_scale_init_value=4.6052,
    )
    check_pickscore_parity(tmp_path, CLIPModel(config))


@pytest.mark.slow
def test_pickscore_equals_readme_code_on_the_real_vit_h14_architecture(tmp_path):
    """The PickScore_v1 architecture (CLIP ViT-H/14: 32 vision and 24 text layers), random weights."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(2)
    config = CLIPConfig(
        text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu"),
        vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14, image_size=224, hidden_act="gelu"),
        projection_dim=1024,
    )
    check_pickscore_parity(tmp_path, CLIPModel(config))


def test_pickscore_preprocessing_constants_are_laions():
    processor = clip_metrics.clip_image_processor()
    assert list(processor.image_mean) == LAION_PREPROCESSOR["image_mean"] and list(processor.image_std) == LAION_PREPROCESSOR["image_std"]
    assert processor.size == {"shortest_edge": 224} and processor.crop_size == {"height": 224, "width": 224} and int(processor.resample) == 3


def readme_clip_score(model, preprocess, tokenizer, prompt, pil_image):
    """open_clip README: one image, one text, cosine of the normalized features."""
    image = preprocess(pil_image).unsqueeze(0)
    text = tokenizer([prompt])
    with torch.no_grad():
        image_features = model.encode_image(image)
        text_features = model.encode_text(text)
        image_features /= image_features.norm(dim=-1, keepdim=True)
        text_features /= text_features.norm(dim=-1, keepdim=True)
        return (image_features @ text_features.T)[0, 0]


def saved_open_clip(tmp_path, arch, seed, metric_cls):
    """A random open_clip model saved to disk, and ``metric_cls`` pointed at the file (open_clip takes a
    file path as ``pretrained``), so the metric loads it through its own loading path."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None)
    weights = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    local = type(f"Local{metric_cls.__name__}", (metric_cls,), {"info": replace(metric_cls.info, model_id=str(weights)), "arch": arch, "tag": str(weights)})
    return local, model.eval(), preprocess


def check_clip_parity(tmp_path, arch):
    import open_clip

    LocalClip, model, preprocess = saved_open_clip(tmp_path, arch, 3, clip_metrics.ClipH14)
    tensors, pils = images(seed=5)
    ours = LocalClip().score(tensors, PROMPTS)
    official = torch.stack([readme_clip_score(model, preprocess, open_clip.get_tokenizer(arch), p, im) for p, im in zip(PROMPTS, pils)])
    assert torch.allclose(ours, official.double(), atol=1e-4, rtol=0), (ours, official)
    assert ours.std() > 1e-4


def test_clip_score_equals_open_clip_readme_code_on_the_same_weights(tmp_path):
    check_clip_parity(tmp_path, clip_metrics._register_tiny_open_clip())


@pytest.mark.slow
def test_clip_score_equals_open_clip_readme_code_on_the_real_vit_h14_architecture(tmp_path):
    check_clip_parity(tmp_path, "ViT-H-14")


def test_tiny_scorers_are_seeded_and_labelled():
    tensors, _ = images()
    from bench.metrics import _LOADED

    a = clip_metrics.PickScore("tiny").score(tensors, PROMPTS)
    _LOADED.clear()  # rebuilt from scratch: the same seeded weights
    b = clip_metrics.PickScore("tiny").score(tensors, PROMPTS)
    assert torch.equal(a, b)
    info = clip_metrics.ClipH14("tiny").info
    assert info.model_id == "tiny-random" and "NOT MEANINGFUL" in info.scale and info.version.endswith("+tiny-random")


@pytest.mark.slow  # a fresh process loading five tiny scorers (about 15 s)
def test_tiny_scorers_leave_no_scratch_folders_behind(tmp_path):
    """Tiny tokenizer and config files live in /tmp only while the process runs."""
    code = (
        "from bench.scoring import make_metric\n"
        "for name in ('pickscore', 'clip-h14', 'imagereward', 'blip-vqa', 'text_alignment'): make_metric(name, 'tiny').loaded()\n"
        "import tempfile, os; print(sum(n.startswith('bench-') for n in os.listdir(tempfile.gettempdir())))"
    )
    run = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TMPDIR": str(tmp_path)}, capture_output=True, text=True)
    assert run.returncode == 0 and int(run.stdout) >= 5, run.stderr[-2000:]  # while it ran, they were there
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("bench-")] == []


def test_shared_backbone_loads_once():
    from bench.metrics import _LOADED

    _LOADED.clear()
    first, second = clip_metrics.ClipH14("tiny"), clip_metrics.ClipH14("tiny")
    assert first.loaded() is second.loaded() and len(_LOADED) == 1


@pytest.mark.parametrize("metric_cls,file_hint", [(clip_metrics.PickScore, "model.safetensors"), (clip_metrics.ClipH14, "open_clip_model.safetensors")])
def test_missing_weights_offline_is_one_line_naming_the_file_and_prefetch(metric_cls, file_hint):
    tensors, _ = images(n=1)
    with pytest.raises(WeightsMissingError) as err:
        metric_cls().score(tensors, ["a cat"])
    message = str(err.value)
    assert "\n" not in message and file_hint in message and f"bench prefetch metrics={metric_cls.info.name}" in message


def test_bench_score_scores_a_folder_in_file_order_whatever_the_batching(cli, tmp_path):
    import pandas as pd

    folder = tmp_path / "images"
    folder.mkdir()
    tensors, pils = images(n=3, seed=7)
    pils[0].save(folder / "b.png")
    pils[1].resize((64, 80)).save(folder / "a.png")  # another size: its own batch
    pils[2].save(folder / "c.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("first\nsecond\nthird\n")
    outs = []
    for batch in (1, 8):
        out = tmp_path / f"scores-{batch}.parquet"
        code, stdout, err = cli("score", f"images={folder}", f"prompts={prompts}", "metrics=pickscore,clip-h14", "scorers=tiny", f"batch_size={batch}", f"out={out}")
        assert code == 0, err
        assert "| pickscore" in stdout and "NOT MEANINGFUL" in stdout
        outs.append(pd.read_parquet(out))
    assert [f.rsplit("/", 1)[1] for f in outs[0]["file"]] == ["a.png", "b.png", "c.png"] and list(outs[0]["prompt"]) == ["first", "second", "third"]
    assert (outs[0]["pickscore"] - outs[1]["pickscore"]).abs().max() < 1e-5  # batch of 1 vs batches by size
    direct = clip_metrics.PickScore("tiny").score(tensors[2:3], ["third"])
    assert abs(float(direct[0]) - outs[1]["pickscore"][2]) < 1e-5

    prompts.write_text("only one\n")
    code, _, err = cli("score", f"images={folder}", f"prompts={prompts}", "metrics=pickscore", "scorers=tiny")
    assert code != 0 and "1 prompts for 3 images" in err and len(err.strip().splitlines()) == 1


def test_aesthetic_equals_simple_inference_on_the_same_weights(tmp_path):
    """improved-aesthetic-predictor's simple_inference.py: CLIP ViT-L/14 image features, L2-normalized
    in numpy, through the MLP; here on a small open_clip model and a random head saved as the .pth."""
    import numpy as np

    LocalAesthetic, model, preprocess = saved_open_clip(tmp_path, clip_metrics._register_tiny_open_clip(), 4, clip_metrics.Aesthetic)
    head = clip_metrics.AestheticMLP(clip_metrics.TINY_OPEN_CLIP["embed_dim"])
    torch.save(head.state_dict(), tmp_path / "head.pth")
    LocalAesthetic.head_url = str(tmp_path / "head.pth")  # a local file in place of the GitHub URL
    tensors, pils = images(seed=9)
    ours = LocalAesthetic().score(tensors, PROMPTS)
    head.eval()
    official = []
    for pil in pils:
        with torch.no_grad():
            features = model.encode_image(preprocess(pil).unsqueeze(0))
        x = features.cpu().numpy()
        x = x / np.expand_dims(np.linalg.norm(x, 2, -1), -1)
        official.append(head(torch.from_numpy(x).float()).item())
    assert torch.allclose(ours, torch.tensor(official, dtype=torch.float64), atol=1e-4, rtol=0), (ours, official)
    assert ours.std() > 1e-5


def test_aesthetic_shares_the_clip_l14_backbone_and_is_one_line_offline(tmp_path, monkeypatch):
    from bench.metrics import _LOADED

    _LOADED.clear()
    assert clip_metrics.Aesthetic("tiny").backbone() == clip_metrics.ClipL14("tiny").backbone()
    tensors, _ = images(n=2)
    scores = clip_metrics.Aesthetic("tiny").score(tensors, ["a", "b"])
    assert scores.shape == (2,) and len([k for k in _LOADED if k[0] == "open_clip"]) == 1
    monkeypatch.setenv("BENCH_HOME", str(tmp_path))
    metric = clip_metrics.Aesthetic("tiny")
    metric.scorers = "official"  # the official head, on the tiny backbone already loaded: only the head is missing
    _LOADED[(*metric.backbone(), "official", "cpu", torch.float32)] = _LOADED[(*metric.backbone(), "tiny", "cpu", torch.float32)]
    with pytest.raises(WeightsMissingError) as err:
        metric.head()
    assert "sac+logos+ava1-l14-linearMSE.pth" in str(err.value) and "bench prefetch metrics=aesthetic" in str(err.value) and "\n" not in str(err.value)


def test_clip_i_is_the_mean_cosine_with_the_subjects_photos(tmp_path):
    """CLIP-I by hand: open_clip README embeddings of the generated image and of each photo (at its own
    size), the cosine averaged over the photos; the photos are embedded once per reference set."""
    from bench.metrics import ReferenceSet

    LocalClipI, model, preprocess = saved_open_clip(tmp_path, clip_metrics._register_tiny_open_clip(), 6, clip_metrics.ClipI)
    _, photos = images(n=3, size=80, seed=11)
    paths = []
    for i, photo in enumerate(photos):
        paths.append(tmp_path / f"{i:02d}.jpg")
        photo.resize((120, 90 + 10 * i)).save(paths[-1], quality=95)
    dog, cat = ReferenceSet("dog", tuple(paths[:2])), ReferenceSet("cat", tuple(paths[2:]))
    tensors, pils = images(n=3, seed=12)
    metric = LocalClipI()
    ours = metric.score(tensors, ["a", "b", "c"], [dog, cat, dog])

    def emb(pil):
        with torch.no_grad():
            e = model.encode_image(preprocess(pil).unsqueeze(0))[0]
        return e / e.norm()

    from PIL import Image

    refs = {"dog": [emb(Image.open(p).convert("RGB")) for p in paths[:2]], "cat": [emb(Image.open(paths[2]).convert("RGB"))]}
    expected = [torch.stack([emb(pils[i]) @ r for r in refs[key]]).mean() for i, key in enumerate(["dog", "cat", "dog"])]
    assert torch.allclose(ours, torch.stack(expected).double(), atol=1e-5, rtol=0)
    embedded = metric._reference_embeddings  # one embedding of each photo, per reference set
    assert set(embedded) == {"dog", "cat"} and embedded["dog"].shape[0] == 2 and embedded["cat"].shape[0] == 1
