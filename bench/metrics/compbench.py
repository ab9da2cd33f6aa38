"""T2I-CompBench's detector-based scores (spatial, 3D spatial, numeracy) and its 3-in-1 (complex).

The official scripts (``UniDet_eval/2D_spatial_eval.py``, ``3D_spatial_eval.py``,
``numeracy_eval.py``, ``3_in_1_eval/3_in_1.py``) run UniDet (``Unified_learned_OCIM_RS200_6x+2x.pth``
for 2D spatial, ``..._R50_6x+2x.pth`` for 3D and numeracy; detectron2, confidence 0.5) and, for 3D,
MiDaS DPT-Hybrid (``dpt_hybrid-midas-501f0c75.pt``). UniDet and detectron2 are not installable as
packages, so these metrics keep the official decision rules (which objects a prompt names, how a
relation is judged from two boxes, how a count is matched, the thresholds, the score formulas,
even the quirks) and take the boxes from OWLv2 (``google/owlv2-base-patch16-ensemble``, queried
with exactly the labels the rules look for), per-label NMS at 0.5 (detectron2's test NMS) and the
OWLv2 post-processing threshold 0.1. Their names end in ``-owlv2`` and their scale says
NON-CANONICAL: the numbers follow the official recipe but are not comparable with published
T2I-CompBench numbers. The depth model of the 3D score is transformers' port of the same MiDaS
DPT-Hybrid weights (``Intel/dpt-hybrid-midas``).

Boxes are in the official frame: the image resized with ``Resize(size=479, max_size=480)`` (479x479
for a square image), where the 2D rule's distance threshold of 150 pixels applies.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import torch

from bench.metrics import ComposedMetric, HubFiles, LearnedMetric, MetricInfo, seeded
from bench.metrics.clip import ClipB32, preprocess_each, to_pil

NON_CANONICAL = "NON-CANONICAL (UniDet unavailable; boxes from OWLv2)"
DATA = Path(__file__).parent / "data" / "t2i_compbench.json"

SPATIAL_WORDS = ["on side of", "next to", "near", "on the left of", "on the right of", "on the bottom of", "on the top of", "on top of"]
COMPLEX_PREPOSITIONS = ["on top of", "on bottom of", "on the left", "on the right", "next to", "on side of", "near"]
SPATIAL_WORDS_3D = ["in front of", "behind", "hidden"]
PERSON = ["girl", "boy", "man", "woman"]
COUNT_WORDS = ["a", "an", "one", "two", "three", "four", "five", "six", "seven", "eight"]
WORD_TO_NUMBER = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8}  # word2number on these words
NUMERACY_RENAMES = {"boy": "person", "girl": "person", "man": "person", "woman": "person", "ship": "boat", "telivision": "tv", "goldfish": "fish", "painting": "picture"}


@lru_cache(maxsize=1)
def official_lists() -> dict:
    """The official files these rules read: the complex sub-lists and the numeracy nouns (MIT)."""
    return json.loads(DATA.read_text())


@dataclass(frozen=True)
class Detection:
    label: str
    score: float
    box: tuple[float, float, float, float]  # x_min, y_min, x_max, y_max in the 479-pixel frame


def official_frame(width: int, height: int) -> tuple[int, int]:
    """(height, width) after torchvision ``Resize(size=479, max_size=480)`` (UniDet's input)."""
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = 479, int(479 * long / short)
    if new_long > 480:
        new_short, new_long = int(480 * new_short / new_long), 480
    return (new_long, new_short) if width <= height else (new_short, new_long)


def _box(b) -> dict:
    return {"x_min": b[0], "y_min": b[1], "x_max": b[2], "y_max": b[3]}


def _iou_and_offsets(box1: dict, box2: dict):
    c1 = ((box1["x_min"] + box1["x_max"]) / 2, (box1["y_min"] + box1["y_max"]) / 2)
    c2 = ((box2["x_min"] + box2["x_max"]) / 2, (box2["y_min"] + box2["y_max"]) / 2)
    x_overlap = max(0, min(box1["x_max"], box2["x_max"]) - max(box1["x_min"], box2["x_min"]))
    y_overlap = max(0, min(box1["y_max"], box2["y_max"]) - max(box1["y_min"], box2["y_min"]))
    inter = x_overlap * y_overlap
    area1 = (box1["x_max"] - box1["x_min"]) * (box1["y_max"] - box1["y_min"])
    area2 = (box2["x_max"] - box2["x_min"]) * (box2["y_max"] - box2["y_min"])
    union = area1 + area2 - inter
    return (inter / union if union > 0 else 0.0), c2[0] - c1[0], c2[1] - c1[1]  # the official code divides by zero on empty boxes


def position_score(locality, box1: dict, box2: dict, iou_threshold=0.1, distance_threshold=150) -> float:
    """``determine_position`` of the 2D script: 1 for the named relation, a soft score near it."""
    iou, dx, dy = _iou_and_offsets(box1, box2)
    if locality in ["next to", "on side of", "near"]:
        return 1 if abs(dx) < distance_threshold or abs(dy) < distance_threshold else distance_threshold / max(abs(dx), abs(dy))
    sides = {"on the right of": (dx < 0, abs(dx) > abs(dy)), "on the left of": (dx > 0, abs(dx) > abs(dy)),
             "on the bottom of": (dy < 0, abs(dy) > abs(dx)), "on the top of": (dy > 0, abs(dy) > abs(dx))}
    if locality not in sides:  # "on top of" is in the vocabulary but has no rule: 0, as in the official code
        return 0
    direction, dominant = sides[locality]
    if direction and dominant:
        return 1 if iou < iou_threshold else iou_threshold / iou
    return 0


def depth_position_score(locality, box1: dict, box2: dict, depth_map: torch.Tensor, iou_threshold_3d=0.5) -> float:
    """``determine_position`` of the 3D script for in front of / behind / hidden: the mean relative
    inverse depth inside each box (indexed ``[x, y]`` as the official code does) and the boxes' IoU."""
    if locality not in SPATIAL_WORDS_3D:
        return position_score(locality, box1, box2)
    iou, _, _ = _iou_and_offsets(box1, box2)
    region = lambda b: depth_map[int(b["x_min"]) : int(b["x_max"]), int(b["y_min"]) : int(b["y_max"])]  # noqa: E731
    diff = (region(box1).float().mean() - region(box2).float().mean()).item()
    closer = diff > 0 if locality == "in front of" else diff < 0
    if iou > iou_threshold_3d:
        return 1 if closer else 0
    if 0 < iou < iou_threshold_3d:
        return iou / iou_threshold_3d if closer else 0
    return 0


def find_locality(prompt: str, words: Sequence[str]) -> str | None:
    return next((w for w in words if w in prompt), None)


def spatial_objects(doc, complex_prompt: bool = False) -> tuple[str | None, str | None]:
    """The two objects of a spatial prompt: its first and last nouns, or for a complex prompt the
    nouns either side of its preposition (None, None unless exactly two are found)."""
    if not complex_prompt:
        nouns = [t.text for t in doc if t.pos_ == "NOUN"]
        obj1, obj2 = (nouns[0], nouns[-1]) if nouns else (None, None)  # the official script raises on no noun
    else:
        objects = []
        n = len(doc)
        for i in range(n):
            k = next((k for k in (3, 2, 1) if doc[i : i + k].text in COMPLEX_PREPOSITIONS), None)
            if k is None:
                continue
            for j in range(i - 1, -1, -1):
                if doc[j].pos_ in ("NOUN", "PROPN"):
                    objects.append(doc[j].text)
                    break
            after = [j for j in range(i + k, n) if doc[j].pos_ == "NOUN"]
            if after:
                objects.append(doc[after[0]].text)
            elif i + k < n:  # no noun after it: a proper noun not followed by another
                proper = [j for j in range(i + k, n) if j + 1 < n and doc[j].pos_ == "PROPN" and doc[j + 1].pos_ != "PROPN"]
                if proper:
                    objects.append(doc[proper[0]].text)
        obj1, obj2 = objects if len(objects) == 2 else (None, None)
    return ("person" if obj1 in PERSON else obj1), ("person" if obj2 in PERSON else obj2)


def spatial_score(prompt: str, doc, detections: Sequence[Detection], complex_prompt: bool = False) -> float:
    """2D_spatial_eval.py's image score: a quarter of each named object's detection score, plus half
    the position score when both are found; below 0.5 it is 0."""
    obj1, obj2 = spatial_objects(doc, complex_prompt)
    locality = find_locality(prompt, SPATIAL_WORDS)
    labels = [d.label for d in detections]
    if obj1 in labels and obj2 in labels:
        d1, d2 = detections[labels.index(obj1)], detections[labels.index(obj2)]
        score = 0.25 * d1.score + 0.25 * d2.score + position_score(locality, _box(d1.box), _box(d2.box)) / 2
    elif obj1 in labels:
        score = 0.25 * detections[labels.index(obj1)].score
    elif obj2 in labels:
        score = 0.25 * detections[labels.index(obj2)].score
    else:
        score = 0
    return 0.0 if score < 0.5 else float(score)


def spatial_3d_score(prompt: str, doc, detections: Sequence[Detection], depth_map: torch.Tensor) -> float:
    """3D_spatial_eval.py's image score (objects matched by substring of the label, as there; no 0.5 cut)."""
    obj1, obj2 = spatial_objects(doc)
    locality = find_locality(prompt, SPATIAL_WORDS_3D)
    labels = [d.label for d in detections]
    joined = " ".join(labels)
    pos1 = pos2 = None
    if obj1 is not None and obj2 is not None and obj1 in joined and obj2 in joined:
        for i, label in enumerate(labels):  # the official loop: the later of two obj1 matches before obj2 wins
            if obj1 in label:
                pos1 = i
            if obj2 in label:
                pos2 = i
            if pos1 is not None and pos2 is not None:
                break
        if pos1 is None or pos2 is None:
            return 0.0
        d1, d2 = detections[pos1], detections[pos2]
        return float(0.25 * d1.score + 0.25 * d2.score + depth_position_score(locality, _box(d1.box), _box(d2.box), depth_map) / 2)
    for obj in (obj1, obj2):
        if obj is not None and obj in joined:
            return float(0.25 * detections[next(i for i, label in enumerate(labels) if obj in label)].score)
    return 0.0


def numeracy_objects(doc) -> tuple[list[str], list[int]]:
    """numeracy_eval.py's parse: after a count word, an object of new_objects.txt (singular or plural),
    read as that object and its count."""
    pairs = [line.split(" - ") for line in official_lists()["new_objects.txt"]]
    singular, plural = [p[0].strip().lower() for p in pairs], [p[1].strip().lower() for p in pairs]
    objects, counts = [], []
    n = len(doc)
    for i in range(n):
        word = doc[i].text
        if word not in COUNT_WORDS or i + 1 >= n:
            continue
        two = doc[i + 1].text + " " + doc[i + 2].text if i < n - 2 else None
        nxt = doc[i + 1].text
        if two is not None and (two in singular or two in plural):
            if two in plural and word not in ["a", "an", "one"]:
                objects.append(singular[plural.index(two)])
                if word in WORD_TO_NUMBER:
                    counts.append(WORD_TO_NUMBER[word])
            else:
                counts.append(1)
                objects.append(two)
        elif nxt in singular or nxt in plural:
            if nxt in singular and word in ["a", "an", "one"]:
                counts.append(1)
                objects.append(nxt)
            elif nxt in plural:  # the official code raises here on a singular after a count above one
                objects.append(singular[plural.index(nxt)])
                if word in WORD_TO_NUMBER:  # word2number fails on "a"/"an": no count is recorded, as there
                    counts.append(WORD_TO_NUMBER[word])
    return objects, counts


def _same_object(b1, b2) -> bool:
    """numeracy_eval.py's ``calculate_iou``: IoU or either box's covered fraction above 0.9 (+1 pixel areas)."""
    ix1, iy1, ix2, iy2 = max(b1[0], b2[0]), max(b1[1], b2[1]), min(b1[2], b2[2]), min(b1[3], b2[3])
    inter = max(0, ix2 - ix1 + 1) * max(0, iy2 - iy1 + 1)
    a1 = (b1[2] - b1[0] + 1) * (b1[3] - b1[1] + 1)
    a2 = (b2[2] - b2[0] + 1) * (b2[3] - b2[1] + 1)
    return inter / float(a1 + a2 - inter) > 0.9 or inter / float(a1) > 0.9 or inter / float(a2) > 0.9


def numeracy_score(doc, detections: Sequence[Detection]) -> float:
    """numeracy_eval.py's image score: for each named object, half its weight when detected and half
    when the number of (de-duplicated) detections equals the prompt's count."""
    labels, boxes = [], []
    for d in detections:
        if not any(_same_object(d.box, b) and d.label == label for label, b in zip(labels, boxes)):
            labels.append(d.label)
            boxes.append(d.box)
    objects, counts = numeracy_objects(doc)
    if not objects:
        return 0.0  # the official code divides by zero here
    weight, score = 1.0 / len(objects), 0.0
    for i, obj in enumerate(objects):
        obj = NUMERACY_RENAMES.get(obj, obj)
        if obj not in labels:
            labels = [obj if obj in label else label for label in labels]
        if obj in labels:
            score += 0.5 * weight
            if i < len(counts) and labels.count(obj) == counts[i]:
                score += 0.5 * weight
    return score


def detector_queries(objects: Sequence[str | None]) -> list[str]:
    return list(dict.fromkeys(o for o in objects if o))


# --------------------------------------------------------------------------- models

OWLV2_REPO = "google/owlv2-base-patch16-ensemble"
OWLV2_REVISION = "cfd3195ba4ea9592eec887ded089f4c08eff231d"  # hub cache snapshot paths of 3 public projects (one lists its model.safetensors)
DPT_REPO = "Intel/dpt-hybrid-midas"
# HF tree page and a snapshot path. At this commit the repo holds pytorch_model.bin and no model.safetensors
# (a safetensors copy is only on refs/pr/5), so the .bin is what loads. transformers reads it with torch's
# weights-only unpickler: from_pretrained(weights_only=True) by default, passed to modeling_utils.load_state_dict,
# which calls check_torch_load_is_safe() (torch >= 2.6) and torch.load(..., weights_only=True) (checked in the
# installed transformers 5.24). It loads a refs/pr conversion only for use_safetensors=True on revision "main".
DPT_REVISION = "11eaf7a1cf4bd70740697dbc216f98980c0aeb03"


class OwlDetector(LearnedMetric):
    """OWLv2 as a closed-vocabulary detector over each image's own labels: every box gets its best
    label and sigmoid score; boxes under ``threshold`` go, then per-label NMS; sorted by score."""

    info = MetricInfo("owlv2", "1", True, "boxes", OWLV2_REPO, OWLV2_REVISION)
    hub_files = (HubFiles(OWLV2_REPO, OWLV2_REVISION, ("*.json", "*.txt", "model.safetensors")),)
    weight_files = f"{OWLV2_REPO}@{OWLV2_REVISION[:7]} (model.safetensors, processor files)"
    threshold = 0.1  # transformers' OWLv2 post-processing default
    nms_iou = 0.5  # detectron2's ROI_HEADS.NMS_THRESH_TEST

    def __init__(self, scorers: str = "official", owner: str = "owlv2"):
        super().__init__(scorers)
        self.info = replace(self.info, name=owner)

    def load_official(self):
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        hub = self.hub_kwargs(self.info.model_id)
        processor = Owlv2Processor.from_pretrained(self.info.model_id, **hub)
        return Owlv2ForObjectDetection.from_pretrained(self.info.model_id, **hub), processor.image_processor, processor.tokenizer

    def load_tiny(self):
        from transformers import CLIPTokenizer, Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor

        from bench.metrics.clip import clip_tokenizer_dir

        config = Owlv2Config(
            text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=49408, max_position_embeddings=16),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64, patch_size=16),
            projection_dim=32,
        )
        with seeded():
            model = Owlv2ForObjectDetection(config)
        return model, Owlv2ImageProcessor(size={"height": 64, "width": 64}), CLIPTokenizer.from_pretrained(clip_tokenizer_dir())

    @torch.no_grad()
    def detect(self, images: torch.Tensor, queries: Sequence[Sequence[str]]) -> list[list[Detection]]:
        from torchvision.ops import batched_nms
        from transformers.models.owlv2.image_processing_owlv2 import center_to_corners_format

        if not any(queries):
            return [[] for _ in queries]
        model, image_processor, tokenizer = self.loaded()
        pils = to_pil(images)
        width = max(1, max(len(q) for q in queries))
        texts = [list(q) + [" "] * (width - len(q)) for q in queries]
        valid = torch.tensor([[k < len(q) for k in range(width)] for q in queries])
        tokens = tokenizer([t for row in texts for t in row], padding="max_length", truncation=True, max_length=16, return_tensors="pt").to(self.device)
        pixels = image_processor(images=pils, return_tensors="pt")["pixel_values"].to(self.device, self.dtype)
        out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, pixel_values=pixels)
        logits = out.logits.float().masked_fill(~valid[:, None, :].to(self.device), float("-inf"))
        best, label = logits.max(-1)
        scores = best.sigmoid()
        corners = center_to_corners_format(out.pred_boxes.float())
        results = []
        for i, pil in enumerate(pils):
            h, w = official_frame(*pil.size)
            keep = (scores[i] > self.threshold) & valid[i].any()
            boxes = corners[i][keep] * max(h, w)  # OWLv2 pads to a square at the bottom right
            boxes = torch.stack([boxes[:, 0].clamp(0, w), boxes[:, 1].clamp(0, h), boxes[:, 2].clamp(0, w), boxes[:, 3].clamp(0, h)], -1)  # clipped, as detectron2 does
            s, lab = scores[i][keep], label[i][keep]
            kept = batched_nms(boxes, s, lab, self.nms_iou)  # sorted by decreasing score
            results.append([Detection(queries[i][int(lab[k])], float(s[k]), tuple(float(v) for v in boxes[k])) for k in kept.tolist()])
        return results


