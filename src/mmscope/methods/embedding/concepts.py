"""The world's concept labels for the rows of ``Activations`` (probes, TCAV).

A user's JSONL says nothing about colours, shapes or counts, so these studies take world
items, which keep their scene (``bench.world_items``); ``bench.item_scenes`` refuses items
without one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from mmscope.core.errors import InputError
from mmscope.world import Scene, WorldObject, patch_objects
from mmscope.world.items import BenchItem, item_scenes
from mmscope.world.render import Rendered, render

#: Concepts a probe can read: an object's colour, shape and quadrant; the scene's object count.
CONCEPTS: tuple[str, ...] = ("color", "shape", "count", "position")
#: Questions about exactly one object, whose attributes label the last token.
ONE_OBJECT_QUESTIONS = frozenset({"color", "shape", "position"})


def object_masks(item: BenchItem, scene: Scene) -> np.ndarray:
    """The item's object masks (rendered from its scene where the item has none)."""
    if item.objects is not None:
        return item.objects
    return render(scene, item.image.size[0]).masks


def object_label(obj: WorldObject, concept: str) -> str:
    """An object's colour, shape or quadrant."""
    return {"color": obj.color, "shape": obj.shape, "position": obj.slot}[concept]


def patch_object_ids(
    items: Sequence[Any], grids: Sequence[tuple[int, int]], min_cover: float
) -> list[np.ndarray]:
    """Per item, the object index of each patch of its grid (row-major), -1 for background."""
    out = []
    for item, scene, grid in zip(items, item_scenes(items), grids):
        masks = object_masks(item, scene)
        out.append(patch_objects(Rendered(item.image, masks), grid, min_cover).ravel())
    return out


def row_labels(
    items: Sequence[Any],
    item: np.ndarray,
    group: np.ndarray,
    patch: np.ndarray,
    grids: Sequence[tuple[int, int]],
    concept: str,
    min_cover: float = 0.5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, position kinds and control types of activation rows.

    Kinds: ``"object"`` (an image token whose patch an object covers by at least
    ``min_cover``: label from that object; no count there), ``"last"`` (the count of objects,
    or the asked object's attribute for questions about one object) and ``"class"`` (a vision
    tower's class token: the count). Rows without a label get kind and label ``""``.

    Types (of the control tasks, Hewitt & Liang 2019) are the rows' input types that recur
    across images and hold no concept: the patch's grid index for image tokens, the prompt
    for the last token, one type for class tokens.
    """
    if concept not in CONCEPTS:
        raise InputError(f"concept {concept!r} is not one of {CONCEPTS}")
    ids = patch_object_ids(items, grids, min_cover)
    scenes = item_scenes(items)
    n = len(item)
    labels, kinds, types = (np.full(n, "", dtype=object) for _ in range(3))
    for r in range(n):
        it, scene = items[int(item[r])], scenes[int(item[r])]
        if group[r] == "image":
            obj = int(ids[int(item[r])][int(patch[r])])
            if obj >= 0 and concept != "count":
                labels[r] = object_label(scene.objects[obj], concept)
                kinds[r], types[r] = "object", f"patch {int(patch[r])}"
        elif group[r] in ("last", "class"):
            label = ""
            if concept == "count":
                label = str(len(scene.objects))
            elif group[r] == "last" and it.kind in ONE_OBJECT_QUESTIONS and it.evidence:
                label = object_label(scene.objects[it.evidence[0]], concept)
            if label:
                labels[r], kinds[r] = label, str(group[r])
                types[r] = it.prompt if group[r] == "last" else "class"
    return labels, kinds, types
