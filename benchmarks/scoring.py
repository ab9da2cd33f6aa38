"""Scoring throughput: this project's batched scorers against the official per-call paths, measured
in one run on the same images and the same weights.

* PickScore, official: the README's ``calc_probs`` for each prompt with its one image (what the
  evaluation script does, one example at a time), the model loaded once;
* CLIP score, official: open_clip's README recipe, one image and one text per call;
* this project: ``bench.metrics.clip`` on batches of ``batch`` images with their prompts.

    python benchmarks/scoring.py                           # small CLIP configs, CPU (seconds)
    python benchmarks/scoring.py arch=real images=32       # the real ViT-H/14 architectures, random weights
    python benchmarks/scoring.py arch=real device=cuda images=256 batch=64

Random weights cost exactly what the trained ones do; the scores of the two paths are compared too.
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
    import open_clip
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

    from bench.metrics import clip as clip_metrics
    from bench.models.tiny import clip_tokenizer_files

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, 512, 512, 3), generator=g, dtype=torch.uint8)
    pils = [Image.fromarray(p.numpy()) for p in pixels]
    tensors = pixels.permute(0, 3, 1, 2).float() / 255
    prompts = [f"a photo of object number {i} on a table, high detail" for i in range(n)]
    tmp = Path(tempfile.mkdtemp())
    rows = []

    # PickScore
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

    def batched(metric):
        return torch.cat([metric.score(tensors[k : k + batch], prompts[k : k + batch]) for k in range(0, n, batch)])

    rows.append(("pickscore", *timed(pickscore_official, device), *timed(lambda: batched(ours), device)))
    del official

    # CLIP score (open_clip ViT-H-14, or a small ViT)
    name = "ViT-H-14" if arch == "real" else clip_metrics._register_tiny_open_clip()
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=None)
    weights = tmp / "open_clip.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, weights)
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
    clip_ours = LocalClip().to(device)
    clip_ours.loaded()
    rows.append(("clip-h14", *timed(clip_official, device), *timed(lambda: batched(clip_ours), device)))

    print(f"{n} images at 512 px, arch={arch}, device={device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, {torch.get_num_threads()} threads), batch={batch}")
    print("| metric | official per-call | this project, batched | speed-up | max abs difference |")
    print("|---|---|---|---|---|")
    total_official = total_ours = 0.0
    for metric, t_off, s_off, t_ours, s_ours in rows:
        total_official, total_ours = total_official + t_off, total_ours + t_ours
        print(f"| {metric} | {n / t_off:.1f} img/s | {n / t_ours:.1f} img/s | {t_off / t_ours:.2f}x | {(s_off - s_ours).abs().max().item():.2e} |")
    print(f"| together | {total_official:.2f} s | {total_ours:.2f} s | {total_official / total_ours:.2f}x | |")


if __name__ == "__main__":
    main(sys.argv[1:])
