"""Shared fixtures: tiny random-weight models of every architecture (built once per session)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_llava():
    from mmscope.models.tiny import tiny_llava

    return tiny_llava()


@pytest.fixture(scope="session")
def tiny_clip():
    from mmscope.models.tiny import tiny_clip

    return tiny_clip()


@pytest.fixture(scope="session")
def tiny_qwen2_vl():
    from mmscope.models.tiny import tiny_qwen2_vl

    return tiny_qwen2_vl()


@pytest.fixture(params=["tiny_llava", "tiny_clip", "tiny_qwen2_vl"])
def any_vlm(request):
    """Each supported architecture in turn."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def scene_image():
    from mmscope.world import render, sample_scenes

    return render(sample_scenes(1, 3)[0], 48).image


@pytest.fixture(scope="session")
def toy_llava():
    """The shipped toy-llava (trained on the world), for checks against the world's truth."""
    from mmscope.models import load

    return load("toy-llava")


@pytest.fixture(scope="session")
def toy_clip():
    from mmscope.models import load

    return load("toy-clip")
