"""Rasterise scenes into RGB images with exact per-object masks.

Shapes are drawn with PIL at 4x supersampling and box-downsampled, so an image looks the
same at every resolution (48 px for toy models, 336 px for real ones) up to detail.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from mmscope.world.scene import COLORS, SLOTS, STYLES, Scene, WorldObject

SUPERSAMPLE = 4
EXTENTS: dict[str, float] = {"small": 0.48, "large": 0.78}
"""Object extent as a fraction of the quadrant side, per size."""


@dataclass(frozen=True, eq=False)
class Rendered:
    """A rendered scene.

    Attributes:
        image: RGB image of ``size x size`` pixels.
        masks: Bool array ``(n_objects, size, size)``, in the order of ``scene.objects``.
    """

    image: Image.Image
    masks: np.ndarray


def _background(style: str, seed: int, size: int) -> np.ndarray:
    """Float RGB background ``(size, size, 3)``, deterministic per style, seed and size."""
    rng = np.random.default_rng([seed, size, STYLES.index(style)])
    coords = (np.arange(size, dtype=np.float64) + 0.5) / size
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    if style == "plain":
        grey = np.full((size, size), 200.0)
    elif style == "noisy":
        grey = 200.0 + rng.normal(0.0, 6.0, (size, size))
        for _ in range(2):
            fx, fy = rng.uniform(0.4, 1.5, size=2)
            phase = rng.uniform(0.0, 2 * math.pi)
            grey += 4.0 * np.sin(2 * math.pi * (fx * xx + fy * yy) + phase)
    elif style == "striped":
        phase = rng.uniform(0.0, 2 * math.pi)
        wave = np.sin(2 * math.pi * 6.0 * (xx + yy) + phase)
        grey = 200.0 + 8.0 * np.clip(2.5 * wave, -1.0, 1.0)
    elif style == "dark":
        grey = 55.0 + rng.normal(0.0, 6.0, (size, size))
    else:
        raise ValueError(f"unknown style {style!r}")
    return np.repeat(grey[:, :, None], 3, axis=2)


def object_box(obj: WorldObject, size: int) -> tuple[float, float, float]:
    """Centre x, centre y and half extent of an object, in output pixel units."""
    quad = size / 2
    col, row = SLOTS.index(obj.slot) % 2, SLOTS.index(obj.slot) // 2
    extent = EXTENTS[obj.size] * quad
    margin = (quad - extent) / 2
    cx = col * quad + quad / 2 + obj.dx * margin
    cy = row * quad + quad / 2 + obj.dy * margin
    return cx, cy, extent / 2


def _px(lo: float, hi: float) -> tuple[int, int]:
    """Inclusive pixel range whose centres fall in ``[lo, hi)``."""
    return math.floor(lo + 0.5), math.floor(hi + 0.5) - 1


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, h: float) -> None:
    """Fill a circle, square or cross with value 255 on a supersampled canvas."""
    x0, x1 = _px(cx - h, cx + h)
    y0, y1 = _px(cy - h, cy + h)
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        draw.rectangle([x0, y0, x1, y1], fill=255)
    elif shape == "cross":
        t = h / 3  # half arm thickness: the arm is 1/3 of the extent
        tx0, tx1 = _px(cx - t, cx + t)
        ty0, ty1 = _px(cy - t, cy + t)
        draw.rectangle([x0, ty0, x1, ty1], fill=255)
        draw.rectangle([tx0, y0, tx1, y1], fill=255)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def _triangle(big: int, cx: float, cy: float, h: float) -> np.ndarray:
    """Upward triangle by exact pixel-centre sampling (PIL's polygon fill leans left)."""
    c = np.arange(big, dtype=np.float64) + 0.5
    ys, xs = c[:, None], c[None, :]
    top = cy - h
    inside = (ys >= top) & (ys < cy + h) & (np.abs(xs - cx) < (ys - top) / 2)
    return np.where(inside, 255, 0).astype(np.uint8)


def object_alpha(obj: WorldObject, size: int) -> np.ndarray:
    """Anti-aliased coverage of one object in [0, 1], shape ``(size, size)``."""
    big = size * SUPERSAMPLE
    cx, cy, h = (v * SUPERSAMPLE for v in object_box(obj, size))
    if obj.shape == "triangle":
        drawn = _triangle(big, cx, cy, h)
    else:
        canvas = Image.new("L", (big, big), 0)
        _draw_shape(ImageDraw.Draw(canvas), obj.shape, cx, cy, h)
        drawn = np.asarray(canvas)
    # Clip to the quadrant so rounding can never leak into a neighbour.
    quad = big // 2
    col, row = SLOTS.index(obj.slot) % 2, SLOTS.index(obj.slot) // 2
    arr = np.zeros((big, big), dtype=np.uint8)
    ys, xs = slice(row * quad, (row + 1) * quad), slice(col * quad, (col + 1) * quad)
    arr[ys, xs] = drawn[ys, xs]
    small = Image.fromarray(arr).resize((size, size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.float64) / 255.0


def render(scene: Scene, size: int = 48) -> Rendered:
    """Render a scene.

    Args:
        scene: The scene to draw.
        size: Side of the square output image in pixels.

    Returns:
        The RGB image and one boolean mask per object (alpha > 0.5).
    """
    if size < 2:
        raise ValueError("size must be at least 2")
    img = _background(scene.style, scene.texture_seed, size)
    masks = np.zeros((len(scene.objects), size, size), dtype=bool)
    for i, obj in enumerate(scene.objects):
        alpha = object_alpha(obj, size)[:, :, None]
        img = img * (1.0 - alpha) + np.asarray(COLORS[obj.color], dtype=np.float64) * alpha
        masks[i] = alpha[:, :, 0] > 0.5
    rgb = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return Rendered(image=Image.fromarray(rgb), masks=masks)
