"""The exact evaluator of the micro world: detect the objects of an image, score it against a spec
as GenEval does, and measure how that holds up on degraded renders.

Detection (``detect``), for an RGB image of any size on a neutral background:

0. **Noise**: when the median difference of horizontal neighbours estimates a noise sigma above
   ``NOISY`` (3; a clean, blurred or JPEG render gives 0), a 3x3 median filter goes first.
1. **Foreground** is every pixel at least ``DISTANCE`` (80, RGB distance on the 0-255 scale) from
   the background, taken as the image's median color: every palette color lies 200 or more from
   the world's gray, so an edge pixel half covered by an object (blurred, anti-aliased) stays in.
   An image whose pixels lie within half that distance of its median color on less than
   ``BACKGROUND_SHARE`` (half) of it has no plain background: it is no scene of the world (four large
   objects leave most of a render bare), and nothing is detected in it. Without this gate every blob
   of a tiny model's colored noise was read as some shape (a noise image "showed a circle").
2. **Objects** are its 4-connected components (``scipy.ndimage.label``) of at least ``min_area``
   pixels (0.4% of the image, 16 px at 64x64: noise specks go), holes filled.
3. **Color**: each pixel votes, weighted by its chroma, for the palette color nearest in hue
   (hue does not move when a color is mixed with gray); the component takes the majority.
4. **Shape** from simple geometry: ``skew``, the offset of the centroid below the box center as a
   fraction of the box height (an upright triangle 1/6, circle and square 0), and ``fill``, the
   area over the bounding box's (triangle 0.5, circle pi/4, square 1): a skew above 0.08 or a fill
   below 0.62 is a triangle. Otherwise ``diagonal``, the extent along the two diagonals over the
   extent along the axes (square sqrt(2), disc about 1), decides: 1.2 or more is a square.

Scoring (``score``) applies ``bench.world.scene.judge`` to the detections: GenEval's rules (each
``include`` entry needs ``count`` objects of its class and color, ``exclude`` caps a count, for
``counting`` exactly N) with GenEval's position rule on the detected boxes: the offset of box
centers, each axis shrunk by 0.1 of the two boxes' summed extent, normalised by the raw offset's
length; "left of" when its x is below -0.5 (likewise right of, above, below). ``evaluate`` gives the
accuracy per tag and, as GenEval's overall score, their unweighted mean.

``python -m bench.world --table`` prints the accuracy on clean renders and under Gaussian
noise, Gaussian blur and JPEG (``degradation_table``); ``docs/world.md`` holds the measured table.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from bench.world.scene import PALETTE, TAGS, judge, make_prompts

DISTANCE = 80.0
NOISY = 3.0
MIN_AREA_FRACTION = 0.004
SKEW_TRIANGLE = 0.08
FILL_TRIANGLE = 0.62
DIAGONAL_SQUARE = 1.2
BACKGROUND_SHARE = 0.5  # a render's plain background covers most of it (4 large objects leave well over half)


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of float RGB ``(..., 3)`` (0 where the chroma is 0)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    mx, mn = rgb.max(-1), rgb.min(-1)
    c = np.where(mx > mn, mx - mn, 1.0)
    h = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4))
    return (h * 60.0) % 360.0


PALETTE_NAMES = tuple(PALETTE)
PALETTE_HUES = _hue(np.array([PALETTE[c] for c in PALETTE_NAMES], float))


@dataclass(frozen=True)
class Detection:
    """One detected object: ``shape`` and ``color`` as in the scene grammar, ``bbox`` (x0, y0, x1, y1)
    in pixels (x1, y1 exclusive), its ``area`` in pixels and the geometry its shape was read from."""

    shape: str
    color: str
    bbox: tuple[int, int, int, int]
    area: int
    fill: float
    skew: float
    diagonal: float

    @property
    def center(self) -> tuple[float, float]:
        return ((self.bbox[0] + self.bbox[2]) / 2, (self.bbox[1] + self.bbox[3]) / 2)


def as_array(image) -> np.ndarray:
    """A float ``(H, W, 3)`` array of a PIL image or an array (uint8 0-255, or float in [0, 1])."""
    a = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    a = a[..., :3].astype(np.float64)
    if a.size and a.max() <= 1.0 and np.asarray(image).dtype.kind == "f":
        a = a * 255.0
    return a


def diagonal_extent(rows: np.ndarray, cols: np.ndarray) -> float:
    """The extent of the pixels along the two diagonals over their extent along the axes (pixel
    squares counted whole): sqrt(2) for an axis-aligned square, about 1 for a disc and 1.06 for an
    upright triangle; blurring a square rounds its corners but keeps it well above 1.2."""
    p, q = (cols + rows) / np.sqrt(2), (cols - rows) / np.sqrt(2)
    diag = (p.max() - p.min() + q.max() - q.min()) / 2 + np.sqrt(2)
    return float(diag / ((cols.max() - cols.min() + rows.max() - rows.min()) / 2 + 1))


def shape_of(fill: float, skew: float, diagonal: float) -> str:
    if skew > SKEW_TRIANGLE or fill < FILL_TRIANGLE:
        return "triangle"
    return "square" if diagonal >= DIAGONAL_SQUARE else "circle"


def noise_level(a: np.ndarray) -> float:
    """A robust estimate of the sigma of pixel noise: the median absolute difference of horizontal
    neighbours over 0.6745 * sqrt(2) (0 on a clean render, whose neighbours are mostly equal)."""
    return float(np.median(np.abs(np.diff(a, axis=1))) / (0.6745 * np.sqrt(2))) if a.shape[1] > 1 else 0.0


def detect(image, min_area: int | None = None, distance: float = DISTANCE, denoise: bool = True) -> list[Detection]:
    """The objects of an image, largest first (steps in the module docstring)."""
    a = as_array(image)
    h, w = a.shape[:2]
    if denoise and noise_level(a) > NOISY:
        a = ndimage.median_filter(a, size=(3, 3, 1), mode="nearest")
    sat = a.max(-1) - a.min(-1)
    background = np.median(a.reshape(-1, 3), axis=0)
    apart = np.linalg.norm(a - background, axis=-1)
    if (apart < distance / 2).mean() < BACKGROUND_SHARE:
        return []  # no plain background: not a scene of the world (a tiny model's colored noise), so no object in it
    labels, n = ndimage.label(apart >= distance)
    if n == 0:
        return []
    min_area = max(4, round(MIN_AREA_FRACTION * h * w)) if min_area is None else min_area
    hue = _hue(a)
    dist = np.abs(hue[..., None] - PALETTE_HUES)
    nearest = np.minimum(dist, 360 - dist).argmin(-1)
    found = []
    for k, sl in enumerate(ndimage.find_objects(labels), 1):
        own = labels[sl] == k
        if own.sum() < min_area:
            continue
        votes = np.bincount(nearest[sl][own], weights=sat[sl][own], minlength=len(PALETTE_NAMES))
        mask = ndimage.binary_fill_holes(own)
        rows, cols = np.nonzero(mask)
        y0, y1, x0, x1 = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
        bh, bw = y1 - y0, x1 - x0
        area = int(mask.sum())
        fill = area / float(bh * bw)
        skew = float((rows.mean() + 0.5 - (y0 + y1) / 2) / bh)
        box = (int(sl[1].start + x0), int(sl[0].start + y0), int(sl[1].start + x1), int(sl[0].start + y1))
        diagonal = diagonal_extent(rows, cols)
        found.append(Detection(shape_of(fill, skew, diagonal), PALETTE_NAMES[int(votes.argmax())], box, area, round(fill, 4), round(skew, 4), round(diagonal, 4)))
    return sorted(found, key=lambda d: -d.area)


def score(image, spec) -> bool:
    """Whether an image satisfies a spec (a dict, or its JSON text), judged on its detections."""
    spec = json.loads(spec) if isinstance(spec, str) else spec
    return judge(detect(image), spec)


def evaluate(images, specs) -> dict:
    """GenEval's summary of images scored against their specs: ``per_tag`` accuracy (tags in
    ``TAGS`` order, those present), ``overall`` (the unweighted mean of the tags' accuracies, as
    GenEval reports), ``n`` images per tag and ``correct``, each image's verdict."""
    specs = [json.loads(s) if isinstance(s, str) else s for s in specs]
    correct = [score(img, spec) for img, spec in zip(images, specs, strict=True)]
    per_tag, n = {}, {}
    for tag in list(TAGS) + sorted({s["tag"] for s in specs} - set(TAGS)):
        verdicts = [c for c, s in zip(correct, specs) if s["tag"] == tag]
        if verdicts:
            per_tag[tag], n[tag] = float(np.mean(verdicts)), len(verdicts)
    return {"per_tag": per_tag, "overall": float(np.mean(list(per_tag.values()))) if per_tag else float("nan"), "n": n, "correct": correct}


