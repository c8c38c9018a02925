"""The items a benchmark or a study scores (``BenchItem``), and how the world makes them.

An item is an image, a prompt, the expected answer and the evidence mask; world items also
carry their scene's truth (object masks, the objects the question is about). A user's items
come from JSONL through ``mmscope.bench.load_items``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from mmscope.core.errors import InputError
from mmscope.core.validate import MAX_ITEMS, count
from mmscope.world.dataset import WorldSample, make_samples
from mmscope.world.questions import Question, unanswerable
from mmscope.world.scene import Scene
from mmscope.world.seeds import BENCH_SEED


@dataclass(frozen=True, eq=False)
class BenchItem:
    """One scored question.

    Attributes:
        image: the image.
        prompt: the question (for CLIP: the text scored against the image).
        answer: the expected answer, ``""`` where unknown (then every answer counts as right).
        mask: bool ``(height, width)`` evidence in the image's pixels, or ``None``.
        kind: the question type, where known.
        scene: the world scene the image shows (world items only): the truth that the
            neuron- and embedding-level studies score against.
        objects: bool masks ``(n_objects, height, width)`` in the order of ``scene.objects``.
        evidence: indices of the objects the question is about.
    """

    image: Image.Image
    prompt: str
    answer: str = ""
    mask: np.ndarray | None = field(default=None, repr=False)
    kind: str = ""
    scene: Scene | None = field(default=None, repr=False)
    objects: np.ndarray | None = field(default=None, repr=False)
    evidence: tuple[int, ...] = ()


def world_items(n: int, seed: int = BENCH_SEED, contrastive: bool = False) -> list[BenchItem]:
    """``n`` world items, question types in turn; for CLIP, ``"a {color} {shape}"`` of one
    object with that object's mask."""
    out = []
    for i, sample in enumerate(make_samples(count("n", n, MAX_ITEMS), seed)):
        if contrastive:
            j = i % len(sample.scene.objects)
            name = sample.scene.objects[j].name
            truth = (sample.scene, sample.masks, (j,))
            out.append(BenchItem(sample.image, f"a {name}", "", sample.masks[j], "object", *truth))
        else:
            out.append(question_item(sample, sample.questions[i % len(sample.questions)]))
    return out


def question_item(sample: WorldSample, q: Question) -> BenchItem:
    """A world sample asked ``q``, with the mask of its evidence and the scene's truth."""
    mask = np.any(sample.masks[list(q.evidence)], axis=0) if q.evidence else None
    truth = (sample.scene, sample.masks, tuple(q.evidence))
    return BenchItem(sample.image, q.text, q.answer, mask, q.type, *truth)


def item_scenes(items: Sequence[BenchItem], scenes: Sequence[Scene] | None = None) -> list[Scene]:
    """The world scene of each item: ``scenes`` when given, else the items' own
    (``world_items`` keep theirs); a user's items have none and raise ``InputError``."""
    if scenes is not None:
        if len(scenes) != len(items):
            raise InputError(f"{len(scenes)} scenes for {len(items)} items")
        return list(scenes)
    own = [it.scene for it in items]
    if any(s is None for s in own):
        raise InputError(
            "this study needs world items with known scenes (mmscope.bench.world_items, or "
            "pass scenes=): a user's images carry no concept labels"
        )
    return own  # type: ignore[return-value]


def answerability_items(n: int, seed: int = BENCH_SEED) -> list[BenchItem]:
    """``n`` world images, each asked one answerable question (types in turn) and one about
    something it does not hold (kind ``"unanswerable"``, answer ``""``)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, sample in enumerate(make_samples(count("n", n, MAX_ITEMS), seed)):
        q = sample.questions[i % len(sample.questions)]
        out.append(BenchItem(sample.image, q.text, q.answer, None, q.type))
        u = unanswerable(sample.scene, rng)
        out.append(BenchItem(sample.image, u.text, u.answer, None, u.type))
    return out
