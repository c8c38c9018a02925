"""Tests for questions, captions and vocabulary, checked by independent re-derivation."""

from __future__ import annotations

import re

import numpy as np
import pytest

from mmscope.world import (
    COLORS,
    DESCRIBE_PROMPT,
    NUMBERS,
    QUESTION_TYPES,
    SHAPES,
    SLOTS,
    Question,
    Scene,
    WorldObject,
    ask,
    caption,
    questions,
    sample_scenes,
    vocabulary,
)

SCENES = sample_scenes(300, seed=31)
_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_SLOT = "|".join(SLOTS)
_PLURALS = {"circles": "circle", "squares": "square", "triangles": "triangle", "crosses": "cross"}


def _solve(scene: Scene, text: str) -> tuple[str, set[int]]:
    """Answer a question and name the deciding objects, from the text alone."""
    objs = list(enumerate(scene.objects))
    if m := re.fullmatch(rf"is there a ({_COLOR}) ({_SHAPE}) in the image \?", text):
        color, shape = m.groups()
        hits = {i for i, o in objs if (o.color, o.shape) == (color, shape)}
        if hits:
            return "yes", hits
        return "no", {i for i, o in objs if o.color == color or o.shape == shape}
    if m := re.fullmatch(rf"what color is the ({_SHAPE}) \?", text):
        (hit,) = [(i, o) for i, o in objs if o.shape == m.group(1)]
        return hit[1].color, {hit[0]}
    if m := re.fullmatch(rf"what color is the object in the ({_SLOT}) \?", text):
        (hit,) = [(i, o) for i, o in objs if o.slot == m.group(1)]
        return hit[1].color, {hit[0]}
    if m := re.fullmatch(rf"what shape is the ({_COLOR}) object \?", text):
        (hit,) = [(i, o) for i, o in objs if o.color == m.group(1)]
        return hit[1].shape, {hit[0]}
    if m := re.fullmatch(rf"what shape is the object in the ({_SLOT}) \?", text):
        (hit,) = [(i, o) for i, o in objs if o.slot == m.group(1)]
        return hit[1].shape, {hit[0]}
    if text == "how many objects are there ?":
        return NUMBERS[len(objs)], {i for i, _ in objs}
    if m := re.fullmatch(rf"how many ({_COLOR}) objects are there \?", text):
        hits = {i for i, o in objs if o.color == m.group(1)}
        return NUMBERS[len(hits)], hits
    if m := re.fullmatch(r"how many (\w+) are there \?", text):
        hits = {i for i, o in objs if o.shape == _PLURALS[m.group(1)]}
        return NUMBERS[len(hits)], hits
    if m := re.fullmatch(rf"where is the ({_COLOR}) ({_SHAPE}) \?", text):
        (hit,) = [(i, o) for i, o in objs if (o.color, o.shape) == m.groups()]
        return hit[1].slot, {hit[0]}
    raise AssertionError(f"unrecognised question {text!r}")


def test_every_answer_and_evidence_is_correct() -> None:
    rng = np.random.default_rng(0)
    seen_forms: set[str] = set()
    for scene in SCENES:
        for _ in range(3):
            for q in questions(scene, rng):
                answer, evidence = _solve(scene, q.text)
                assert q.answer == answer, (scene, q)
                assert set(q.evidence) == evidence, (scene, q)
                seen_forms.add(re.sub(rf"\b({_COLOR}|{_SHAPE}|{_SLOT})\b", "X", q.text))
    # Both phrasings of colour/shape questions and all count forms occur.
    assert "what color is the X ?" in seen_forms
    assert "what color is the object in the X ?" in seen_forms
    assert "what shape is the X object ?" in seen_forms
    assert "what shape is the object in the X ?" in seen_forms
    assert {"how many objects are there ?", "how many X objects are there ?"} <= seen_forms
    assert any(f.startswith("how many") and "objects" not in f for f in seen_forms)


def test_questions_one_of_each_type_and_deterministic() -> None:
    a = [questions(s, np.random.default_rng(9)) for s in SCENES[:50]]
    b = [questions(s, np.random.default_rng(9)) for s in SCENES[:50]]
    assert a == b
    assert all([q.type for q in qs] == list(QUESTION_TYPES) for qs in a)


def test_existence_balance_and_hard_negatives() -> None:
    rng = np.random.default_rng(1)
    qs = [ask(SCENES[i % len(SCENES)], "existence", rng) for i in range(3000)]
    yes = np.mean([q.answer == "yes" for q in qs])
    assert abs(yes - 0.5) < 0.03
    negatives = [q for q in qs if q.answer == "no"]
    hard = np.mean([len(q.evidence) > 0 for q in negatives])
    assert hard > 0.8  # 80% chosen hard, plus random ones that happen to share an attribute


def test_unique_shape_allows_shape_phrasing() -> None:
    scene = Scene(
        (
            WorldObject("circle", "red", "small", "top left"),
            WorldObject("circle", "blue", "large", "bottom right"),
        )
    )
    rng = np.random.default_rng(0)
    for _ in range(30):
        q = ask(scene, "color", rng)
        assert q.text.startswith("what color is the object in the")  # circle is not unique
        q = ask(scene, "shape", rng)
        assert q.answer == "circle"


def test_caption_order_and_format() -> None:
    r = WorldObject("circle", "red", "small", "bottom right")
    b = WorldObject("square", "blue", "large", "top left")
    g = WorldObject("cross", "green", "small", "top right")
    y = WorldObject("triangle", "yellow", "small", "bottom left")
    assert caption(Scene((r,))) == "a red circle"
    assert caption(Scene((r, b))) == "a blue square and a red circle"
    assert caption(Scene((r, b, g))) == "a blue square , a green cross and a red circle"
    assert (
        caption(Scene((r, b, g, y)))
        == "a blue square , a green cross , a yellow triangle and a red circle"
    )


def test_all_words_in_vocabulary() -> None:
    vocab = vocabulary()
    assert vocab == sorted(set(vocab))
    words = set(DESCRIBE_PROMPT.split())
    rng = np.random.default_rng(2)
    for scene in SCENES:
        words.update(caption(scene).split())
        for q in questions(scene, rng):
            words.update(q.text.split())
            words.update(q.answer.split())
    assert words <= set(vocab)
    for plural in _PLURALS:
        assert plural in vocab


def test_empty_scene() -> None:
    scene = Scene(())
    rng = np.random.default_rng(0)
    qs = questions(scene, rng)
    assert [q.type for q in qs] == ["existence", "count"]
    assert qs[0].answer == "no" and qs[1].answer == "zero"
    with pytest.raises(ValueError):
        ask(scene, "position", rng)
    assert set(caption(scene).split()) <= set(vocabulary())


def test_unknown_type_and_serialisation() -> None:
    with pytest.raises(ValueError):
        ask(SCENES[0], "why", np.random.default_rng(0))
    q = Question("count", "how many objects are there ?", "two", (0, 1))
    assert Question.from_dict(q.to_dict()) == q
    assert q.to_dict()["evidence"] == [0, 1]
