"""Weight-free metrics against hand-computed values and PIL's own JPEG encoder."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from bench.metrics import BUILTIN_METRICS
from bench.metrics.weightfree import Brightness, Colorfulness, Contrast, JpegCompressibility
from bench.registry import METRICS

ALL = [Brightness, Contrast, Colorfulness, JpegCompressibility]


def from_pixels(rows):
    """A (1, 3, H, W) float32 image from nested lists of 0-255 (R, G, B) tuples."""
    arr = np.asarray(rows, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).float() / 255


def flat(value, h=8, w=8):
    return torch.full((1, 3, h, w), value, dtype=torch.float32)


def colorfulness_by_hand(pixels):
    """Hasler-Suesstrunk in plain Python over a flat list of 0-255 (R, G, B) tuples."""
    rg = [r - g for r, g, b in pixels]
    yb = [0.5 * (r + g) - b for r, g, b in pixels]

    def mean(v):
        return sum(v) / len(v)

    def pstd(v):
        m = mean(v)
        return math.sqrt(sum((x - m) ** 2 for x in v) / len(v))

    return math.sqrt(pstd(rg) ** 2 + pstd(yb) ** 2) + 0.3 * math.sqrt(mean(rg) ** 2 + mean(yb) ** 2)


# ---- registry and contract -------------------------------------------------


@pytest.mark.parametrize("cls", ALL)
def test_resolves_through_registry(cls):
    assert METRICS.get(cls.info.name) is cls
    assert cls.info.name in BUILTIN_METRICS
    assert cls.info.version == "1" and cls.info.higher_is_better is True and cls.info.scale


@pytest.mark.parametrize("cls", ALL)
def test_returns_float64_per_image(cls):
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    out = cls().score(images, ["a", "b", "c"])
    assert out.dtype == torch.float64 and out.shape == (3,)


@pytest.mark.parametrize("cls", ALL)
def test_batch_equals_per_image(cls):
    g = torch.Generator().manual_seed(1)
    images = (torch.randint(0, 256, (4, 3, 16, 16), generator=g).float() / 255)
    images[1] = 0.5  # mix a flat image into the batch
    metric = cls()
    batch = metric.score(images, ["p"] * 4)
    single = torch.cat([metric.score(images[i : i + 1], ["p"]) for i in range(4)])
    torch.testing.assert_close(batch, single, rtol=0, atol=1e-12)


# ---- brightness / contrast --------------------------------------------------


def test_brightness_white_black_and_luma_weights():
    b = Brightness()
    assert b.score(flat(1.0), ["x"]).item() == pytest.approx(1.0, abs=1e-12)
    assert b.score(flat(0.0), ["x"]).item() == 0.0
    # pure red, green, blue, white: (0.299 + 0.587 + 0.114 + 1) / 4 = 0.5
    img = from_pixels([[(255, 0, 0), (0, 255, 0)], [(0, 0, 255), (255, 255, 255)]])
    assert b.score(img, ["x"]).item() == pytest.approx(0.5, abs=1e-9)
    red = from_pixels([[(255, 0, 0)]])
    assert b.score(red, ["x"]).item() == pytest.approx(0.299, abs=1e-9)


def test_contrast_values():
    c = Contrast()
    assert c.score(flat(0.5), ["x"]).item() == pytest.approx(0.0, abs=1e-12)
    # half black, half white: luma 0, 0, 1, 1 -> population std 0.5 (sample std would be 0.577)
    img = from_pixels([[(0, 0, 0), (0, 0, 0)], [(255, 255, 255), (255, 255, 255)]])
    assert c.score(img, ["x"]).item() == pytest.approx(0.5, abs=1e-9)
    # pure R, G, B, white: luma 0.299, 0.587, 0.114, 1 around mean 0.5
    img = from_pixels([[(255, 0, 0), (0, 255, 0)], [(0, 0, 255), (255, 255, 255)]])
    lumas = [0.299, 0.587, 0.114, 1.0]
    expected = math.sqrt(sum((v - 0.5) ** 2 for v in lumas) / 4)
    assert c.score(img, ["x"]).item() == pytest.approx(expected, abs=1e-9)


# ---- colorfulness -----------------------------------------------------------


def test_colorfulness_flat_grey_is_zero():
    assert Colorfulness().score(flat(128 / 255), ["x"]).item() == pytest.approx(0.0, abs=1e-9)


def test_colorfulness_closed_form():
    # red, red, black, black: rg = 255,255,0,0 (mean 127.5, std 127.5);
    # yb = 127.5,127.5,0,0 (mean 63.75, std 63.75) -> sigma = mu = 63.75*sqrt(5)
    img = from_pixels([[(255, 0, 0), (255, 0, 0)], [(0, 0, 0), (0, 0, 0)]])
    expected = 1.3 * 63.75 * math.sqrt(5)  # 185.31...
    assert Colorfulness().score(img, ["x"]).item() == pytest.approx(expected, abs=1e-6)


def test_colorfulness_matches_plain_python():
    pixels = [(200, 30, 10), (12, 180, 90), (40, 60, 250), (128, 128, 0)]
    img = from_pixels([pixels[:2], pixels[2:]])
    # k/255 stored in float32 is off by ~1e-7 relative, so compare at that precision
    assert Colorfulness().score(img, ["x"]).item() == pytest.approx(colorfulness_by_hand(pixels), rel=1e-6)


# ---- jpeg compressibility ---------------------------------------------------


def test_jpeg_equals_pil_encoding_at_q95():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(24, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=95)
    expected = -len(buf.getvalue()) / 1000
    img = torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0).float() / 255
    assert JpegCompressibility().score(img, ["x"]).item() == expected


def test_smooth_image_more_compressible_than_noise():
    ramp = torch.linspace(0, 1, 64)
    smooth = ramp.view(1, 1, 1, 64).expand(1, 3, 64, 64)
    smooth = (smooth * 255).round() / 255
    noise = torch.randint(0, 256, (1, 3, 64, 64), generator=torch.Generator().manual_seed(2)).float() / 255
    s = JpegCompressibility().score(torch.cat([smooth, noise]), ["a", "b"])
    assert s[0] > s[1]
    assert (s < 0).all()  # a score is minus a size
