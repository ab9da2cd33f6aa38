"""GenEval (Ghosh et al., NeurIPS 2023 D&B): does the image hold the objects, counts, colors and
positions its prompt asks for, by the official rules of ``evaluation/evaluate_images.py``
(djghosh13/geneval @ af4902f).

What to check is read from the prompt: GenEval's 553 prompts are written by six templates of
``prompts/create_prompts.py`` over the 80 COCO names of ``object_names.txt``, and ``geneval_spec``
inverts them into the ``include``/``exclude`` metadata of ``evaluation_metadata.jsonl`` (tested on
every official line). The official rules, written out here:

* detections of a class are kept above a confidence of 0.3 (0.9 for a ``counting`` prompt), most
  confident first, at most 16, with no NMS (``max_overlap`` 1.0);
* each ``include`` needs ``count`` of its class; a color is CLIP ViT-L/14's (open_clip ``openai``)
  zero-shot choice among 10 colors, on each object's box crop with the pixels outside its mask
  painted #999, over three templates; a position compares the two boxes' centers after shrinking
  the offset by 0.1 of their summed sizes; ``exclude`` (counting) fails at ``count`` or more;
* the image is correct when every clause holds; a tag's score is its images' accuracy and the
  overall score the unweighted mean over the six tags (``suite.overall_by: tag``).

The official detector is mmdetection 2.x's Mask2Former Swin-S COCO checkpoint
(``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``), which needs mmcv-full 1.7 and cannot be
installed beside torch 2.x here. This metric runs the same architecture on the same 80 classes from
the Mask2Former authors' release in transformers (``facebook/mask2former-swin-small-coco-instance``),
post-processed as mmdetection's ``MaskFormerFusionHead`` does (top 100 of queries x classes, score =
class probability x mean mask probability, box = the mask's extent) at mmdetection's test scale
(shorter side 800, longer at most 1333). Its name ends in ``-m2f`` and its scale says NON-CANONICAL:
different weights, so its numbers are not comparable with published GenEval scores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np
import torch

from bench.metrics import ComposedMetric, HubFiles, LearnedMetric, MetricInfo, seeded
from bench.metrics.clip import ClipL14, preprocess_each, to_pil

NON_CANONICAL = "NON-CANONICAL (mmdetection's Mask2Former unavailable; Mask2Former Swin-S COCO weights from transformers)"

# evaluation/object_names.txt: the COCO classes in the detector's label order, GenEval's names
OBJECT_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light", "fire hydrant", "stop sign",
    "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard",
    "surfboard", "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed", "dining table", "toilet", "tv",
    "laptop", "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOR_TEMPLATES = ("a photo of a {c} {obj}", "a photo of a {c}-colored {obj}", "a photo of a {c} object")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
POSITIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")  # summary_scores.py's order
OPTIONS = {"threshold": 0.3, "counting_threshold": 0.9, "max_objects": 16, "max_overlap": 1.0, "position_threshold": 0.1, "bgcolor": "#999"}


# --------------------------------------------------------------------------- prompts -> metadata


def with_article(name: str) -> str:
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def plural(name: str) -> str:
    return f"{name}es" if name.endswith("s") else f"{name}s"


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_OBJ = f"(?:an?) ({_alternatives(OBJECT_NAMES)})"
_COLORED = f"(?:an?) ({_alternatives(COLORS)}) ({_alternatives(OBJECT_NAMES)})"
_TEMPLATES = (
    ("single_object", re.compile(f"a photo of {_OBJ}")),
    ("two_object", re.compile(f"a photo of {_OBJ} and {_OBJ}")),
    ("counting", re.compile(f"a photo of ({_alternatives(NUMBERS[2:])}) ({_alternatives(plural(n) for n in OBJECT_NAMES)})")),
    ("colors", re.compile(f"a photo of {_COLORED}")),
    ("position", re.compile(f"a photo of {_OBJ} ({_alternatives(POSITIONS)}) {_OBJ}")),
    ("color_attr", re.compile(f"a photo of {_COLORED} and {_COLORED}")),
)
_SINGULAR = {plural(n): n for n in OBJECT_NAMES}


def geneval_spec(prompt: str) -> dict | None:
    """The GenEval metadata of a prompt written by one of its six templates (``tag``, ``include``,
    ``exclude`` as in ``evaluation_metadata.jsonl``); None for any other prompt."""
    for tag, pattern in _TEMPLATES:
        m = pattern.fullmatch(prompt)
        if m is None:
            continue
        g = m.groups()
        if tag == "single_object":
            include = [{"class": g[0], "count": 1}]
        elif tag == "two_object":
            include = [{"class": g[0], "count": 1}, {"class": g[1], "count": 1}]
        elif tag == "counting":
            name, count = _SINGULAR[g[1]], NUMBERS.index(g[0])
            return {"tag": tag, "include": [{"class": name, "count": count}], "exclude": [{"class": name, "count": count + 1}], "prompt": prompt}
        elif tag == "colors":
            include = [{"class": g[1], "count": 1, "color": g[0]}]
        elif tag == "position":
            include = [{"class": g[2], "count": 1}, {"class": g[0], "count": 1, "position": [g[1], 0]}]
        else:
            include = [{"class": g[1], "count": 1, "color": g[0]}, {"class": g[3], "count": 1, "color": g[2]}]
        if prompt == render_prompt(tag, include):  # the articles too: "a apple" is no GenEval prompt
            return {"tag": tag, "include": include, "prompt": prompt}
    return None


def render_prompt(tag: str, include: list[dict]) -> str:
    """The prompt create_prompts.py writes for a tag's ``include`` clauses."""
    a, b = include[0], include[-1]
    if tag == "single_object":
        return f"a photo of {with_article(a['class'])}"
    if tag == "two_object":
        return f"a photo of {with_article(a['class'])} and {with_article(b['class'])}"
    if tag == "counting":
        return f"a photo of {NUMBERS[a['count']]} {plural(a['class'])}"
    if tag == "colors":
        return f"a photo of {with_article(a['color'])} {a['class']}"
    if tag == "position":
        return f"a photo of {with_article(b['class'])} {b['position'][0]} {with_article(a['class'])}"
    return f"a photo of {with_article(a['color'])} {a['class']} and {with_article(b['color'])} {b['class']}"


