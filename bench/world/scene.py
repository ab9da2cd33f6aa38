"""The scene grammar of the micro world: objects, captions and the spec the evaluator checks.

A scene holds 1-4 objects (``Obj``): a shape (``SHAPES``), a color (``PALETTE``), a size and a
position, all in canvas units (the canvas is the unit square, x to the right and y down), so one
scene renders exactly at any resolution (``bench.world.render``). The objects never overlap: their
bounding boxes keep ``GAP`` apart and ``BORDER`` from the edges.

A caption is drawn first, as a spec in the form of GenEval's metadata jsonl, then a layout that
satisfies it (``layout``). The captions follow GenEval's templates ("a photo of ..."):

=============  ==================================================  =====================================
tag            caption                                             spec ``include`` (and ``exclude``)
=============  ==================================================  =====================================
single_object  a photo of a circle                                 circle x1
two_object     a photo of a circle and a square                    circle x1, square x1
counting       a photo of three circles                            circle x3; exclude circle x4
colors         a photo of a red circle                             red circle x1
position       a photo of a red circle left of a blue square       blue square x1, red circle x1 with
                                                                   ``position: [left of, 0]``
color_attr     a photo of a red circle and a blue square           red circle x1, blue square x1
=============  ==================================================  =====================================

As in GenEval the relations are "left of", "right of", "above" and "below" (no "to the"), counts are
two to four, and a ``position`` entry ``[relation, i]`` says that this object stands in that relation
to the objects matched by ``include[i]``. Unlike GenEval's position prompts, ours name the colors
of both objects too (the world has no uncolored objects), and the evaluator checks them. Objects a
caption leaves free (the colors in ``single_object``, ``two_object`` and ``counting``) are drawn at
random; a scene holds exactly the objects its spec includes, no distractors.

Everything is a pure function of the seed: scene ``i`` of tag ``t`` is drawn from
``numpy.random.default_rng([seed, t, i])``, so ``make_prompts(n, seed)`` is a prefix of
``make_prompts(n + 1, seed)`` tag by tag.
"""

from __future__ import annotations

import copy
import csv
import json
from dataclasses import asdict, dataclass, field
from functools import cache
from itertools import permutations, product
from pathlib import Path

import numpy as np

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
SHAPES = ("circle", "square", "triangle")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles"}
# Six colors spread around the hue circle (hues about 0, 54, 129, 180, 234 and 283 degrees), all with
# a chroma (max - min channel) of at least 140 on a neutral background: the evaluator tells them apart by hue.
PALETTE = {
    "red": (220, 40, 40),
    "yellow": (230, 210, 20),
    "green": (30, 170, 50),
    "cyan": (20, 200, 200),
    "blue": (40, 60, 230),
    "purple": (170, 40, 220),
}
COLORS = tuple(PALETTE)
BACKGROUND = (235, 235, 235)
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {2: "two", 3: "three", 4: "four"}
COUNTS = (2, 3, 4)
SIZES = {"small": (0.16, 0.21), "large": (0.25, 0.32)}  # side of the bounding box, in canvas units (10-13 and 16-20 px at 64)
GAP = 0.07      # between two objects' bounding boxes (4.5 px at 64)
BORDER = 0.04   # between a bounding box and the canvas edge
POSITION_THRESHOLD = 0.1  # GenEval's: the center offset is shrunk by this fraction of the two boxes' summed sizes


