"""POPE-style object-hallucination probes (Li et al. 2023, "Evaluating Object
Hallucination in Large Vision-Language Models").

Each image gets as many "yes" questions about present objects as "no" questions about
absent ones; the absent objects are drawn at random, from the most frequent objects of the
collection ("popular"), or from the objects that co-occur most with the image's objects
("adversarial").
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmscope.world.questions import existence_text
from mmscope.world.scene import Combo, Scene, all_combos

POPE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")


@dataclass(frozen=True)
class PopeQuestion:
    """One POPE probe.

    Attributes:
        image_index: Index of the scene in the probed collection.
        object: The asked object, e.g. ``"red circle"``.
        text: The existence prompt.
        answer: ``"yes"`` or ``"no"``.
        split: One of ``POPE_SPLITS``.
    """

    image_index: int
    object: str
    text: str
    answer: str
    split: str


def _stats(scenes: Sequence[Scene]) -> tuple[Counter[Combo], Counter[tuple[Combo, Combo]]]:
    """Object frequencies and ordered pair co-occurrence counts over ``scenes``."""
    freq: Counter[Combo] = Counter()
    co: Counter[tuple[Combo, Combo]] = Counter()
    for scene in scenes:
        combos = {o.combo for o in scene.objects}
        freq.update(combos)
        co.update((a, b) for a in combos for b in combos if a != b)
    return freq, co


def _absent(
    present: set[Combo],
    k: int,
    split: str,
    rng: np.random.Generator,
    freq: Counter[Combo],
    co: Counter[tuple[Combo, Combo]],
) -> list[Combo]:
    combos = all_combos()
    absent = [c for c in combos if c not in present]
    if split == "random":
        picks = rng.choice(len(absent), size=min(k, len(absent)), replace=False)
        return [absent[int(i)] for i in picks]
    order = {c: i for i, c in enumerate(combos)}
    if split == "popular":
        ranked = sorted(absent, key=lambda c: (-freq[c], order[c]))
    else:
        ranked = sorted(
            absent,
            key=lambda c: (-sum(co[(p, c)] for p in present), -freq[c], order[c]),
        )
    return ranked[:k]


def pope_questions(
    scenes: Sequence[Scene], split: str, seed: int = 0, per_image: int = 3
) -> list[PopeQuestion]:
    """Build a balanced POPE probe set.

    Args:
        scenes: The probed images; statistics for "popular"/"adversarial" come from them.
        split: One of ``POPE_SPLITS``.
        seed: Seed for the random choices.
        per_image: At most this many "yes" probes per image, and as many "no" probes.

    Returns:
        Per image, its "yes" probes followed by its "no" probes, in image order.

    Raises:
        ValueError: Unknown split.
    """
    if split not in POPE_SPLITS:
        raise ValueError(f"unknown POPE split {split!r}; expected one of {POPE_SPLITS}")
    rng = np.random.default_rng(seed)
    freq, co = _stats(scenes)
    out: list[PopeQuestion] = []
    for idx, scene in enumerate(scenes):
        objs = scene.objects
        k = min(per_image, len(objs))
        chosen = sorted(int(i) for i in rng.choice(len(objs), size=k, replace=False))
        present = {o.combo for o in objs}
        negatives = _absent(present, k, split, rng, freq, co)
        for i in chosen:
            o = objs[i]
            out.append(PopeQuestion(idx, o.name, existence_text(o.color, o.shape), "yes", split))
        for color, shape in negatives:
            out.append(
                PopeQuestion(idx, f"{color} {shape}", existence_text(color, shape), "no", split)
            )
    return out
