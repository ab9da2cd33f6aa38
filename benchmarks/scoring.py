"""Scoring throughput: this project's batched scorers against the official per-call paths, measured
in one run on the same images and the same weights (random weights cost what trained ones do).

* PickScore, official: the README's ``calc_probs`` for each prompt with its one image (what the
  evaluation script does, one example at a time), the model loaded once;
* HPS v2.1, official: the ``hpsv2`` package's own ``hpsv2.score([image], prompt)``, which reloads its
  checkpoint on every call (the package must be installed: ``.ci/install-reference-packages``);
* ImageReward, official: ``ImageReward.score(prompt, image)`` encodes one image per call. The package
  cannot be imported beside transformers 5, so its per-call loop runs on this project's network (equal
  to the package's to 1e-6, ``tests/test_imagereward.py``), one image per forward pass;
* LAION aesthetic, official: ``simple_inference.py``, one image per CLIP forward, then the MLP;
* CLIP score, official: open_clip's README recipe, one image and one text per call;
* this project: the ``bench.metrics`` classes on batches of ``batch`` images with their prompts.

    python benchmarks/scoring.py                           # small configs, CPU (seconds)
    python benchmarks/scoring.py arch=real images=16       # the real architectures (ViT-H/14, BLIP ViT-L), random weights
    python benchmarks/scoring.py arch=real device=cuda images=256 batch=64
    python benchmarks/scoring.py metrics=pickscore,imagereward   # some of the cases
    python benchmarks/scoring.py threads=1                       # preprocessing on one thread, as before it had more

"together" sums the four preference scorers of the suites (PickScore, HPS v2.1, ImageReward, aesthetic),
those of them that ran.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch


def pickscore_model(arch: str):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    if arch == "real":  # yuvalkirstain/PickScore_v1 = CLIP ViT-H/14
        text = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16, hidden_act="gelu")
        vision = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16, patch_size=14, image_size=224, hidden_act="gelu")
        return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=1024))
    text = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
    vision = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, patch_size=16, image_size=224)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


def timed(fn, device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    arch, n, batch = opts.get("arch", "small"), int(opts.get("images", 32)), int(opts.get("batch", 32))
    device = torch.device(opts.get("device", "cuda" if torch.cuda.is_available() else "cpu"))
    names = opts["metrics"].split(",") if "metrics" in opts else list(CASES)
    from PIL import Image

    import bench.images

    bench.images.PREPROCESS_THREADS = int(opts.get("threads", bench.images.PREPROCESS_THREADS))

    from bench.metrics import _LOADED

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, 512, 512, 3), generator=g, dtype=torch.uint8)
    pils = [Image.fromarray(p.numpy()) for p in pixels]
    tensors = pixels.permute(0, 3, 1, 2).float() / 255
    prompts = [f"a photo of object number {i} on a table, high detail" for i in range(n)]
    tmp = Path(tempfile.mkdtemp())

    def batched(metric):
        return torch.cat([metric.score(tensors[k : k + batch], prompts[k : k + batch]) for k in range(0, n, batch)])

    rows = []
    for name in names:
        rows.append((name, *CASES[name](arch, tmp, pils, tensors, prompts, device, batched)))
        _LOADED.clear()  # free each case's models before the next is built

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{n} images at 512 px, arch={arch}, device={device} ({where}, {torch.get_num_threads()} torch threads), batch={batch}, preprocessing threads={bench.images.PREPROCESS_THREADS}")
    print("| metric | official per-call | this project, batched | speed-up | max abs difference |")
    print("|---|---|---|---|---|")
    total_official = total_ours = 0.0
    for metric, t_off, s_off, t_ours, s_ours in rows:
        if metric in TOGETHER:
            total_official, total_ours = total_official + t_off, total_ours + t_ours
        print(f"| {metric} | {n / t_off:.2f} img/s | {n / t_ours:.2f} img/s | {t_off / t_ours:.2f}x | {(s_off - s_ours).abs().max().item():.2e} |")
    together = [name for name in names if name in TOGETHER]
    if len(together) > 1:
        print(f"| together ({', '.join(together)}) | {total_official:.1f} s | {total_ours:.1f} s | {total_official / total_ours:.2f}x | |")


def pickscore_case(arch, tmp, pils, tensors, prompts, device, batched):
    """PickScore: the README's ``calc_probs`` for each prompt with its one image, the model loaded once."""
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

    from bench.metrics import clip as clip_metrics
    from bench.models.tiny import clip_tokenizer_files

    model_dir = tmp / "pickscore"
    pickscore_model(arch).save_pretrained(model_dir)
    clip_tokenizer_files(tmp / "processor")
    processor = CLIPProcessor(image_processor=clip_metrics.clip_image_processor(), tokenizer=CLIPTokenizer.from_pretrained(tmp / "processor"))
    official = CLIPModel.from_pretrained(model_dir).eval().to(device)

    def pickscore_official():
        out = []
        for prompt, image in zip(prompts, pils):
            image_inputs = processor(images=[image], return_tensors="pt").to(device)
            text_inputs = processor(text=prompt, padding=True, truncation=True, max_length=77, return_tensors="pt").to(device)
            with torch.no_grad():
                i = clip_metrics._features(official.get_image_features(**image_inputs))
                t = clip_metrics._features(official.get_text_features(**text_inputs))
                i, t = i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
                out.append((official.logit_scale.exp() * (t @ i.T))[0, 0].item())
        return torch.tensor(out, dtype=torch.float64)

    class LocalPickScore(clip_metrics.PickScore):
        info = replace(clip_metrics.PickScore.info, model_id=str(model_dir))
        processor_id = str(tmp / "processor")

    ours = LocalPickScore().to(device)
    ours.loaded()  # loading is not scoring: both paths start with the weights in memory
    return (*timed(pickscore_official, device), *timed(lambda: batched(ours), device))