@dataclass(frozen=True)
class Obj:
    """One object: ``shape`` in SHAPES, ``color`` in PALETTE, ``size`` the side of its (square)
    bounding box and ``x``, ``y`` its center, in canvas units. A triangle stands on its base, apex up."""

    shape: str
    color: str
    size: float
    x: float
    y: float

    @property
    def bbox(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in canvas units."""
        h = self.size / 2
        return (self.x - h, self.y - h, self.x + h, self.y + h)

    @property
    def size_word(self) -> str:
        return "small" if self.size <= SIZES["small"][1] else "large"


@dataclass(frozen=True)
class Scene:
    """A caption, its GenEval tag, the spec the evaluator checks and objects that satisfy it."""

    objects: tuple[Obj, ...]
    caption: str
    tag: str
    spec: dict = field(hash=False)

    def render(self, res: int = 64, aa: int = 1) -> np.ndarray:
        from bench.world.render import render

        return render(self.objects, res, aa)

    def row(self) -> dict:
        """The prompt-file row: ``prompt``, ``tag`` and ``spec`` (JSON text)."""
        return {"prompt": self.caption, "tag": self.tag, "spec": json.dumps(self.spec, sort_keys=True)}

    def to_json(self) -> dict:
        return {"caption": self.caption, "tag": self.tag, "spec": self.spec, "objects": [asdict(o) for o in self.objects]}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun(cls: str, color: str | None = None) -> str:
    words = f"{color} {cls}" if color else cls
    return f"{article(words)} {words}"


def relations(box_a, box_b, threshold: float = POSITION_THRESHOLD, cut: float = 0.5) -> set[str]:
    """GenEval's relative position of box A to box B (``(x0, y0, x1, y1)``, y down): the offset of
    the centers, each axis shrunk toward 0 by ``threshold`` times the two boxes' summed extent on
    it, divided by the length of the raw offset; "left of" when its x is below ``-cut``, "right of"
    above ``cut``, "above"/"below" likewise on y. Boxes whose shrunk offset is 0 are in no relation."""
    a, b = np.asarray(box_a, float).reshape(2, 2), np.asarray(box_b, float).reshape(2, 2)
    offset = a.mean(0) - b.mean(0)
    dims = np.abs(a[1] - a[0]) + np.abs(b[1] - b[0])
    revised = np.maximum(np.abs(offset) - threshold * dims, 0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    out = set()
    if dx < -cut:
        out.add("left of")
    if dx > cut:
        out.add("right of")
    if dy < -cut:
        out.add("above")
    if dy > cut:
        out.add("below")
    return out


def judge(objects, spec: dict) -> bool:
    """Whether objects (anything with ``shape``, ``color`` and ``bbox``, e.g. ``Obj`` or a detection)
    satisfy a spec, by GenEval's rules: each ``include`` entry needs at least ``count`` objects of
    its class (and color, when it names one); a ``position: [relation, i]`` must hold from each of
    them to each object matched by entry ``i``; an ``exclude`` entry fails when ``count`` or more
    objects of its class (and color) are present. Where GenEval takes the ``count`` most confident
    detections, this takes the ``count`` largest (by box area, first listed on ties)."""
    def matching(req):
        found = [o for o in objects if o.shape == req["class"] and (req.get("color") is None or o.color == req["color"])]
        return sorted(found, key=lambda o: -(o.bbox[2] - o.bbox[0]) * (o.bbox[3] - o.bbox[1]))

    groups = []
    for req in spec.get("include", []):
        found = matching(req)[: req["count"]]
        if len(found) < req["count"]:
            return False
        if "position" in req:
            relation, target = req["position"]
            if any(relation not in relations(o.bbox, t.bbox) for o in found for t in groups[target]):
                return False
        groups.append(found)
    return all(len(matching(req)) < req["count"] for req in spec.get("exclude", []))


def caption_of(spec: dict) -> str:
    """The caption of a spec, by its tag's template (table in the module docstring)."""
    tag, inc = spec["tag"], spec["include"]
    if tag == "single_object":
        return f"a photo of {noun(inc[0]['class'])}"
    if tag == "two_object":
        return f"a photo of {noun(inc[0]['class'])} and {noun(inc[1]['class'])}"
    if tag == "counting":
        return f"a photo of {NUMBERS[inc[0]['count']]} {PLURALS[inc[0]['class']]}"
    if tag == "colors":
        return f"a photo of {noun(inc[0]['class'], inc[0]['color'])}"
    if tag == "position":
        target, subject = inc
        return f"a photo of {noun(subject['class'], subject['color'])} {subject['position'][0]} {noun(target['class'], target['color'])}"
    if tag == "color_attr":
        return f"a photo of {noun(inc[0]['class'], inc[0]['color'])} and {noun(inc[1]['class'], inc[1]['color'])}"
    raise ValueError(f"unknown tag {tag!r}: expected one of {', '.join(TAGS)}")


def every_spec() -> list[dict]:
    """Every spec the grammar can draw (the metadata of every caption it can write), in a fixed order."""
    specs = [{"tag": "single_object", "include": [{"class": s, "count": 1}]} for s in SHAPES]
    specs += [{"tag": "two_object", "include": [{"class": a, "count": 1}, {"class": b, "count": 1}]} for a, b in permutations(SHAPES, 2)]
    specs += [{"tag": "counting", "include": [{"class": s, "count": n}], "exclude": [{"class": s, "count": n + 1}]} for s in SHAPES for n in COUNTS]
    specs += [{"tag": "colors", "include": [{"class": s, "count": 1, "color": c}]} for s in SHAPES for c in COLORS]
    for (a, b), (ca, cb) in product(permutations(SHAPES, 2), permutations(COLORS, 2)):
        pair = [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
        specs.append({"tag": "color_attr", "include": pair})
        specs += [{"tag": "position", "include": [pair[0], {**pair[1], "position": [rel, 0]}]} for rel in RELATIONS]
    return specs


@cache
def _spec_by_caption() -> dict[str, dict]:
    return {caption_of(spec): spec for spec in every_spec()}


def spec_of_caption(caption: str) -> dict | None:
    """The spec a caption of the grammar states (its inverse of ``caption_of``), or None for a caption the
    world cannot write: a metric reads what to check from the prompt alone."""
    spec = _spec_by_caption().get(" ".join(caption.strip().split()))
    return copy.deepcopy(spec) if spec is not None else None


def random_spec(tag: str, rng: np.random.Generator) -> dict:
    """A spec of the given tag, its classes, colors, count and relation drawn from ``rng``."""
    def pick(options, k=1):
        return [options[i] for i in rng.choice(len(options), size=k, replace=False)]

    if tag == "single_object":
        include = [{"class": pick(SHAPES)[0], "count": 1}]
    elif tag == "two_object":
        include = [{"class": c, "count": 1} for c in pick(SHAPES, 2)]
    elif tag == "counting":
        cls, n = pick(SHAPES)[0], int(rng.choice(COUNTS))
        return {"tag": tag, "include": [{"class": cls, "count": n}], "exclude": [{"class": cls, "count": n + 1}]}
    elif tag == "colors":
        include = [{"class": pick(SHAPES)[0], "count": 1, "color": pick(COLORS)[0]}]
    elif tag in ("position", "color_attr"):
        include = [{"class": s, "count": 1, "color": c} for s, c in zip(pick(SHAPES, 2), pick(COLORS, 2))]
        if tag == "position":
            include[1]["position"] = [pick(RELATIONS)[0], 0]
    else:
        raise ValueError(f"unknown tag {tag!r}: expected one of {', '.join(TAGS)}")
    return {"tag": tag, "include": include}


def _holds_firmly(objects, spec) -> bool:
    """The spec holds with room to spare: positions also under a stricter rule (threshold 0.15,
    cut 0.6), so a render off by a pixel is judged the same."""
    if not judge(objects, spec):
        return False
    for i, req in enumerate(spec["include"]):
        if "position" in req:
            relation, target = req["position"]
            if relation not in relations(objects[i].bbox, objects[target].bbox, POSITION_THRESHOLD + 0.05, 0.6):
                return False
    return True


def layout(spec: dict, rng: np.random.Generator, tries: int = 500) -> tuple[Obj, ...]:
    """Objects that satisfy ``spec`` (one per included count, free colors drawn at random), placed
    without overlap; ``objects[i]`` is the first object of ``include[i]``, in order."""
    wanted = []
    for req in spec["include"]:
        for _ in range(req["count"]):
            wanted.append((req["class"], req.get("color") or COLORS[int(rng.integers(len(COLORS)))]))
    for attempt in range(tries):
        small_only = attempt >= tries // 2 or len(wanted) == 4  # crowded scenes fit with small objects
        objects = []
        for shape, color in wanted:
            word = "small" if small_only else ("small", "large")[int(rng.integers(2))]
            lo, hi = SIZES[word]
            size = float(rng.uniform(lo, hi))
            for _ in range(50):
                x, y = rng.uniform(BORDER + size / 2, 1 - BORDER - size / 2, size=2)
                obj = Obj(shape, color, round(size, 4), round(float(x), 4), round(float(y), 4))
                if all(_apart(obj, o) for o in objects):
                    objects.append(obj)
                    break
            else:
                break
        if len(objects) == len(wanted) and _holds_firmly(objects, spec):
            return tuple(objects)
    raise RuntimeError(f"no layout found for {spec} in {tries} tries")


def _apart(a: Obj, b: Obj) -> bool:
    ax0, ay0, ax1, ay1 = a.bbox
    bx0, by0, bx1, by1 = b.bbox
    return ax1 + GAP <= bx0 or bx1 + GAP <= ax0 or ay1 + GAP <= by0 or by1 + GAP <= ay0


def make_scene(tag: str, seed: int, index: int) -> Scene:
    """Scene ``index`` of ``tag`` for ``seed``: a pure function of the three."""
    rng = np.random.default_rng([int(seed), TAGS.index(tag), int(index)])
    spec = random_spec(tag, rng)
    return Scene(layout(spec, rng), caption_of(spec), tag, spec)


def make_prompts(n_per_tag: int, seed: int = 0, tags=TAGS) -> list[Scene]:
    """``n_per_tag`` scenes of each tag, tag by tag in ``TAGS`` order: a pure function of the seed."""
    return [make_scene(tag, seed, i) for tag in tags for i in range(n_per_tag)]


def write_prompt_file(path, n_per_tag: int = 50, seed: int = 0, scenes=None) -> Path:
    """Write the caption set (``scenes``, or ``make_prompts(n_per_tag, seed)``) as ``.jsonl`` or
    ``.csv`` (by the suffix) with the columns ``prompt``, ``tag`` and ``spec`` (JSON text), for a
    suite with ``prompt_column: prompt`` and ``group_columns: [tag]``."""
    path = Path(path)
    rows = [s.row() for s in (scenes if scenes is not None else make_prompts(n_per_tag, seed))]
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix.lower() == ".csv":
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["prompt", "tag", "spec"])
            writer.writeheader()
            writer.writerows(rows)
    else:
        raise ValueError(f"write_prompt_file: use a .jsonl or .csv path, not {path}")
    return path


def read_specs(rows) -> list[dict]:
    """The specs of prompt-file rows (``spec`` as JSON text or a dict)."""
    return [json.loads(r["spec"]) if isinstance(r["spec"], str) else r["spec"] for r in rows]