# --------------------------------------------------------------------------- the official rules


@dataclass(frozen=True)
class Instance:
    """One detection: its class index, score, box ``(x0, y0, x1, y1)`` in image pixels and mask."""

    label: int
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None  # bool (H, W)


def box_iou(a, b) -> float:
    """evaluate_images.py's ``compute_iou`` (areas counted with +1 pixels)."""
    area = lambda box: max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)  # noqa: E731
    inter = area([max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])])
    union = area(a) + area(b) - inter
    return inter / union if union else 0


def kept_objects(instances: Sequence[Instance], tag: str, options: dict = OPTIONS) -> dict[str, list[Instance]]:
    """The detections the rules see, by class name: above the confidence threshold (the counting one
    for ``counting``), most confident first, at most ``max_objects``, then greedy NMS at ``max_overlap``
    (1.0: none)."""
    threshold = options["counting_threshold"] if tag == "counting" else options["threshold"]
    kept = {}
    for index, name in enumerate(OBJECT_NAMES):
        found = [d for d in instances if d.label == index]
        order = np.argsort(np.array([d.score for d in found], dtype=np.float32))[::-1]  # on mmdetection's float32 scores, as there
        ranked = [found[i] for i in order if found[i].score > threshold][: options["max_objects"]]
        chosen = []
        while ranked:
            best = ranked.pop(0)
            chosen.append(best)
            ranked = [d for d in ranked if options["max_overlap"] == 1 or box_iou(best.box, d.box) < options["max_overlap"]]
        if chosen:
            kept[name] = chosen
    return kept


