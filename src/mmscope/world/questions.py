"""Templated questions, answers and captions about scenes, with evidence objects.

All text is lower case with punctuation as separate tokens, so a whitespace tokenizer
over ``vocabulary()`` covers every prompt, answer and caption.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mmscope.world.scene import COLORS, SHAPES, SLOTS, Scene, all_combos

QUESTION_TYPES: tuple[str, ...] = ("existence", "color", "shape", "count", "position")
DESCRIBE_PROMPT: str = "describe the image ."
NUMBERS: tuple[str, ...] = ("zero", "one", "two", "three", "four")

EXISTENCE_TEMPLATE = "is there a {color} {shape} in the image ?"
COLOR_BY_SHAPE = "what color is the {shape} ?"
COLOR_BY_SLOT = "what color is the object in the {slot} ?"
SHAPE_BY_COLOR = "what shape is the {color} object ?"
SHAPE_BY_SLOT = "what shape is the object in the {slot} ?"
COUNT_ALL = "how many objects are there ?"
COUNT_COLOR = "how many {color} objects are there ?"
COUNT_SHAPE = "how many {shapes} are there ?"
POSITION_TEMPLATE = "where is the {color} {shape} ?"
EMPTY_CAPTION = "nothing"
HARD_NEGATIVE_PROB = 0.8


def plural(shape: str) -> str:
    """Plural of a shape word: ``"circles"``, ``"crosses"``."""
    return shape + ("es" if shape.endswith(("s", "x")) else "s")


@dataclass(frozen=True)
class Question:
    """A question with its answer and the objects whose pixels decide it.

    Attributes:
        type: One of ``QUESTION_TYPES``.
        text: The prompt.
        answer: The single correct answer (one or two words).
        evidence: Indices into ``scene.objects`` whose masks decide the answer.
    """

    type: str
    text: str
    answer: str
    evidence: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "evidence", tuple(int(i) for i in self.evidence))

    def to_dict(self) -> dict[str, Any]:
        """Serialise to a JSON-compatible dict."""
        return {
            "type": self.type,
            "text": self.text,
            "answer": self.answer,
            "evidence": list(self.evidence),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Question:
        """Inverse of ``to_dict``."""
        return cls(type=d["type"], text=d["text"], answer=d["answer"], evidence=d["evidence"])


def existence_text(color: str, shape: str) -> str:
    """The existence prompt for a (color, shape) pair."""
    return EXISTENCE_TEMPLATE.format(color=color, shape=shape)


def _pick(rng: np.random.Generator, items: list[Any]) -> Any:
    return items[int(rng.integers(len(items)))]


def _existence(
    scene: Scene, rng: np.random.Generator, hard_negative_prob: float = HARD_NEGATIVE_PROB
) -> Question:
    objs = scene.objects
    if objs and rng.random() < 0.5:
        i = int(rng.integers(len(objs)))
        text = existence_text(objs[i].color, objs[i].shape)
        return Question("existence", text, "yes", (i,))
    present = {o.combo for o in objs}
    absent = [c for c in all_combos() if c not in present]
    hard = [c for c in absent if any(c[0] == o.color or c[1] == o.shape for o in objs)]
    pool = hard if hard and rng.random() < hard_negative_prob else absent
    color, shape = _pick(rng, pool)
    evidence = tuple(i for i, o in enumerate(objs) if o.color == color or o.shape == shape)
    return Question("existence", existence_text(color, shape), "no", evidence)


def _attribute(scene: Scene, rng: np.random.Generator, qtype: str) -> Question:
    """Colour question (asked via shape or slot) or shape question (via colour or slot)."""
    objs = scene.objects
    i = int(rng.integers(len(objs)))
    obj = objs[i]
    key = "shape" if qtype == "color" else "color"
    unique = sum(getattr(o, key) == getattr(obj, key) for o in objs) == 1
    by_key = unique and rng.random() < 0.5
    if qtype == "color":
        if by_key:
            text = COLOR_BY_SHAPE.format(shape=obj.shape)
        else:
            text = COLOR_BY_SLOT.format(slot=obj.slot)
        return Question("color", text, obj.color, (i,))
    if by_key:
        text = SHAPE_BY_COLOR.format(color=obj.color)
    else:
        text = SHAPE_BY_SLOT.format(slot=obj.slot)
    return Question("shape", text, obj.shape, (i,))


def _count(scene: Scene, rng: np.random.Generator) -> Question:
    objs = scene.objects
    form = int(rng.integers(3)) if objs else 0
    if form == 0:
        text, idx = COUNT_ALL, tuple(range(len(objs)))
    elif form == 1:
        color = _pick(rng, sorted({o.color for o in objs}, key=list(COLORS).index))
        text = COUNT_COLOR.format(color=color)
        idx = tuple(i for i, o in enumerate(objs) if o.color == color)
    else:
        shape = _pick(rng, sorted({o.shape for o in objs}, key=SHAPES.index))
        text = COUNT_SHAPE.format(shapes=plural(shape))
        idx = tuple(i for i, o in enumerate(objs) if o.shape == shape)
    return Question("count", text, NUMBERS[len(idx)], idx)


def _position(scene: Scene, rng: np.random.Generator) -> Question:
    i = int(rng.integers(len(scene.objects)))
    obj = scene.objects[i]
    return Question(
        "position", POSITION_TEMPLATE.format(color=obj.color, shape=obj.shape), obj.slot, (i,)
    )


UNANSWERABLE = "unanswerable"


def unanswerable(scene: Scene, rng: np.random.Generator) -> Question:
    """A question about something the scene does not hold, with answer ``""`` and no evidence.

    One of three forms, drawn uniformly among those the scene allows: ``"what color is the
    {shape} ?"`` for a shape no object has, ``"what shape is the {color} object ?"`` for a
    colour no object has, ``"where is the {color} {shape} ?"`` for an absent pair. The
    question's type is ``"unanswerable"`` (not one of ``QUESTION_TYPES``, which ``ask`` and
    ``questions`` draw from); it uses only ``vocabulary()`` words. Deterministic under ``rng``.
    """
    objs = scene.objects
    shapes = [s for s in SHAPES if all(o.shape != s for o in objs)]
    colors = [c for c in COLORS if all(o.color != c for o in objs)]
    present = {o.combo for o in objs}
    pairs = [c for c in all_combos() if c not in present]
    forms: list[tuple[list[Any], Any]] = [
        (shapes, lambda s: COLOR_BY_SHAPE.format(shape=s)),
        (colors, lambda c: SHAPE_BY_COLOR.format(color=c)),
        (pairs, lambda p: POSITION_TEMPLATE.format(color=p[0], shape=p[1])),
    ]
    pool, text = _pick(rng, [form for form in forms if form[0]])
    return Question(UNANSWERABLE, text(_pick(rng, pool)), "", ())


def ask(
    scene: Scene,
    qtype: str,
    rng: np.random.Generator,
    hard_negative_prob: float = HARD_NEGATIVE_PROB,
) -> Question:
    """Draw one random question of type ``qtype`` about ``scene``.

    Args:
        scene: The scene asked about.
        qtype: One of ``QUESTION_TYPES``.
        rng: Source of randomness (consumed).
        hard_negative_prob: Share of absent-object existence questions whose object shares a
            colour or a shape with a present one (training curricula lower it at first).

    Raises:
        ValueError: Unknown type, or a colour/shape/position question about an empty scene.
    """
    if qtype not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {qtype!r}")
    if qtype == "existence":
        return _existence(scene, rng, hard_negative_prob)
    if qtype == "count":
        return _count(scene, rng)
    if not scene.objects:
        raise ValueError(f"cannot ask a {qtype!r} question about an empty scene")
    if qtype == "position":
        return _position(scene, rng)
    return _attribute(scene, rng, qtype)


def questions(scene: Scene, rng: np.random.Generator) -> list[Question]:
    """One question of each type, in ``QUESTION_TYPES`` order.

    Types that need an object are skipped for an empty scene.
    """
    return [
        ask(scene, t, rng) for t in QUESTION_TYPES if scene.objects or t in ("existence", "count")
    ]


def caption(scene: Scene) -> str:
    """Describe the objects in slot reading order, e.g. ``"a red circle and a blue square"``."""
    objs = sorted(scene.objects, key=lambda o: SLOTS.index(o.slot))
    parts = [f"a {o.color} {o.shape}" for o in objs]
    if not parts:
        return EMPTY_CAPTION
    if len(parts) == 1:
        return parts[0]
    return " , ".join(parts[:-1]) + " and " + parts[-1]


def vocabulary() -> list[str]:
    """Every word any prompt, answer or caption can contain, sorted and unique."""
    templates = [
        EXISTENCE_TEMPLATE,
        COLOR_BY_SHAPE,
        COLOR_BY_SLOT,
        SHAPE_BY_COLOR,
        SHAPE_BY_SLOT,
        COUNT_ALL,
        COUNT_COLOR,
        COUNT_SHAPE,
        POSITION_TEMPLATE,
        DESCRIBE_PROMPT,
        "a {color} {shape} , and",
        EMPTY_CAPTION,
        "yes no",
    ]
    words = {w for t in templates for w in t.split() if not w.startswith("{")}
    fillers = [*COLORS, *SHAPES, *(plural(s) for s in SHAPES), *SLOTS, *NUMBERS]
    words.update(w for f in fillers for w in f.split())
    return sorted(words)
