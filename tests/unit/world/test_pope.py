"""Tests for POPE-style probe sets."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from mmscope.world import POPE_SPLITS, WorldConfig, pope_questions, sample_scenes

SCENES = sample_scenes(400, seed=41)


def _by_image(qs: list) -> dict[int, list]:
    out: dict[int, list] = {}
    for q in qs:
        out.setdefault(q.image_index, []).append(q)
    return out


@pytest.mark.parametrize("split", POPE_SPLITS)
def test_balanced_and_truthful(split: str) -> None:
    qs = pope_questions(SCENES, split, seed=3)
    groups = _by_image(qs)
    assert set(groups) == set(range(len(SCENES)))
    for idx, group in groups.items():
        scene = SCENES[idx]
        names = {o.name for o in scene.objects}
        yes = [q for q in group if q.answer == "yes"]
        no = [q for q in group if q.answer == "no"]
        assert len(yes) == len(no) == min(3, len(scene.objects))
        assert all(q.object in names for q in yes)
        assert all(q.object not in names for q in no)
        assert len({q.object for q in group}) == len(group)
        for q in group:
            assert q.split == split
            assert q.text == f"is there a {q.object} in the image ?"
    assert pope_questions(SCENES, split, seed=3) == qs


def test_popular_uses_most_frequent_absent() -> None:
    freq = Counter(o.name for s in SCENES for o in s.objects)
    for q in pope_questions(SCENES, "popular", per_image=2):
        if q.answer == "no":
            names = {o.name for o in SCENES[q.image_index].objects}
            absent_freqs = sorted((freq[n] for n in freq if n not in names), reverse=True)
            assert freq[q.object] >= absent_freqs[1]


def test_adversarial_targets_cooccurrence_partners() -> None:
    config = WorldConfig()
    partners = {}
    for a, b in config.cooccurrence:
        partners[" ".join(a)] = " ".join(b)
        partners[" ".join(b)] = " ".join(a)

    def partner_rate(split: str) -> float:
        hits, total = 0, 0
        groups = _by_image(pope_questions(SCENES, split, seed=0))
        for idx, group in groups.items():
            names = {o.name for o in SCENES[idx].objects}
            missing = {partners[n] for n in names if n in partners} - names
            if missing:
                total += 1
                negatives = {q.object for q in group if q.answer == "no"}
                hits += bool(missing & negatives)
        assert total > 10
        return hits / total

    adversarial, random = partner_rate("adversarial"), partner_rate("random")
    assert adversarial > 0.9
    assert adversarial > random + 0.4


def test_unknown_split_and_per_image() -> None:
    with pytest.raises(ValueError):
        pope_questions(SCENES, "hard")
    qs = pope_questions(SCENES[:20], "random", per_image=1)
    counts = np.bincount([q.image_index for q in qs])
    assert np.all(counts == 2)