class MidasDepth(LearnedMetric):
    """MiDaS DPT-Hybrid relative inverse depth as 3D_spatial_eval.py prepares it: 480x480 input
    normalized with 0.5/0.5, min-max scaled, resized to the image (bilinear, corners aligned), stored
    as an 8-bit PNG, then resized to the 479-pixel frame and divided by 255."""

    info = MetricInfo("dpt-hybrid-midas", "1", True, "relative inverse depth", DPT_REPO, DPT_REVISION)
    hub_files = (HubFiles(DPT_REPO, DPT_REVISION, ("*.json", "model.safetensors", "pytorch_model.bin")),)  # .bin: see DPT_REVISION
    weight_files = f"{DPT_REPO}@{DPT_REVISION[:7]} (pytorch_model.bin, config.json)"
    input_size = 480

    def __init__(self, scorers: str = "official", owner: str = "dpt-hybrid-midas"):
        super().__init__(scorers)
        self.info = replace(self.info, name=owner)
        if scorers == "tiny":
            self.input_size = 64

    def load_official(self):
        from transformers import DPTForDepthEstimation

        return (DPTForDepthEstimation.from_pretrained(self.info.model_id, **self.hub_kwargs(self.info.model_id)),)

    def load_tiny(self):
        from transformers import DPTConfig, DPTForDepthEstimation

        config = DPTConfig(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64, image_size=64, patch_size=16,
                           backbone_out_indices=[0, 1, 2, 3], neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16, head_in_index=-1)
        with seeded():
            return (DPTForDepthEstimation(config),)

    @torch.no_grad()
    def depth_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        import numpy as np
        from PIL import Image
        from torchvision import transforms

        (model,) = self.loaded()
        pils = to_pil(images)
        prep = transforms.Compose([transforms.Resize([self.input_size, self.input_size]), transforms.ToTensor(), transforms.Normalize(mean=0.5, std=0.5)])
        pixels = preprocess_each(prep, pils).to(self.device, self.dtype)
        predicted = model(pixel_values=pixels).predicted_depth.float()
        maps = []
        for depth, pil in zip(predicted, pils):
            depth = torch.nan_to_num((depth - depth.min()) / (depth.max() - depth.min()))  # a flat map is 0/0: black, as PIL writes NaN
            depth = torch.nn.functional.interpolate(depth[None, None], size=(pil.size[1], pil.size[0]), mode="bilinear", align_corners=True)[0, 0]
            png = Image.fromarray(np.clip(255 * depth.cpu().numpy(), 0, 255).astype(np.uint8))  # PIL's F -> L truncates
            resized = transforms.Resize(size=479, max_size=480)(png)
            maps.append(torch.from_numpy(np.asarray(resized).copy()).float() / 255.0)
        return maps


