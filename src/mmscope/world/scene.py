"""Scenes of the synthetic ground-truth world and their seeded sampler.

A scene holds one to four coloured shapes, one per image quadrant ("slot"). The sampler
plants configurable co-occurrences (e.g. a red circle almost always comes with a blue
square) so that models trained on the data learn to hallucinate the partner object.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (150, 60, 190),
}
SIZES: tuple[str, ...] = ("small", "large")
SLOTS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
STYLES: tuple[str, ...] = ("noisy", "plain", "striped", "dark")

Combo = tuple[str, str]
"""A (color, shape) pair."""

_DEFAULT_COOCCURRENCE: tuple[tuple[Combo, Combo], ...] = (
    (("red", "circle"), ("blue", "square")),
    (("green", "triangle"), ("yellow", "cross")),
)


def all_combos() -> list[Combo]:
    """Return every (color, shape) pair in canonical order (colours outer, shapes inner)."""
    return [(c, s) for c in COLORS for s in SHAPES]


@dataclass(frozen=True)
class WorldObject:
    """One coloured shape placed in a quadrant.

    Attributes:
        shape: One of ``SHAPES``.
        color: One of ``COLORS``.
        size: One of ``SIZES``.
        slot: One of ``SLOTS`` (the quadrant).
        dx: Horizontal jitter of the centre in [-1, 1] units of the free margin.
        dy: Vertical jitter of the centre in [-1, 1] units of the free margin.
    """

    shape: str
    color: str
    size: str
    slot: str
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"unknown shape {self.shape!r}")
        if self.color not in COLORS:
            raise ValueError(f"unknown color {self.color!r}")
        if self.size not in SIZES:
            raise ValueError(f"unknown size {self.size!r}")
        if self.slot not in SLOTS:
            raise ValueError(f"unknown slot {self.slot!r}")
        if not (-1.0 <= self.dx <= 1.0 and -1.0 <= self.dy <= 1.0):
            raise ValueError("jitter dx, dy must lie in [-1, 1]")

    @property
    def name(self) -> str:
        """Colour and shape, e.g. ``"red circle"``."""
        return f"{self.color} {self.shape}"

    @property
    def combo(self) -> Combo:
        """The (color, shape) pair."""
        return (self.color, self.shape)

    def to_dict(self) -> dict[str, Any]:
        """Serialise to a JSON-compatible dict."""
        return {
            "shape": self.shape,
            "color": self.color,
            "size": self.size,
            "slot": self.slot,
            "dx": float(self.dx),
            "dy": float(self.dy),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorldObject:
        """Inverse of ``to_dict``."""
        return cls(
            shape=d["shape"],
            color=d["color"],
            size=d["size"],
            slot=d["slot"],
            dx=float(d.get("dx", 0.0)),
            dy=float(d.get("dy", 0.0)),
        )


@dataclass(frozen=True)
class Scene:
    """A set of objects in distinct quadrants plus a background style.

    Attributes:
        objects: The objects; their order defines object indices (masks, evidence).
        style: Background style, one of ``STYLES``.
        texture_seed: Seed of the background texture (non-negative).
    """

    objects: tuple[WorldObject, ...]
    style: str = "noisy"
    texture_seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "objects", tuple(self.objects))
        if self.style not in STYLES:
            raise ValueError(f"unknown style {self.style!r}")
        if self.texture_seed < 0:
            raise ValueError("texture_seed must be non-negative")
        slots = [o.slot for o in self.objects]
        if len(set(slots)) != len(slots):
            raise ValueError(f"objects must occupy distinct slots, got {slots}")

    def has(self, color: str, shape: str) -> bool:
        """Whether an object with this colour and shape is present."""
        return any(o.color == color and o.shape == shape for o in self.objects)

    def to_dict(self) -> dict[str, Any]:
        """Serialise to a JSON-compatible dict."""
        return {
            "objects": [o.to_dict() for o in self.objects],
            "style": self.style,
            "texture_seed": int(self.texture_seed),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Scene:
        """Inverse of ``to_dict``."""
        return cls(
            objects=tuple(WorldObject.from_dict(o) for o in d["objects"]),
            style=d.get("style", "noisy"),
            texture_seed=int(d.get("texture_seed", 0)),
        )


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of the scene sampler.

    Attributes:
        min_objects: Fewest objects per scene (>= 0).
        max_objects: Most objects per scene (<= 4); the count is uniform in between.
        cooccurrence: Pairs of (color, shape) combos planted together.
        cooccurrence_prob: Probability that a pair member present without its partner gets
            the partner added, in both directions. The resulting P(partner | anchor) is a
            bit higher (about 0.92 at the default 0.85, 0.69 at 0.5; ~0.1 at 0) because the
            base rate adds up and planting also adds anchors.
        styles: Background styles drawn uniformly.
    """

    min_objects: int = 1
    max_objects: int = 4
    cooccurrence: tuple[tuple[Combo, Combo], ...] = _DEFAULT_COOCCURRENCE
    cooccurrence_prob: float = 0.85
    styles: tuple[str, ...] = ("noisy",)

    def __post_init__(self) -> None:
        if not 0 <= self.min_objects <= self.max_objects <= len(SLOTS):
            raise ValueError("need 0 <= min_objects <= max_objects <= 4")
        if not 0.0 <= self.cooccurrence_prob <= 1.0:
            raise ValueError("cooccurrence_prob must lie in [0, 1]")
        if not self.styles or any(s not in STYLES for s in self.styles):
            raise ValueError(f"styles must be a non-empty subset of {STYLES}")
        pairs = tuple(
            ((str(a[0]), str(a[1])), (str(b[0]), str(b[1]))) for a, b in self.cooccurrence
        )
        object.__setattr__(self, "cooccurrence", pairs)
        object.__setattr__(self, "styles", tuple(self.styles))
        valid = set(all_combos())
        for a, b in pairs:
            if a not in valid or b not in valid or a == b:
                raise ValueError(f"invalid co-occurrence pair {(a, b)!r}")


