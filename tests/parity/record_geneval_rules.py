"""Record the verdicts of GenEval's own rules for tests/test_geneval.py.

GenEval's evaluator (djghosh13/geneval ``evaluation/evaluate_images.py`` at af4902f) imports mmdetection
at its top, which cannot be installed beside this project. Its rules (``evaluate_image``'s filtering of
detections, ``evaluate``, ``relative_position``, ``compute_iou``) need numpy and PIL only, so this
script runs the official file itself with three stand-ins and nothing else changed:

* ``mmdet`` and ``mmdet.apis`` are empty modules, and ``inference_detector`` returns the case's
  detections as mmdetection 2.x does (a list of ``(n, 5)`` arrays ``x0, y0, x1, y1, score``, one per
  class of ``object_names.txt``);
* ``open_clip`` and ``clip_benchmark`` are empty modules, and ``color_classification`` returns the
  case's colors (a function of each box, ``case_colors``, that the test applies to the same boxes);
* the options are the defaults of its ``__main__`` block (thresholds 0.3 and 0.9, 16 objects, no NMS,
  position threshold 0.1), and a second run with ``max_overlap=0.5`` exercises its NMS.

Run from a checkout of geneval at af4902f (no GPU; the official ``DEVICE == "cuda"`` assertion is
lifted by a stand-in ``torch.cuda.is_available``)::

    python tests/parity/record_geneval_rules.py GENEVAL_CHECKOUT

It writes ``tests/data/geneval_rules_parity.json``: for each case, a spec drawn as ``create_prompts.py``
draws them (not GenEval's own prompts), the detections, the palette the colors come from, and the
official ``correct`` and ``reason``.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "data" / "geneval_rules_parity.json"
N_CASES = 240


def case_colors(palette: list[str], box) -> str:
    """The stand-in color of a detection: the palette's entry at the box's left edge."""
    return palette[int(box[0]) % len(palette)]


def random_spec(rng, names: list[str], colors: list[str], k: int) -> dict:
    """A spec in the form of evaluation_metadata.jsonl, drawn as create_prompts.py draws its six tags."""
    tag = ("single_object", "two_object", "counting", "colors", "position", "color_attr")[k % 6]
    a, b = (names[int(i)] for i in rng.choice(len(names), size=2, replace=False))
    ca, cb = (colors[int(i)] for i in rng.choice(len(colors), size=2, replace=False))
    include = {
        "single_object": [{"class": a, "count": 1}],
        "two_object": [{"class": a, "count": 1}, {"class": b, "count": 1}],
        "counting": [{"class": a, "count": int(rng.integers(2, 5))}],
        "colors": [{"class": a, "count": 1, "color": ca}],
        "position": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [("left of", "right of", "above", "below")[int(rng.integers(4))], 0]}],
        "color_attr": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}],
    }[tag]
    spec = {"tag": tag, "include": include, "prompt": f"case {k}"}
    if tag == "counting":
        spec["exclude"] = [{"class": a, "count": include[0]["count"] + 1}]
    return spec


def make_cases(names: list[str], seed: int = 0) -> list[dict]:
    """Seeded specs and detections around their classes (and a distractor), scores across the thresholds."""
    rng = np.random.default_rng(seed)
    colors = ["red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white"]
    cases = []
    for k in range(N_CASES):
        spec = random_spec(rng, names, colors, k)
        classes = [req["class"] for req in spec["include"]] + [names[int(rng.integers(len(names)))]]
        detections = []
        for i, name in enumerate(classes):
            counted = spec["tag"] == "counting" and i == 0  # around the count, mostly above 0.9: exact counts and exclusions
            n = int(rng.integers(spec["include"][0]["count"] - 1, spec["include"][0]["count"] + 3)) if counted else int(rng.integers(0, 5))
            for _ in range(n):
                x0, y0 = rng.uniform(0, 400, 2).round(1)
                w, h = rng.uniform(10, 200, 2).round(1)
                score = rng.uniform(0.85, 1.0) if counted else rng.uniform(0.2, 1.0)
                detections.append({"class": name, "box": [float(x0), float(y0), float(x0 + w), float(y0 + h)], "score": round(float(score), 4)})
        wanted = [req["color"] for req in spec["include"] if "color" in req]
        palette = wanted + [colors[int(rng.integers(len(colors)))]]
        cases.append({"spec": spec, "detections": detections, "palette": palette, "max_overlap": 0.5 if k % 4 == 3 else 1.0})
    return cases


def main(checkout: Path) -> None:
    import torch
    from PIL import Image

    for name in ("mmdet", "mmdet.apis", "open_clip", "clip_benchmark", "clip_benchmark.metrics"):
        sys.modules[name] = types.ModuleType(name)
    sys.modules["mmdet"].__file__ = str(checkout / "mmdet_stand_in.py")
    sys.modules["mmdet.apis"].inference_detector = sys.modules["mmdet.apis"].init_detector = None
    zsc = types.ModuleType("clip_benchmark.metrics.zeroshot_classification")
    sys.modules["clip_benchmark.metrics.zeroshot_classification"] = zsc
    sys.modules["clip_benchmark.metrics"].zeroshot_classification = zsc
    torch.cuda.is_available = lambda: True
    ns: dict = {"__name__": "geneval_evaluate_images"}
    exec(compile((checkout / "evaluation" / "evaluate_images.py").read_text(), "evaluate_images.py", "exec"), ns)
    names = [line.strip() for line in (checkout / "evaluation" / "object_names.txt").read_text().splitlines()]
    image = checkout / "blank.png"
    Image.new("RGB", (512, 512), "#808080").save(image)
    ns.update(classnames=names, THRESHOLD=0.3, COUNTING_THRESHOLD=0.9, MAX_OBJECTS=16, POSITION_THRESHOLD=0.1, object_detector=None)
    cases = make_cases(names)
    for case in cases:
        arrays = [np.zeros((0, 5), dtype=np.float32) for _ in names]
        for d in case["detections"]:
            row = np.array([[*d["box"], d["score"]]], dtype=np.float32)
            arrays[names.index(d["class"])] = np.concatenate([arrays[names.index(d["class"])], row])
        ns["inference_detector"] = lambda detector, path, arrays=arrays: arrays
        ns["color_classification"] = lambda img, objs, classname, palette=case["palette"]: [case_colors(palette, box) for box, _ in objs]
        ns["NMS_THRESHOLD"] = case["max_overlap"]
        result = ns["evaluate_image"](str(image), case["spec"])
        case["correct"], case["reason"] = bool(result["correct"]), result["reason"]
    OUT.write_text(json.dumps({"source": "djghosh13/geneval af4902f evaluation/evaluate_images.py", "cases": cases}, indent=0) + "\n")
    print(f"{len(cases)} cases, {sum(c['correct'] for c in cases)} correct -> {OUT}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