def relative_position(a, b, threshold: float = OPTIONS["position_threshold"]) -> set[str]:
    """Where box ``a`` lies relative to box ``b``: the center offset shrunk by ``threshold`` of the
    two boxes' summed sizes on each axis, then any direction holding more than half of the offset's
    length (y grows downward)."""
    boxes = np.array([a[:4], b[:4]], dtype=np.float64).reshape(2, 2, 2)
    center_a, center_b = boxes.mean(axis=-2)
    size_a, size_b = np.abs(np.diff(boxes, axis=-2))[..., 0, :]
    offset = center_a - center_b
    shrunk = np.maximum(np.abs(offset) - threshold * (size_a + size_b), 0) * np.sign(offset)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    dx, dy = shrunk / np.linalg.norm(offset)
    return {name for name, holds in (("left of", dx < -0.5), ("right of", dx > 0.5), ("above", dy < -0.5), ("below", dy > 0.5)) if holds}


def judge(spec: dict, objects: dict[str, list[Instance]], colors_of: Callable[[str, list[Instance]], list[str]], threshold: float = OPTIONS["position_threshold"]) -> tuple[bool, str]:
    """evaluate_images.py's ``evaluate``: every ``include`` holds (count, then color, then position
    against the objects an earlier clause matched) and no ``exclude`` does; with the reasons it fails."""
    correct, reasons, matched_groups = True, [], []
    for req in spec.get("include", []):
        name, count = req["class"], req["count"]
        found = objects.get(name, [])[:count]
        matched = len(found) >= count
        if not matched:
            reasons.append(f"expected {name}>={count}, found {len(found)}")
        else:
            if "color" in req:
                colors = colors_of(name, found)
                if colors.count(req["color"]) < count:
                    matched = False
                    seen = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
                    reasons.append(f"expected {req['color']} {name}>={count}, found {colors.count(req['color'])} {req['color']}; and {seen}")
            if "position" in req and matched:
                relation, target = req["position"]
                if matched_groups[target] is None:
                    matched = False
                    reasons.append(f"no target for {name} to be {relation}")
                else:
                    for obj in found:
                        wrong = next((t for t in matched_groups[target] if relation not in relative_position(obj.box, t.box, threshold)), None)
                        if wrong is not None:
                            matched = False
                            found_relations = relative_position(obj.box, wrong.box, threshold)  # a set there: its order varies with the hash seed
                            reasons.append(f"expected {name} {relation} target, found {' and '.join(r for r in POSITIONS if r in found_relations)} target")
                            break
        correct &= matched
        matched_groups.append(found if matched else None)
    for req in spec.get("exclude", []):
        present = len(objects.get(req["class"], []))
        if present >= req["count"]:
            correct = False
            reasons.append(f"expected {req['class']}<{req['count']}, found {present}")
    return correct, "\n".join(reasons)


# --------------------------------------------------------------------------- the detector

M2F_REPO = "facebook/mask2former-swin-small-coco-instance"
TEST_SCALE = {"shortest_edge": 800, "longest_edge": 1333}  # mmdetection's Mask2Former COCO test pipeline: Resize (1333, 800), keep ratio, pad to 32
MAX_PER_IMAGE = 100  # mmdetection's test_cfg.max_per_image


def masks_to_boxes(masks: torch.Tensor) -> torch.Tensor:
    """mmdetection's ``mask2bbox``: each mask's extent ``(x0, y0, x1 + 1, y1 + 1)``; zeros for an empty mask."""
    boxes = torch.zeros(masks.shape[0], 4)
    cols, rows = masks.any(dim=1), masks.any(dim=2)
    for i in range(masks.shape[0]):
        x, y = torch.where(cols[i])[0], torch.where(rows[i])[0]
        if len(x) and len(y):
            boxes[i] = torch.tensor([x[0], y[0], x[-1] + 1, y[-1] + 1], dtype=torch.float32)
    return boxes