# --- degradations ------------------------------------------------------------------------------

DEGRADATIONS = (("clean", None), ("noise", 10), ("noise", 25), ("noise", 50), ("blur", 0.5), ("blur", 1), ("blur", 2), ("jpeg", 50), ("jpeg", 20))


def degrade(image: np.ndarray, kind: str, level=None, rng: np.random.Generator | None = None) -> np.ndarray:
    """``image`` (uint8 HxWx3) with Gaussian ``noise`` of sigma ``level`` (0-255 scale, clipped),
    Gaussian ``blur`` of sigma ``level`` pixels, or ``jpeg`` at quality ``level``; ``clean``: unchanged."""
    if kind == "clean":
        return image
    if kind == "noise":
        rng = rng if rng is not None else np.random.default_rng(0)
        return np.clip(np.rint(image + rng.normal(0.0, float(level), image.shape)), 0, 255).astype(np.uint8)
    if kind == "blur":
        out = ndimage.gaussian_filter(image.astype(np.float64), sigma=(float(level), float(level), 0), mode="nearest")
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if kind == "jpeg":
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=int(level))
        return np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"))
    raise ValueError(f"unknown degradation {kind!r}: expected clean, noise, blur or jpeg")


def degradation_label(kind: str, level) -> str:
    return {"clean": "clean", "noise": f"noise sigma {level}", "blur": f"blur sigma {level} px", "jpeg": f"JPEG quality {level}"}[kind]


