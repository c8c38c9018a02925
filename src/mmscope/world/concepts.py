"""Ground-truth concept labels for whole images and for patch grids."""

from __future__ import annotations

import numpy as np

from mmscope.world.render import Rendered
from mmscope.world.scene import COLORS, SHAPES, SIZES, STYLES, Scene

BACKGROUND = "background"


def concept_vocabulary() -> list[str]:
    """Every concept ``image_concepts`` can name: colours, shapes, "color shape" names, sizes
    and styles."""
    names = [f"{c} {s}" for c in COLORS for s in SHAPES]
    return [*COLORS, *SHAPES, *names, *SIZES, *STYLES]


def image_concepts(scene: Scene) -> frozenset[str]:
    """Concepts present in the image: colours, shapes, "color shape" names, sizes, style."""
    out: set[str] = {scene.style}
    for o in scene.objects:
        out.update((o.color, o.shape, o.name, o.size))
    return frozenset(out)


def _edges(n_pixels: int, n_cells: int) -> np.ndarray:
    """Integer start offsets of ``n_cells`` near-equal cells covering ``n_pixels``."""
    return (np.arange(n_cells) * n_pixels) // n_cells


def patch_coverage(masks: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Fraction of each patch covered by each mask, shape ``(n_objects, rows, cols)``."""
    rows, cols = grid
    n, h, w = masks.shape
    if not (1 <= rows <= h and 1 <= cols <= w):
        raise ValueError(f"grid {grid} does not fit a {h}x{w} image")
    r0, c0 = _edges(h, rows), _edges(w, cols)
    sums = np.add.reduceat(masks.astype(np.int64), r0, axis=1)
    sums = np.add.reduceat(sums, c0, axis=2)
    heights = np.diff(np.append(r0, h))
    widths = np.diff(np.append(c0, w))
    return sums / (heights[:, None] * widths[None, :])


def patch_objects(rendered: Rendered, grid: tuple[int, int], min_cover: float = 0.25) -> np.ndarray:
    """Object index per patch.

    Args:
        rendered: A rendered scene.
        grid: ``(rows, cols)`` of the patch grid over the image.
        min_cover: Least share of the patch an object must cover to label it.

    Returns:
        Int array ``(rows, cols)``: the index of the object covering the largest share of the
        patch if that share is at least ``min_cover``, else -1.
    """
    cover = patch_coverage(rendered.masks, grid)
    if cover.shape[0] == 0:
        return np.full(grid, -1, dtype=np.int64)
    best = cover.argmax(axis=0)
    share = cover.max(axis=0)
    return np.where(share >= min_cover, best, -1).astype(np.int64)


def patch_concepts(
    scene: Scene, rendered: Rendered, grid: tuple[int, int], min_cover: float = 0.25
) -> list[list[frozenset[str]]]:
    """Concepts per patch: ``{color, shape, "color shape", size}`` of its object, or
    ``{"background"}``."""
    idx = patch_objects(rendered, grid, min_cover)
    labels = [frozenset((o.color, o.shape, o.name, o.size)) for o in scene.objects]
    bg = frozenset((BACKGROUND,))
    return [[labels[i] if i >= 0 else bg for i in row] for row in idx.tolist()]