def _random_object(rng: np.random.Generator, combo: Combo, slot: str) -> WorldObject:
    size = SIZES[int(rng.integers(len(SIZES)))]
    dx, dy = (float(v) for v in rng.uniform(-1.0, 1.0, size=2))
    return WorldObject(shape=combo[1], color=combo[0], size=size, slot=slot, dx=dx, dy=dy)


def _plant(
    rng: np.random.Generator,
    objs: list[WorldObject],
    pair: tuple[Combo, Combo],
    all_pairs: set[Combo],
    prob: float,
) -> None:
    """Add the missing member of ``pair`` with probability ``prob`` (in place, both ways)."""
    a, b = pair
    for anchor, partner in ((a, b), (b, a)):
        combos = {o.combo for o in objs}
        if anchor not in combos or partner in combos:
            continue
        if rng.random() >= prob:
            continue
        used = {o.slot for o in objs}
        free = [s for s in SLOTS if s not in used]
        if free:
            slot = free[int(rng.integers(len(free)))]
            objs.append(_random_object(rng, partner, slot))
            continue
        others = [i for i, o in enumerate(objs) if o.combo not in (a, b)]
        # Prefer evicting objects outside every planted pair, to keep other pairs intact.
        preferred = [i for i in others if objs[i].combo not in all_pairs]
        pool = preferred or others
        if not pool:
            continue
        i = pool[int(rng.integers(len(pool)))]
        objs[i] = _random_object(rng, partner, objs[i].slot)


def sample_scene(rng: np.random.Generator, config: WorldConfig = WorldConfig()) -> Scene:
    """Sample one scene.

    Args:
        rng: Source of randomness (consumed).
        config: Sampler parameters.

    Returns:
        A scene with distinct slots and distinct (color, shape) combos.
    """
    n = int(rng.integers(config.min_objects, config.max_objects + 1))
    slots = [SLOTS[int(i)] for i in rng.permutation(len(SLOTS))[:n]]
    combos = all_combos()
    picks = rng.choice(len(combos), size=n, replace=False)
    objs = [_random_object(rng, combos[int(k)], slot) for k, slot in zip(picks, slots, strict=True)]
    in_pairs = {c for pair in config.cooccurrence for c in pair}
    for pair in config.cooccurrence:
        _plant(rng, objs, pair, in_pairs, config.cooccurrence_prob)
    style = config.styles[int(rng.integers(len(config.styles)))]
    texture_seed = int(rng.integers(0, 2**31 - 1))
    return Scene(objects=tuple(objs), style=style, texture_seed=texture_seed)


def sample_scenes(n: int, seed: int, config: WorldConfig = WorldConfig()) -> list[Scene]:
    """Sample ``n`` scenes deterministically from ``seed``."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, config) for _ in range(n)]
