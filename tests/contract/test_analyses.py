"""Contract over every registered analysis, on every architecture: it leaves the model exactly
as it found it (also when a forward raises midway), or says it does not apply; its result is
frozen, serialises to JSON and draws a figure."""

import dataclasses
import inspect
import json

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.hooks import patch
from mmscope.core.registry import REGISTRY
from mmscope.core.state import model_state
from mmscope.core.targets import TokenId
from mmscope.methods.analysis import Result, analyses, jsonable, make_analysis
from mmscope.methods.inside import analyse

#: Cheaper settings for the costly analyses; their defaults are exercised in their unit tests.
FAST: dict[str, dict] = {
    "token_ablation": {"sets": ("object", "random")},
    "fastv": {"layers": (1,), "ratios": (0.5,)},
    "head_importance": {"top": 2},
    "attention_knockout": {"batch_size": 2},  # several forwards: the scoring can fail midway
}
ANALYSES = analyses()


def _mask(size: int = 48) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[8:24, 8:24] = True
    return mask


def _run(key: str, vlm, images, target=None):
    prompts = (
        ["a red circle", "a blue square"]
        if vlm.contrastive
        else ["what color is the circle ?", "how many objects are there ?"]
    )
    inputs = vlm.prepare(images, prompts)
    data = {"masks": [_mask(), _mask()], "labels": [True, False]}
    takes = inspect.signature(REGISTRY.get(key, "analysis").obj.__call__).parameters
    data = {k: v for k, v in data.items() if k in takes}
    return analyse(key, vlm, inputs, target, **FAST.get(key, {}), **data)


def test_the_registry_has_the_inside_analyses():
    assert {"logit_lens", "token_ablation"} <= set(ANALYSES)


@pytest.fixture(scope="module")
def images():
    from mmscope.world import render, sample_scenes

    return [render(s, 48).image for s in sample_scenes(2, 11)]


@pytest.mark.parametrize("key", ANALYSES)
def test_state_result_and_serialisation(key, any_vlm, images):
    before = model_state(any_vlm.model)
    try:
        result = _run(key, any_vlm, images)
    except NotApplicableError as err:
        assert model_state(any_vlm.model) == before
        assert str(err)
        return
    assert model_state(any_vlm.model) == before
    assert isinstance(result, Result) and dataclasses.is_dataclass(result)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(result, dataclasses.fields(result)[0].name, None)
    json.dumps(jsonable(result.to_dict()), allow_nan=False)  # strict JSON: NaN as null
    assert isinstance(result.plot(), Figure)  # one result protocol: plot gives a Figure


@pytest.mark.parametrize("key", ANALYSES)
def test_state_unchanged_when_a_forward_raises_midway(key, tiny_llava, images):
    def explode(hidden):  # in the middle of the model, with the analysis's hooks in place
        raise RuntimeError("boom")

    tiny_llava.model.train()  # a non-default state, to see it restored
    try:
        with patch(tiny_llava, {"lm.layer[1]": explode}):
            before = model_state(tiny_llava.model)
            with pytest.raises(RuntimeError, match="boom"):
                _run(key, tiny_llava, images)
            assert model_state(tiny_llava.model) == before
            assert torch.is_grad_enabled()
    finally:
        tiny_llava.model.eval()


class ScoringFails(TokenId):
    """A target whose scoring raises from its second call on: the clean run scores, the
    analysis's patched or tiled runs raise with their hooks in place."""

    def bind(self, vlm, inputs):
        bound = super().bind(vlm, inputs)
        calls = []

        def score(output):
            calls.append(1)
            if len(calls) > 1:
                raise RuntimeError("midway")
            return bound.score(output)

        return dataclasses.replace(bound, score=score)


@pytest.mark.parametrize("key", ANALYSES)
def test_state_unchanged_when_scoring_raises_after_the_clean_run(key, tiny_llava, images):
    tiny_llava.model.train()  # a non-default state, to see it restored
    try:
        before = model_state(tiny_llava.model)
        try:
            _run(key, tiny_llava, images, ScoringFails([3, 3]))
        except (RuntimeError, InputError):  # InputError: analyses that take no target
            pass
        assert model_state(tiny_llava.model) == before
        assert torch.is_grad_enabled()
    finally:
        tiny_llava.model.eval()


def test_settings_are_checked_by_name():
    for key in ANALYSES:
        with pytest.raises(InputError, match="takes the settings"):
            make_analysis(key, no_such_setting=1)