# --------------------------------------------------------------------------- metrics


class _CompBenchMetric(ComposedMetric):
    """A T2I-CompBench metric of several parts that parses its prompts with spaCy."""

    def parser(self):
        from bench.metrics.nlp import english

        return english(self.scorers, self.name)

    def download(self) -> list[str]:
        from bench.metrics.nlp import download_spacy

        return super().download() + [download_spacy()]


class _DetectorMetric(_CompBenchMetric):
    """A T2I-CompBench rule on detector boxes: each prompt parsed, its objects detected (OWLv2)."""

    def __init__(self, scorers: str = "official"):
        super().__init__(scorers)
        self.parts = {"detector": OwlDetector(scorers, self.name)}

    def detections(self, images: torch.Tensor, prompts: Sequence[str], objects) -> tuple[list, list[list[Detection]]]:
        """The parsed prompts and, per image, the detections of ``objects(parsed prompt)``."""
        docs = [self.parser()(p) for p in prompts]
        return docs, self.parts["detector"].detect(images, [detector_queries(objects(d)) for d in docs])


class Spatial2D(_DetectorMetric):
    info = MetricInfo(
        "t2i-spatial-owlv2", "t2i-compbench-1", True,
        f"2D_spatial_eval.py score in [0, 1] (0.25 * each object's detection score + position / 2; under 0.5 -> 0); {NON_CANONICAL}",
        OWLV2_REPO, OWLV2_REVISION,
    )
    complex_prompts = False

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        docs, found = self.detections(images, prompts, lambda d: spatial_objects(d, self.complex_prompts))
        return torch.tensor([spatial_score(p, d, f, self.complex_prompts) for p, d, f in zip(prompts, docs, found)], dtype=torch.float64)


