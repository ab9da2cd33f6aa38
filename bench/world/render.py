"""The exact renderer of the micro world: objects to a uint8 ``(res, res, 3)`` image, numpy only.

A pixel ``(row i, column j)`` covers ``[j, j+1) x [i, i+1) / res`` of the unit canvas and takes an
object's color when its center lies inside the object (``aa=1``: hard edges, every pixel either the
background or one palette color). ``aa=k`` renders at ``k * res`` and averages ``k x k`` blocks
(anti-aliased edges, still a pure function of the objects). No font, no PIL drawing: the bytes do not
depend on a library version.
"""

from __future__ import annotations

import numpy as np

from bench.world.scene import BACKGROUND, PALETTE, Obj


def coverage(obj: Obj, res: int) -> np.ndarray:
    """Boolean ``(res, res)`` mask of the pixels whose center lies inside ``obj``."""
    c = (np.arange(res) + 0.5) / res
    u, v = c[None, :], c[:, None]  # x across, y down
    h = obj.size / 2
    if obj.shape == "circle":
        return (u - obj.x) ** 2 + (v - obj.y) ** 2 <= h * h
    if obj.shape == "square":
        return (np.abs(u - obj.x) <= h) & (np.abs(v - obj.y) <= h)
    if obj.shape == "triangle":  # apex (x, y - h), base from (x - h, y + h) to (x + h, y + h)
        top = obj.y - h
        return (v >= top) & (v <= obj.y + h) & (np.abs(u - obj.x) <= (v - top) / 2)
    raise ValueError(f"unknown shape {obj.shape!r}")


def render(objects, res: int = 64, aa: int = 1) -> np.ndarray:
    """The image of ``objects`` (``Obj``), uint8 ``(res, res, 3)`` on ``BACKGROUND``."""
    big = res * int(aa)
    img = np.empty((big, big, 3), np.float64)
    img[:] = BACKGROUND
    for obj in objects:
        img[coverage(obj, big)] = PALETTE[obj.color]
    if aa > 1:
        img = img.reshape(res, aa, res, aa, 3).mean(axis=(1, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)
