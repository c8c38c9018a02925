"""Contract over the whole registry: every attribution method, on every architecture, leaves the
model exactly as it found it (also when it raises), returns maps of the promised shapes, is
deterministic, and gives each item of a batch what it gets alone; or, on a model that lacks a
need the method declares, refuses with ``NotApplicableError`` before any work."""

import re

import numpy as np
import pytest
import torch

import mmscope
from mmscope.core.errors import NotApplicableError
from mmscope.core.hooks import patch
from mmscope.core.state import model_state
from mmscope.core.targets import Predicted
from mmscope.methods.explain import attribution_methods, make_method
from mmscope.models.capabilities import entry_needs, why_not
from mmscope.world import render, sample_scenes

#: Cheaper settings for the expensive methods; the defaults are exercised in their unit tests.
FAST: dict[str, dict] = {
    "integrated_gradients": {"steps": 8},
    "smoothgrad": {"samples": 3},
    "rise": {"masks": 64},
    "lime": {"samples": 40},
    "kernel_shap": {"samples": 40},
    "score_cam": {"batch_size": 32},
    "gscore_cam": {"channels": 8},
    "harsanyi": {"regions": (2, 1)},
}
METHODS = attribution_methods()


def _refused(vlm, method, inputs) -> bool:
    """True when ``method`` declares a need ``vlm`` lacks: it must then refuse with
    ``NotApplicableError`` naming why, before any work, and leave the model as it was."""
    reason = why_not(vlm, entry_needs(mmscope.REGISTRY.get(method)), f"method {method}")
    if reason is None:
        return False
    before = model_state(vlm.model)
    with pytest.raises(NotApplicableError, match=re.escape(reason)):
        make_method(method, **FAST.get(method, {}))(vlm, inputs)
    assert model_state(vlm.model) == before
    return True


def _prompt(vlm, i: int = 0) -> str:
    if vlm.contrastive:
        return ("a red circle", "a blue square and a green cross")[i]
    return ("what color is the circle ?", "how many objects are there ?")[i]


@pytest.fixture(scope="module")
def images():
    return [render(s, 48).image for s in sample_scenes(2, 11)]


def test_the_registry_has_every_family():
    families = {mmscope.REGISTRY.get(m).family for m in METHODS}
    assert {"attribution/gradient"} <= families
    assert len(METHODS) >= 4


@pytest.mark.parametrize("method", METHODS)
def test_state_shapes_and_determinism(method, any_vlm, images):
    vlm = any_vlm
    inputs = vlm.prepare(images[0], _prompt(vlm))
    if _refused(vlm, method, inputs):
        return
    before = model_state(vlm.model)
    explainer = make_method(method, **FAST.get(method, {}))
    first = explainer(vlm, inputs)
    assert model_state(vlm.model) == before
    again = explainer(vlm, inputs)
    grid = inputs.image_spans[0][0].grid
    maps = first.image_scores[0][0]
    assert maps.ndim == 3 and maps.shape[0] == 1
    assert maps.shape[1:] in (grid, (2 * grid[0], 2 * grid[1]))  # Qwen2-VL's vision grid
    assert np.isfinite(maps).all()
    assert first.text_scores[0].shape == (1, len(inputs.prompt_tokens[0]))
    np.testing.assert_allclose(maps, again.image_scores[0][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(first.text_scores[0], again.text_scores[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_batch_of_two_equals_each_alone(method, any_vlm, images):
    vlm = any_vlm
    prompts = [_prompt(vlm, 0), _prompt(vlm, 1)]
    if _refused(vlm, method, vlm.prepare(images, prompts)):
        return
    explainer = make_method(method, **FAST.get(method, {}))
    both = explainer(vlm, vlm.prepare(images, prompts))
    for b in range(2):
        alone = explainer(vlm, vlm.prepare(images[b], prompts[b]))
        np.testing.assert_allclose(
            both.image_scores[b][0], alone.image_scores[0][0], rtol=2e-3, atol=2e-5
        )
        np.testing.assert_allclose(both.text_scores[b], alone.text_scores[0], rtol=2e-3, atol=2e-5)


@pytest.mark.parametrize("method", METHODS)
def test_state_unchanged_when_the_forward_raises_midway(method, tiny_llava, images):
    """A layer that raises from its second call on: the target's own forward passes, the
    method's first forward breaks in the middle of the model, with its hooks in place."""
    vlm = tiny_llava
    calls = []

    def explode(hidden):
        calls.append(1)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return hidden

    vlm.model.train()  # a non-default state, to see it restored
    try:
        with patch(vlm, {"lm.layer[1]": explode}):
            before = model_state(vlm.model)
            with pytest.raises(RuntimeError, match="boom"):
                make_method(method, **FAST.get(method, {}))(
                    vlm, vlm.prepare(images[0], _prompt(vlm)), Predicted()
                )
            assert model_state(vlm.model) == before
            assert torch.is_grad_enabled()
    finally:
        vlm.model.eval()
