"""The world's truth about dataset items, for labelling units with concepts: the scene behind
each item, the concepts of each image-token row, the kind of a concept."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from mmscope.core.errors import InputError
from mmscope.methods.activations import Activations
from mmscope.world import COLORS, SHAPES, SIZES, STYLES, patch_concepts, render
from mmscope.world.concepts import BACKGROUND

if TYPE_CHECKING:
    from mmscope.world import Scene
    from mmscope.world.items import BenchItem


def patch_concept_matrix(
    acts: Activations,
    items: Sequence[BenchItem],
    scenes: Sequence[Scene],
    min_cover: float,
    background: bool = True,
) -> tuple[list[str], np.ndarray]:
    """Concept names and a bool ``(rows, concepts)`` matrix: row ``r`` (an image-token row of
    ``acts``) holds concept ``c`` when ``c`` is among its patch's ``world.patch_concepts``
    (``"background"`` only when ``background``)."""
    if len(acts.values) == 0 or np.any(acts.patch < 0):
        raise InputError("patch concepts need image-token rows")
    cache: dict[int, list[frozenset[str]]] = {}
    per_row = []
    for item, patch in zip(acts.item.tolist(), acts.patch.tolist()):
        if item not in cache:
            image = items[item].image
            rendered = render(scenes[item], image.size[0])
            grid = patch_concepts(scenes[item], rendered, acts.grid[item], min_cover)
            cache[item] = [c for row in grid for c in row]
        per_row.append(cache[item][patch])
    names = sorted(set().union(*per_row) - (set() if background else {BACKGROUND}))
    index = {n: j for j, n in enumerate(names)}
    matrix = np.zeros((len(per_row), len(names)), dtype=bool)
    for r, concepts in enumerate(per_row):
        matrix[r, [index[c] for c in concepts if c in index]] = True
    return names, matrix


def concept_kind(name: str) -> str:
    """``color``, ``shape``, ``size``, ``style``, ``background`` or ``object`` ("color
    shape")."""
    if name in COLORS:
        return "color"
    if name in SHAPES:
        return "shape"
    if name in SIZES:
        return "size"
    if name in STYLES:
        return "style"
    return "background" if name == BACKGROUND else "object"


def kinds_summary(labels: Sequence[str]) -> dict[str, float]:
    """Share of labels per concept kind."""
    kinds = [concept_kind(lab) for lab in labels]
    order = ("color", "shape", "object", "size", "style", "background")
    return {k: (kinds.count(k) / len(kinds) if kinds else 0.0) for k in order}