def degradation_table(seed: int = 0, n_per_tag: int = 100, res: int = 64, aa: int = 1, degradations=DEGRADATIONS) -> tuple[list[dict], str]:
    """The evaluator's accuracy on ``n_per_tag`` renders per tag (``make_prompts(n_per_tag, seed)``)
    under each degradation (noise drawn from ``default_rng([seed, i])`` for scene i): the rows
    (``degradation``, one column per tag, ``overall``) and the markdown table."""
    scenes = make_prompts(n_per_tag, seed)
    clean = [s.render(res, aa) for s in scenes]
    specs = [s.spec for s in scenes]
    rows = []
    for kind, level in degradations:
        images = [degrade(img, kind, level, np.random.default_rng([seed, i])) for i, img in enumerate(clean)]
        result = evaluate(images, specs)
        rows.append({"degradation": degradation_label(kind, level), **result["per_tag"], "overall": result["overall"]})
    header = ["degradation", *TAGS, "overall"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join([r["degradation"]] + [f"{r[t]:.3f}" for t in header[1:]]) + " |" for r in rows]
    return rows, "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.world", description="The micro world's evaluator: its accuracy on clean and degraded renders.")
    parser.add_argument("--table", action="store_true", help="print the degradation table (markdown)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=100, help="scenes per tag")
    parser.add_argument("--res", type=int, default=64)
    parser.add_argument("--aa", type=int, default=1, help="render with k x k supersampling (anti-aliased edges)")
    args = parser.parse_args(argv)
    if not args.table:
        parser.print_help()
        return 2
    start = time.perf_counter()
    _, text = degradation_table(args.seed, args.n, args.res, args.aa)
    print(f"{args.n} scenes per tag ({args.n * len(TAGS)} in all), seed {args.seed}, {args.res} px, aa {args.aa}\n")
    print(text)
    print(f"\n({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