def saved_open_clip(name: str, seed: int, weights: Path):
    """A seeded random open_clip model saved where a metric loads it from; the model and its preprocessing."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
    return model, preprocess


def clip_case(arch, tmp, pils, tensors, prompts, device, batched):
    """CLIP score (open_clip ViT-H-14, or a small ViT): open_clip's README recipe, one image and one text per call."""
    import open_clip

    from bench.metrics import clip as clip_metrics

    name = "ViT-H-14" if arch == "real" else clip_metrics._register_tiny_open_clip()
    weights = tmp / "open_clip.safetensors"
    model, preprocess = saved_open_clip(name, 0, weights)
    model = model.eval().to(device)
    tokenizer = open_clip.get_tokenizer(name)

    def clip_official():
        out = []
        for prompt, image in zip(prompts, pils):
            with torch.no_grad():
                i = model.encode_image(preprocess(image).unsqueeze(0).to(device))
                t = model.encode_text(tokenizer([prompt]).to(device))
                out.append(((i / i.norm(dim=-1, keepdim=True)) @ (t / t.norm(dim=-1, keepdim=True)).T)[0, 0].item())
        return torch.tensor(out, dtype=torch.float64)

    class LocalClip(clip_metrics.OpenClipScore):
        info = replace(clip_metrics.ClipH14.info, model_id=str(weights))

    LocalClip.arch, LocalClip.tag = name, str(weights)
    ours = LocalClip().to(device)
    ours.loaded()
    return (*timed(clip_official, device), *timed(lambda: batched(ours), device))


TOGETHER = ("pickscore", "hpsv2.1", "imagereward", "aesthetic")


