"""Tests for rendering: masks, geometry, colours, styles and resolution consistency."""

from __future__ import annotations

import numpy as np
import pytest

from mmscope.world import (
    COLORS,
    SHAPES,
    SLOTS,
    STYLES,
    Scene,
    WorldConfig,
    WorldObject,
    render,
    sample_scenes,
)

SCENES = sample_scenes(40, seed=21, config=WorldConfig(styles=STYLES))


def _quadrant(slot: str, size: int) -> tuple[slice, slice]:
    half = size // 2
    row, col = SLOTS.index(slot) // 2, SLOTS.index(slot) % 2
    return slice(row * half, (row + 1) * half), slice(col * half, (col + 1) * half)


def _erode(mask: np.ndarray, steps: int = 1) -> np.ndarray:
    """Binary erosion with a 3x3 structuring element; outside the image counts as False."""
    out = mask
    for _ in range(steps):
        pad = np.pad(out, 1)
        h, w = out.shape
        out = np.logical_and.reduce(
            [pad[1 + i : 1 + i + h, 1 + j : 1 + j + w] for i in (-1, 0, 1) for j in (-1, 0, 1)]
        )
    return out


@pytest.mark.parametrize("size", [48, 64])
def test_masks_disjoint_inside_quadrant_and_coloured(size: int) -> None:
    for scene in SCENES:
        r = render(scene, size)
        img = np.asarray(r.image)
        assert r.image.mode == "RGB" and r.image.size == (size, size)
        assert r.masks.dtype == bool and r.masks.shape == (len(scene.objects), size, size)
        assert r.masks.sum(axis=0).max() <= 1
        for obj, mask in zip(scene.objects, r.masks, strict=True):
            assert mask.sum() > 0.02 * size * size
            inside = np.zeros_like(mask)
            inside[_quadrant(obj.slot, size)] = True
            assert not (mask & ~inside).any()
            colour = np.asarray(COLORS[obj.color])
            core = _erode(mask)
            assert core.any() and np.all(img[core] == colour)
            assert np.abs(img[mask].mean(axis=0) - colour).max() < 25


def test_rendering_is_deterministic_and_texture_depends_on_seed() -> None:
    scene = SCENES[0]
    a, b = render(scene), render(scene)
    assert a.image.tobytes() == b.image.tobytes() and np.array_equal(a.masks, b.masks)
    other = Scene(scene.objects, style="noisy", texture_seed=scene.texture_seed + 1)
    same = Scene(scene.objects, style="noisy", texture_seed=scene.texture_seed)
    assert render(other).image.tobytes() != render(same).image.tobytes()


def _block_down(mask: np.ndarray, factor: int) -> np.ndarray:
    h, w = mask.shape
    return mask.reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3)) > 0.5


def test_resolutions_agree() -> None:
    for scene in SCENES[:15]:
        small, big = render(scene, 48), render(scene, 336)
        for m48, m336 in zip(small.masks, big.masks, strict=True):
            down = _block_down(m336, 7)
            iou = (down & m48).sum() / (down | m48).sum()
            assert iou > 0.8
        plain = Scene(scene.objects, style="plain")
        img48 = np.asarray(render(plain, 48).image, dtype=float)
        img336 = np.asarray(render(plain, 336).image, dtype=float)
        down_img = img336.reshape(48, 7, 48, 7, 3).mean(axis=(1, 3))
        assert np.abs(down_img - img48).mean() < 4


@pytest.mark.parametrize(
    ("shape", "fill"),
    [("circle", np.pi / 4), ("square", 1.0), ("triangle", 0.5), ("cross", 5 / 9)],
)
@pytest.mark.parametrize(("size_name", "extent"), [("small", 0.48), ("large", 0.78)])
def test_shape_geometry(shape: str, fill: float, size_name: str, extent: float) -> None:
    size = 240
    obj = WorldObject(shape, "red", size_name, "bottom right")
    mask = render(Scene((obj,), style="plain"), size).masks[0]
    side = extent * size / 2
    assert abs(mask.sum() / side**2 - fill) < 0.04
    ys, xs = np.nonzero(mask)
    assert abs((xs.max() + 1 - xs.min()) - side) <= 2
    assert abs((ys.max() + 1 - ys.min()) - side) <= 2
    centre = 3 * size / 4
    assert abs((xs.max() + 1 + xs.min()) / 2 - centre) <= 1
    if shape == "triangle":  # pointing up: wide base at the bottom
        assert mask[ys.max()].sum() > 5 * mask[ys.min()].sum()


def test_jitter_moves_object_within_quadrant() -> None:
    size = 96
    for dx, dy in [(-1.0, -1.0), (1.0, 1.0), (1.0, -1.0)]:
        obj = WorldObject("square", "blue", "small", "top left", dx=dx, dy=dy)
        mask = render(Scene((obj,), style="plain"), size).masks[0]
        ys, xs = np.nonzero(mask)
        assert (xs.min() == 0) == (dx < 0) and (xs.max() == size // 2 - 1) == (dx > 0)
        assert (ys.min() == 0) == (dy < 0) and (ys.max() == size // 2 - 1) == (dy > 0)


def test_large_objects_are_larger() -> None:
    for shape in SHAPES:
        small = render(Scene((WorldObject(shape, "red", "small", "top left"),))).masks[0]
        large = render(Scene((WorldObject(shape, "red", "large", "top left"),))).masks[0]
        assert large.sum() > 2 * small.sum()


def test_background_styles() -> None:
    size = 64
    levels = {}
    for style in STYLES:
        img = np.asarray(render(Scene((), style=style, texture_seed=5), size).image, float)
        assert np.allclose(img[..., 0], img[..., 1]) and np.allclose(img[..., 0], img[..., 2])
        levels[style] = (img.mean(), img.std())
    assert levels["plain"][1] == 0 and abs(levels["plain"][0] - 200) < 3
    assert abs(levels["noisy"][0] - 200) < 6 and 4 < levels["noisy"][1] < 12
    assert abs(levels["dark"][0] - 55) < 3 and 4 < levels["dark"][1] < 9
    assert 2 < levels["striped"][1] < 10
    striped = np.asarray(render(Scene((), style="striped"), size).image, float)[..., 0]
    # Diagonal stripes: constant along anti-diagonals (x + y fixed), varying along rows.
    assert np.abs(striped[1:, :-1] - striped[:-1, 1:]).max() <= 1
    assert np.ptp(striped[0]) > 8


def test_odd_size_masks_stay_disjoint() -> None:
    for scene in SCENES[:10]:
        r = render(scene, 49)
        assert r.masks.shape[1:] == (49, 49) and r.masks.sum(axis=0).max() <= 1