def instances_of(class_logits: torch.Tensor, mask_logits: torch.Tensor, top: int = MAX_PER_IMAGE) -> list[Instance]:
    """mmdetection's ``MaskFormerFusionHead.instance_postprocess`` of one image (``class_logits``
    ``(Q, C + 1)``, ``mask_logits`` ``(Q, H, W)`` at the image's size): the ``top`` best of all
    query-class pairs, each scored by its class probability times its mask's mean probability inside
    the mask (logit > 0), boxed by the mask's extent."""
    probs = class_logits.float().softmax(-1)[:, :-1]
    classes = probs.shape[1]
    scores, flat = probs.flatten().topk(min(top, probs.numel()), sorted=False)
    labels, queries = flat % classes, torch.div(flat, classes, rounding_mode="floor")
    masks = mask_logits[queries].float()
    binary = masks > 0
    mask_scores = (masks.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    boxes = masks_to_boxes(binary.cpu())
    det = (scores * mask_scores).cpu()
    binary = binary.cpu().numpy()
    return [Instance(int(labels[k]), float(det[k]), tuple(float(v) for v in boxes[k]), binary[k]) for k in range(len(flat))]


class Mask2FormerDetector(LearnedMetric):
    """Mask2Former Swin-S trained on COCO instances, as transformers ports the authors' release."""

    info = MetricInfo("mask2former-swin-s-coco", "1", True, "instances", M2F_REPO, None)
    hub_files = (HubFiles(M2F_REPO, None, ("*.json", "model.safetensors", "pytorch_model.bin")),)
    weight_files = f"{M2F_REPO} (config.json, preprocessor_config.json, weights)"

    def __init__(self, scorers: str = "official", owner: str = "mask2former-swin-s-coco"):
        super().__init__(scorers)
        self.info = replace(self.info, name=owner)

    def load_official(self):
        from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

        hub = self.hub_kwargs(self.info.model_id)
        model = Mask2FormerForUniversalSegmentation.from_pretrained(self.info.model_id, **hub)
        if model.config.num_labels != len(OBJECT_NAMES):
            raise ValueError(f"{self.info.model_id} has {model.config.num_labels} classes, GenEval's rules need COCO's {len(OBJECT_NAMES)}")
        processor = Mask2FormerImageProcessor.from_pretrained(self.info.model_id, **hub)
        processor.size, processor.size_divisor = dict(TEST_SCALE), 32
        return model, processor

    def load_tiny(self):
        from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor, SwinConfig

        swin = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=4,
                          out_features=["stage1", "stage2", "stage3", "stage4"])
        config = Mask2FormerConfig(backbone_config=swin, num_labels=len(OBJECT_NAMES), hidden_dim=32, feature_size=32, mask_feature_size=32,
                                   encoder_layers=1, decoder_layers=2, num_queries=8, dim_feedforward=64, encoder_feedforward_dim=64, num_attention_heads=4)
        with seeded():
            model = Mask2FormerForUniversalSegmentation(config)
        return model, Mask2FormerImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}, size_divisor=32)

    def detect(self, images: torch.Tensor) -> list[list[Instance]]:
        """Each image's instances, masks and boxes at the image's own size."""
        return self.detect_pil(to_pil(images))

    @torch.no_grad()
    def detect_pil(self, pils: list) -> list[list[Instance]]:
        model, processor = self.loaded()
        inputs = processor(images=pils, return_tensors="pt")
        out = model(pixel_values=inputs["pixel_values"].to(self.device, self.dtype), pixel_mask=inputs["pixel_mask"].to(self.device))
        padded = inputs["pixel_values"].shape[-2:]
        masks = torch.nn.functional.interpolate(out.masks_queries_logits.float(), size=padded, mode="bilinear", align_corners=False)
        results = []
        for i, pil in enumerate(pils):
            valid = inputs["pixel_mask"][i].bool()
            h, w = int(valid.any(1).sum()), int(valid.any(0).sum())  # the resized image inside its padding
            mask = torch.nn.functional.interpolate(masks[i : i + 1, :, :h, :w], size=(pil.size[1], pil.size[0]), mode="bilinear", align_corners=False)[0]
            results.append(instances_of(out.class_queries_logits[i], mask))
        return results


