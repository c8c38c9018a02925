"""Unanswerable questions: each names something the scene lacks, checked against the scene."""

from __future__ import annotations

import re

import numpy as np

from mmscope.world import (
    COLORS,
    QUESTION_TYPES,
    SHAPES,
    Scene,
    WorldObject,
    sample_scenes,
    unanswerable,
    vocabulary,
)

SCENES = sample_scenes(300, seed=77)
_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)


def _form(scene: Scene, text: str) -> str:
    """Which form the text has, asserting that what it names is absent from the scene."""
    objs = scene.objects
    if m := re.fullmatch(rf"what color is the ({_SHAPE}) \?", text):
        assert all(o.shape != m.group(1) for o in objs)
        return "color"
    if m := re.fullmatch(rf"what shape is the ({_COLOR}) object \?", text):
        assert all(o.color != m.group(1) for o in objs)
        return "shape"
    m = re.fullmatch(rf"where is the ({_COLOR}) ({_SHAPE}) \?", text)
    assert m, f"unexpected text {text!r}"
    assert all((o.color, o.shape) != m.groups() for o in objs)
    return "position"


def test_names_only_absent_things_and_has_no_answer():
    rng = np.random.default_rng(0)
    forms = []
    for scene in SCENES:
        q = unanswerable(scene, rng)
        assert q.type == "unanswerable" and q.type not in QUESTION_TYPES
        assert q.answer == "" and q.evidence == ()
        forms.append(_form(scene, q.text))
    counts = {f: forms.count(f) for f in ("color", "shape", "position")}
    assert all(c > 50 for c in counts.values()), counts  # every form is drawn


def test_a_scene_with_every_shape_gets_no_shape_question():
    slots = ("top left", "top right", "bottom left", "bottom right")
    objs = tuple(
        WorldObject(shape, color, "large", slot)
        for shape, color, slot in zip(SHAPES, ("red", "green", "blue", "yellow"), slots)
    )
    scene = Scene(objs, "plain")
    rng = np.random.default_rng(1)
    texts = [unanswerable(scene, rng).text for _ in range(60)]
    assert not any(t.startswith("what color is the") for t in texts)
    assert any("purple object" in t for t in texts)  # the one colour it lacks
    empty = Scene((), "plain")
    assert _form(empty, unanswerable(empty, rng).text)


def test_deterministic_under_the_rng():
    a = [unanswerable(s, np.random.default_rng(5)).text for s in SCENES[:50]]
    b = [unanswerable(s, np.random.default_rng(5)).text for s in SCENES[:50]]
    one = np.random.default_rng(3)
    c = [unanswerable(s, one).text for s in SCENES[:50]]
    assert a == b and a != c


def test_words_are_in_the_vocabulary_and_the_toy_tokenizer():
    from mmscope.toys.build import toy_tokenizer

    tok = toy_tokenizer()
    words = set(vocabulary())
    rng = np.random.default_rng(2)
    for scene in SCENES[:100]:
        text = unanswerable(scene, rng).text
        assert set(text.split()) <= words
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.unk_token_id not in ids and len(ids) == len(text.split())