def hps_case(arch, tmp, pils, tensors, prompts, device, batched):
    """HPS v2.1: the package's ``score()`` (checkpoint reloaded per call) against ``bench.metrics.hps``."""
    import huggingface_hub
    import open_clip
    from hpsv2 import img_score
    from hpsv2.src.open_clip import create_model_and_transforms
    from hpsv2.src.open_clip import factory as hps_factory

    from bench.metrics import clip as clip_metrics
    from bench.metrics import hps

    name = "ViT-H-14" if arch == "real" else clip_metrics._register_tiny_open_clip()
    if arch != "real":
        import json

        (tmp / f"{name}.json").write_text(json.dumps(clip_metrics.TINY_OPEN_CLIP))
        hps_factory.add_model_config(tmp)
    torch.manual_seed(1)
    checkpoint = tmp / "HPS_v2.1_compressed.pt"
    torch.save({"state_dict": open_clip.create_model(name, pretrained=None).state_dict()}, checkpoint)
    model, _, preprocess_val = create_model_and_transforms(
        name, None, precision="amp", device=str(device), jit=False, force_quick_gelu=False, force_custom_text=False, force_patch_dropout=False,
        force_image_size=None, pretrained_image=False, image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False,
    )
    img_score.model_dict.update(model=model, preprocess_val=preprocess_val)  # what its initialize_model() builds once
    img_score.device = str(device)
    huggingface_hub.hf_hub_download = lambda repo, filename, **kw: str(checkpoint)  # the package's download, answered locally

    def official():
        return 100 * torch.tensor([float(img_score.score([image], prompt, hps_version="v2.1")[0]) for image, prompt in zip(pils, prompts)], dtype=torch.float64)

    ours = type("LocalHPSv21", (hps.HPSv21,), {"arch": name, "checkpoint": str(checkpoint)})().to(device)
    ours.loaded()
    result = (*timed(official, device), *timed(lambda: batched(ours), device))
    img_score.model_dict.clear()
    return result


def imagereward_case(arch, tmp, pils, tensors, prompts, device, batched):
    """ImageReward: its one-image-per-call loop against whole batches, on the same network and weights."""
    import json

    from bench.metrics import imagereward as ir

    vit = ir.BLIP_VIT_LARGE if arch == "real" else ir.TINY_VIT
    med = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=512, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0) if arch == "real" else ir.TINY_MED_CONFIG
    folder = tmp / "imagereward"
    vocab = ir.write_wordpiece_vocab(folder / "bert-vocab")
    med = {**med, "vocab_size": 30524 if arch == "real" else len(ir.blip_tokenizer(str(vocab)))}  # BLIP's med_config.json: 30524
    torch.manual_seed(2)
    net = ir.ImageRewardNet(vit, med, med["vocab_size"])
    torch.save(net.state_dict(), folder / "ImageReward.pt")
    (folder / "med_config.json").write_text(json.dumps(med))
    del net
    ours = type("LocalImageReward", (ir.ImageReward,), {"info": replace(ir.ImageReward.info, model_id=str(folder)), "tokenizer_id": str(vocab), "vit": vit})().to(device)
    ours.loaded()

    def official():
        return torch.cat([ours.score(tensors[i : i + 1], prompts[i : i + 1]) for i in range(len(prompts))])

    return (*timed(official, device), *timed(lambda: batched(ours), device))


def aesthetic_case(arch, tmp, pils, tensors, prompts, device, batched):
    """LAION aesthetic v2: ``simple_inference.py`` (one image per CLIP forward, normalize, MLP) against batches."""
    from bench.metrics import clip as clip_metrics

    name = "ViT-L-14" if arch == "real" else clip_metrics._register_tiny_open_clip()
    weights = tmp / "aesthetic-clip.safetensors"
    model, preprocess = saved_open_clip(name, 3, weights)
    mlp = clip_metrics.AestheticMLP(model.visual.output_dim)
    torch.save(mlp.state_dict(), tmp / "aesthetic-head.pth")
    model, mlp = model.eval().to(device), mlp.eval().to(device)

    def official():
        out = []
        for image in pils:
            with torch.no_grad():
                emb = model.encode_image(preprocess(image).unsqueeze(0).to(device)).float()
                out.append(mlp(emb / emb.norm(dim=-1, keepdim=True)).item())
        return torch.tensor(out, dtype=torch.float64)

    ours = type("LocalAesthetic", (clip_metrics.Aesthetic,), {"arch": name, "tag": str(weights), "head_url": str(tmp / "aesthetic-head.pth")})().to(device)
    ours.loaded()
    return (*timed(official, device), *timed(lambda: batched(ours), device))



CASES = {"pickscore": pickscore_case, "clip-h14": clip_case, "hpsv2.1": hps_case, "imagereward": imagereward_case, "aesthetic": aesthetic_case}


if __name__ == "__main__":
    main(sys.argv[1:])