# --------------------------------------------------------------------------- the metric


class GenEvalMask2Former(ComposedMetric):
    """1 where the image holds what its GenEval prompt asks, by the official rules; NaN for a prompt
    none of GenEval's templates wrote."""

    info = MetricInfo(
        "geneval-m2f", "geneval-af4902f", True,
        f"1 if the image holds the prompt's objects, count, colors and position by GenEval's rules, else 0; {NON_CANONICAL}",
        f"{M2F_REPO} + OpenAI CLIP ViT-L/14",
    )
    options = OPTIONS

    def __init__(self, scorers: str = "official"):
        super().__init__(scorers)
        self.parts = {"detector": Mask2FormerDetector(scorers, self.name), "clip": ClipL14(scorers)}
        self._color_classifiers: dict = {}

    def color_classifier(self, name: str) -> torch.Tensor:
        """clip_benchmark's ``zero_shot_classifier`` over the 10 colors for an object class: each
        color's template embeddings normalized, averaged and normalized again; ``(D, 10)``."""
        clip = self.parts["clip"]
        key = (name, clip.scorers, str(clip.device))
        if key not in self._color_classifiers:
            columns = []
            for color in COLORS:
                emb = clip.embed_texts([t.format(c=color, obj=name) for t in COLOR_TEMPLATES]).mean(0)
                columns.append(emb / emb.norm())
            self._color_classifiers[key] = torch.stack(columns, dim=1)
        return self._color_classifiers[key]

    def crops(self, image, objects: list[Instance]) -> list:
        """The official ``ImageCrops``: the image with the pixels outside each mask painted
        ``bgcolor``, cropped to the box (PIL rounds the box as there)."""
        from PIL import Image

        image = image.convert("RGB")
        blank = Image.new("RGB", image.size, color=self.options["bgcolor"])
        return [(Image.composite(image, blank, Image.fromarray(o.mask)) if o.mask is not None else image).crop(o.box) for o in objects]

    def colors_of(self, image) -> Callable[[str, list[Instance]], list[str]]:
        def classify(name: str, objects: list[Instance]) -> list[str]:
            clip = self.parts["clip"]
            model, preprocess, _ = clip.loaded()
            pixels = preprocess_each(preprocess, self.crops(image, objects)).to(clip.device, clip.dtype)
            with torch.no_grad():
                feats = model.encode_image(pixels).float()
            logits = 100.0 * (feats / feats.norm(dim=-1, keepdim=True)) @ self.color_classifier(name)
            return [COLORS[i] for i in logits.argmax(1).tolist()]

        return classify

    def verdicts(self, images: torch.Tensor, prompts: Sequence[str]) -> list[tuple[bool, str] | None]:
        """Each image's (correct, reason), None off GenEval's templates."""
        specs = [geneval_spec(p) for p in prompts]
        on = [i for i, s in enumerate(specs) if s is not None]
        out: list = [None] * len(prompts)
        if not on:
            return out
        pils = to_pil(images[on])
        for i, pil, found in zip(on, pils, self.parts["detector"].detect_pil(pils)):
            objects = kept_objects(found, specs[i]["tag"], self.options)
            out[i] = judge(specs[i], objects, self.colors_of(pil), self.options["position_threshold"])
        return out

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        return torch.tensor([float("nan") if v is None else float(v[0]) for v in self.verdicts(images, prompts)], dtype=torch.float64)