class Spatial3D(_DetectorMetric):
    info = MetricInfo(
        "t2i-3d-spatial-owlv2", "t2i-compbench-1", True,
        f"3D_spatial_eval.py score in [0, 1] (0.25 * each object's detection score + depth relation / 2, MiDaS DPT-Hybrid); {NON_CANONICAL}",
        "google/owlv2-base-patch16-ensemble + Intel/dpt-hybrid-midas",
    )

    def __init__(self, scorers: str = "official"):
        super().__init__(scorers)
        self.parts["depth"] = MidasDepth(scorers, self.name)

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        docs, found = self.detections(images, prompts, spatial_objects)
        depths = self.parts["depth"].depth_maps(images)
        return torch.tensor([spatial_3d_score(p, d, f, m) for p, d, f, m in zip(prompts, docs, found, depths)], dtype=torch.float64)


class Numeracy(_DetectorMetric):
    info = MetricInfo(
        "t2i-numeracy-owlv2", "t2i-compbench-1", True,
        f"numeracy_eval.py score in [0, 1] (per named object: 1/2 detected + 1/2 count equal); {NON_CANONICAL}",
        OWLV2_REPO, OWLV2_REVISION,
    )

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        docs, found = self.detections(images, prompts, lambda d: [NUMERACY_RENAMES.get(o, o) for o in numeracy_objects(d)[0]])
        return torch.tensor([numeracy_score(d, f) for d, f in zip(docs, found)], dtype=torch.float64)


