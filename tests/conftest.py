"""Shared fixtures: tiny random-weight models of every architecture (built once per session)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _available() -> list[str]:
    """Tiny models whose builder module exists (families being added appear as they land)."""
    import importlib.util

    from mmscope.models.tiny import TINY

    return [n for n, ref in TINY.items() if importlib.util.find_spec(ref.split(":")[0])]


TINY_NAMES = _available()


def _tiny_fixture(name: str):
    @pytest.fixture(scope="session", name=name)
    def build():
        from mmscope.models.tiny import build_tiny

        return build_tiny(name)

    return build


for _name in TINY_NAMES:
    globals()[_name] = _tiny_fixture(_name)


@pytest.fixture(params=TINY_NAMES)
def any_vlm(request):
    """Each supported architecture in turn (every entry of ``mmscope.models.tiny.TINY``)."""
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
