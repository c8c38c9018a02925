"""Shared fixtures: tiny random-weight models of every architecture (built once per session)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _tiny_names() -> list[str]:
    from mmscope.toys.tiny import TINY

    return list(TINY)


TINY_NAMES = _tiny_names()


def _tiny_fixture(name: str):
    @pytest.fixture(scope="session", name=name)
    def build():
        from mmscope.toys.tiny import build_tiny

        return build_tiny(name)

    return build


for _name in TINY_NAMES:
    globals()[_name] = _tiny_fixture(_name)


@pytest.fixture(params=TINY_NAMES)
def any_vlm(request):
    """Each supported architecture in turn (every entry of ``mmscope.toys.tiny.TINY``)."""
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def lacks():
    """``lacks(vlm, key, kind="method")``: why the registered entry ``key`` does not apply to
    ``vlm`` (a need it declares that the model lacks, e.g. image tokens in the language model's
    sequence for Mllama), else None. Such an entry must refuse with ``NotApplicableError``
    naming that reason before any work; tests over ``any_vlm`` check that instead."""
    from mmscope.core.registry import REGISTRY
    from mmscope.models.capabilities import entry_needs, why_not

    def why(vlm, key: str, kind: str = "method") -> str | None:
        return why_not(vlm, entry_needs(REGISTRY.get(key, kind)), f"{kind} {key}")

    return why


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
