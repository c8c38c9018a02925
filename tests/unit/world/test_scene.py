"""Tests for scene sampling: determinism, invariants and planted co-occurrences."""

from __future__ import annotations

import json

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
    sample_scene,
    sample_scenes,
)


def test_sampling_is_deterministic_under_seed() -> None:
    assert sample_scenes(50, seed=7) == sample_scenes(50, seed=7)
    assert sample_scenes(50, seed=7) != sample_scenes(50, seed=8)
    rng_a, rng_b = np.random.default_rng(3), np.random.default_rng(3)
    assert sample_scene(rng_a) == sample_scene(rng_b)


def test_scene_invariants() -> None:
    config = WorldConfig(styles=STYLES)
    scenes = sample_scenes(1000, seed=1, config=config)
    counts = np.bincount([len(s.objects) for s in scenes], minlength=5)
    assert counts[0] == 0 and all(c > 0 for c in counts[1:])
    for s in scenes:
        assert 1 <= len(s.objects) <= 4
        slots = [o.slot for o in s.objects]
        assert len(set(slots)) == len(slots)
        combos = [(o.color, o.shape) for o in s.objects]
        assert len(set(combos)) == len(combos)
        for o in s.objects:
            assert o.shape in SHAPES and o.color in COLORS and o.slot in SLOTS
            assert -1 <= o.dx <= 1 and -1 <= o.dy <= 1
        assert s.style in STYLES and s.texture_seed >= 0
    assert {s.style for s in scenes} == set(STYLES)


def test_object_count_roughly_uniform_without_planting() -> None:
    scenes = sample_scenes(2000, seed=2, config=WorldConfig(cooccurrence_prob=0.0))
    counts = np.bincount([len(s.objects) for s in scenes], minlength=5)[1:]
    assert np.all(np.abs(counts / 2000 - 0.25) < 0.04)


def _conditional(scenes: list[Scene], anchor: tuple[str, str], other: tuple[str, str]) -> float:
    with_anchor = [s for s in scenes if s.has(*anchor)]
    assert len(with_anchor) > 100
    return float(np.mean([s.has(*other) for s in with_anchor]))


def _predicted_conditional(p: float) -> float:
    """P(partner | anchor) when each present member adds the absent one with prob ``p``.

    Planting runs in both directions, so it also raises P(anchor); with 1-4 uniform objects
    over 20 combos: q = P(combo) = 2.5 / 20 and r = P(both) = E[n(n-1)] / (20 * 19).
    """
    q, r = 2.5 / 20, 5.0 / 380
    return (r + 2 * (q - r) * p) / (q + (q - r) * p)


@pytest.mark.parametrize("prob", [0.5, 0.85])
def test_cooccurrence_frequency_matches_config(prob: float) -> None:
    config = WorldConfig(cooccurrence_prob=prob)
    scenes = sample_scenes(2000, seed=11, config=config)
    for a, b in config.cooccurrence:
        for anchor, partner in ((a, b), (b, a)):
            measured = _conditional(scenes, anchor, partner)
            assert measured >= prob - 0.05, (anchor, partner, measured)
            assert abs(measured - _predicted_conditional(prob)) < 0.05, (anchor, partner)


def test_no_partner_excess_without_planting() -> None:
    config = WorldConfig(cooccurrence_prob=0.0)
    scenes = sample_scenes(2000, seed=12, config=config)
    combos = [(c, s) for c in COLORS for s in SHAPES]
    for a, b in config.cooccurrence:
        controls = [c for c in combos if c not in (a, b)]
        base = np.mean([_conditional(scenes, a, c) for c in controls])
        assert abs(_conditional(scenes, a, b) - base) < 0.05


def test_cooccurrence_prob_one_always_plants() -> None:
    config = WorldConfig(cooccurrence_prob=1.0)
    for s in sample_scenes(500, seed=4, config=config):
        for a, b in config.cooccurrence:
            assert s.has(*a) == s.has(*b)


def test_serialisation_round_trip_through_json() -> None:
    for s in sample_scenes(30, seed=5, config=WorldConfig(styles=STYLES)):
        assert Scene.from_dict(json.loads(json.dumps(s.to_dict()))) == s


def test_object_name_and_has() -> None:
    obj = WorldObject("circle", "red", "small", "top left")
    scene = Scene((obj,))
    assert obj.name == "red circle"
    assert scene.has("red", "circle") and not scene.has("red", "square")


def test_validation() -> None:
    with pytest.raises(ValueError):
        WorldObject("hexagon", "red", "small", "top left")
    with pytest.raises(ValueError):
        WorldObject("circle", "red", "small", "top left", dx=1.5)
    a = WorldObject("circle", "red", "small", "top left")
    b = WorldObject("square", "blue", "large", "top left")
    with pytest.raises(ValueError):
        Scene((a, b))
    with pytest.raises(ValueError):
        WorldConfig(max_objects=5)
    with pytest.raises(ValueError):
        WorldConfig(styles=("fancy",))
