"""Shared by the metric tests: a world image and a one-item ``Case`` for any tiny model."""

import pytest

from mmscope.core.targets import Predicted, Similarity
from mmscope.metrics import Case
from mmscope.world import render, sample_scenes


@pytest.fixture(scope="module")
def image():
    return render(sample_scenes(1, 5)[0], 48).image


def one_item_case(vlm, image, method):
    """``method`` explaining one world question (CLIP: one object's text) on ``vlm``."""
    prompt = "a red circle" if vlm.contrastive else "what color is the circle ?"
    inputs = vlm.prepare(image, prompt)
    target = Similarity() if vlm.contrastive else Predicted()
    return Case(vlm, inputs, target, method(vlm, inputs, target), method)


@pytest.fixture
def make_case():
    return one_item_case