def _sublist_key(line: str) -> str:
    return line.split(".")[0].lower()


@lru_cache(maxsize=1)
def complex_sublists() -> dict[str, set[str]]:
    lists = official_lists()
    return {kind: {_sublist_key(x) for x in lists[f"complex_val_{kind}.txt"]} for kind in ("spatial", "action")}


def complex_kind(prompt: str) -> str:
    """Which 3_in_1.py branch a complex prompt takes: "spatial" (in complex_val_spatial.txt), "action"
    (in complex_val_action.txt) or "spatialaction" (anything else); lines are compared up to their
    first "." and in lower case, as there."""
    key = _sublist_key(prompt)
    return next((kind for kind, keys in complex_sublists().items() if key in keys), "spatialaction")


def three_in_one(kind: str, attribute: float, spatial: float, action: float) -> float:
    """3_in_1.py: the mean of the attribute (BLIP-VQA) score and the spatial (2D detector) or action
    (CLIP) score, or of all three for prompts with both relations."""
    if kind == "spatial":
        return (spatial + attribute) * 0.5
    if kind == "action":
        return (action + attribute) * 0.5
    return (attribute + spatial + action) / 3


class ComplexSpatial(Spatial2D):
    """The 2D score with the complex prompts' object rule (``2D_spatial_eval.py --complex=True``)."""

    complex_prompts = True


