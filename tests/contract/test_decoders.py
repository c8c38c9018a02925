"""Contract over every registered decoder: on every generating architecture it leaves the model
and the global random state as found, repeats itself, gives each item of a batch what it gets
alone (decoders that do not sample), and refuses a contrastive encoder."""

import re

import pytest
import torch

from mmscope.core.errors import NotApplicableError
from mmscope.core.registry import REGISTRY
from mmscope.core.state import model_state
from mmscope.decoding import decoders, make_decoder
from mmscope.models.capabilities import entry_needs, why_not

DECODERS = decoders()
PROMPTS = ["describe the image .", "what color is the circle ?"]


@pytest.fixture(scope="module")
def images():
    from mmscope.world import render, sample_scenes

    return [render(s, 48).image for s in sample_scenes(2, 11)]


@pytest.mark.parametrize("key", DECODERS)
def test_state_randomness_and_batches(key, any_vlm, images):
    vlm = any_vlm
    decoder = make_decoder(key)
    if vlm.contrastive:
        with pytest.raises(NotApplicableError, match="contrastive"):
            decoder(vlm, vlm.prepare(images[0], "a red circle"))
        return
    inputs = vlm.prepare(images, PROMPTS)
    before, rng = model_state(vlm.model), torch.random.get_rng_state()
    reason = why_not(vlm, entry_needs(REGISTRY.get(key, "decoder")), f"decoder {key}")
    if reason is not None:  # a declared need the model lacks: refused before any work
        with pytest.raises(NotApplicableError, match=re.escape(reason)):
            decoder(vlm, inputs, max_new_tokens=4)
        assert model_state(vlm.model) == before
        return
    first = decoder(vlm, inputs, max_new_tokens=4)
    assert model_state(vlm.model) == before
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert len(first) == 2 and all(isinstance(t, str) for t in first)
    assert decoder(vlm, inputs, max_new_tokens=4) == first
    if not decoder.draws:
        for b in range(2):
            alone = decoder(vlm, vlm.prepare(images[b], PROMPTS[b]), max_new_tokens=4)
            assert alone == [first[b]]


def test_the_registry_has_the_baselines():
    assert {"greedy", "sampling", "beam"} <= set(DECODERS)
