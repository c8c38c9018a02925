"""Tests for image- and patch-level concept labels."""

from __future__ import annotations

import numpy as np

from mmscope.world import (
    Rendered,
    Scene,
    WorldObject,
    image_concepts,
    patch_concepts,
    patch_objects,
    render,
)

SCENE = Scene(
    (
        WorldObject("square", "red", "large", "bottom right"),
        WorldObject("circle", "blue", "large", "top left"),
    ),
    style="plain",
)


def test_image_concepts() -> None:
    assert image_concepts(SCENE) == frozenset(
        {"red", "blue", "square", "circle", "red square", "blue circle", "large", "plain"}
    )


def test_patch_objects_on_hand_made_scene() -> None:
    r = render(SCENE, 48)
    grid = patch_objects(r, (2, 2))
    assert grid.dtype.kind == "i"
    assert grid.tolist() == [[1, -1], [-1, 0]]
    fine = patch_objects(r, (4, 4))
    # Each large object covers the four central cells of its quadrant's 2x2 block.
    expected = np.full((4, 4), -1)
    expected[0:2, 0:2] = 1
    expected[2:4, 2:4] = 0
    assert np.array_equal(fine, expected)
    # Every 6x6-pixel patch in the middle of the square is fully covered.
    assert patch_objects(r, (8, 8))[5:7, 5:7].tolist() == [[0, 0], [0, 0]]


def test_min_cover_and_largest_share() -> None:
    masks = np.zeros((2, 4, 4), dtype=bool)
    masks[0, 0, 0] = True  # 1/4 of the top-left 2x2 patch
    masks[1, 0:2, 1] = True  # 2/4 of the same patch
    masks[1, 3, 3] = True
    r = Rendered(image=render(Scene(()), 4).image, masks=masks)
    assert patch_objects(r, (2, 2)).tolist() == [[1, -1], [-1, 1]]
    assert patch_objects(r, (2, 2), min_cover=0.3).tolist() == [[1, -1], [-1, -1]]
    assert patch_objects(r, (2, 2), min_cover=0.6).tolist() == [[-1, -1], [-1, -1]]
    empty = Rendered(image=render(Scene(()), 4).image, masks=np.zeros((0, 4, 4), bool))
    assert patch_objects(empty, (2, 2)).tolist() == [[-1, -1], [-1, -1]]


def test_patch_concepts() -> None:
    r = render(SCENE, 48)
    labels = patch_concepts(SCENE, r, (2, 2))
    assert labels[0][0] == frozenset({"blue", "circle", "blue circle", "large"})
    assert labels[1][1] == frozenset({"red", "square", "red square", "large"})
    assert labels[0][1] == labels[1][0] == frozenset({"background"})
    assert len(patch_concepts(SCENE, r, (3, 5))) == 3
    assert all(len(row) == 5 for row in patch_concepts(SCENE, r, (3, 5)))