class Complex3in1(_CompBenchMetric):
    """T2I-CompBench's complex score: BLIP-VQA (``blip-vqa``), the 2D spatial score in its complex mode
    and CLIP ViT-B/32's cosine with the prompt stripped of adjectives (``CLIP_similarity.py
    --complex=True``), combined per prompt as 3_in_1.py does. Its spatial part is non-canonical."""

    info = MetricInfo(
        "t2i-complex-3in1-owlv2", "t2i-compbench-1", True,
        f"3_in_1.py mean of BLIP-VQA, 2D spatial (complex rule) and CLIP cos without adjectives, per the prompt's sub-list; {NON_CANONICAL}",
        "BLIP model_base_vqa_capfilt_large + google/owlv2-base-patch16-ensemble + OpenAI CLIP ViT-B/32",
    )

    def __init__(self, scorers: str = "official"):
        from bench.metrics.vqa import BlipVqa

        super().__init__(scorers)
        self.parts = {"attribute": BlipVqa(scorers), "spatial": ComplexSpatial(scorers), "action": ClipB32(scorers)}

    def action_scores(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        texts = [" ".join(t.text for t in self.parser()(p) if t.pos_ != "ADJ") for p in prompts]
        clip = self.parts["action"]
        return (clip.embed_images(images) * clip.embed_texts(texts)).sum(-1).double().cpu()

    def score(self, images: torch.Tensor, prompts: Sequence[str], refs=None) -> torch.Tensor:
        kinds = [complex_kind(p) for p in prompts]
        attribute = self.parts["attribute"].score(images, prompts)
        spatial = self.parts["spatial"].score(images, prompts)
        action = self.action_scores(images, prompts)
        return torch.tensor([three_in_one(k, a, s, c) for k, a, s, c in zip(kinds, attribute.tolist(), spatial.tolist(), action.tolist())], dtype=torch.float64)
