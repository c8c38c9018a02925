"""Attention probabilities are read with eager attention at the layers asked for only: the
same probabilities as a fully eager model, while the other layers keep their implementation."""

from __future__ import annotations

import pytest
import torch

from mmscope.core.hooks import capture, mask_attention
from mmscope.world import render, sample_scenes


@pytest.fixture(scope="module")
def images():
    return [render(s, 48).image for s in sample_scenes(2, 11)]


def _prompts(vlm):
    if vlm.contrastive:
        return ["a red circle", "a blue square and a green cross"]
    return ["what color is the circle ?", "how many objects are there ?"]  # padded: lengths differ


@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen2_vl", "tiny_clip"])
def test_one_layer_eager_gives_the_fully_eager_probabilities(name, request, images):
    vlm = request.getfixturevalue(name)
    inputs = vlm.prepare(images, _prompts(vlm))
    stack = vlm.capabilities.attention[0]
    site = f"{stack}[1].attn.probs"
    seen = {}

    def record(layer):
        def hook(module, args, kwargs):
            seen[layer] = module.config._attn_implementation

        return hook

    before = vlm.model.config._attn_implementation
    vlm.model.set_attn_implementation("sdpa")
    try:
        attn = [vlm.resolve(f"{stack}[{i}].attn") for i in (0, 1)]
        handles = [
            m.register_forward_pre_hook(record(i), with_kwargs=True) for i, m in enumerate(attn)
        ]
        try:
            with torch.no_grad(), capture(vlm, [site]) as cap:
                logits = vlm.forward(inputs)
        finally:
            for h in handles:
                h.remove()
        assert seen == {0: "sdpa", 1: "eager"}  # only the layer read switched, and back after
        assert attn[1].config._attn_implementation == "sdpa"
        with torch.no_grad(), vlm.attention("eager"), capture(vlm, [site]) as ref:
            eager_logits = vlm.forward(inputs)
    finally:
        vlm.model.set_attn_implementation(before)
    torch.testing.assert_close(cap[site], ref[site], rtol=1e-5, atol=1e-6)
    key = "logits_per_image" if vlm.contrastive else "logits"
    torch.testing.assert_close(
        getattr(logits, key), getattr(eager_logits, key), rtol=1e-4, atol=1e-5
    )
    probs = cap[site]
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)))
    if not vlm.contrastive:  # causal: nothing above the diagonal
        assert probs.triu(1).abs().max() == 0


def test_knockout_under_sdpa_equals_knockout_under_eager(tiny_llava, images):
    vlm = tiny_llava
    inputs = vlm.prepare(images, _prompts(vlm))
    length = inputs.input_ids.shape[1]
    blocked = torch.zeros(length, length, dtype=torch.bool)
    span = inputs.image_spans[0][0]
    blocked[-1, span.start : span.end] = True  # the last position may not read the image
    out = {}
    before = vlm.model.config._attn_implementation
    try:
        for impl in ("sdpa", "eager"):
            vlm.model.set_attn_implementation(impl)
            with torch.no_grad(), mask_attention(vlm, {"lm.layer[0].attn": blocked}):
                out[impl] = vlm.forward(inputs).logits
            assert vlm.model.config._attn_implementation == impl
    finally:
        vlm.model.set_attn_implementation(before)
    torch.testing.assert_close(out["sdpa"], out["eager"], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        plain = vlm.forward(inputs).logits
    assert (plain[:, -1] - out["eager"][:, -1]).abs().max() > 1e-4  # the knockout did something


def test_an_attention_that_returns_no_probabilities_says_how_to_load_the_model(tiny_llava):
    """A module outside transformers' attention interface (no config to switch) that returns
    no probabilities: one typed error naming the fix, not a deep traceback."""
    from mmscope.core.errors import SiteError

    layer = tiny_llava.resolve("lm.layer[0].attn")

    def drop_probs(module, args, output):
        return (output[0], None)

    handle = layer.register_forward_hook(drop_probs)
    try:
        inputs = tiny_llava.prepare(None, "what color is the circle ?")
        with pytest.raises(SiteError, match="attn_implementation='eager'"):
            with torch.no_grad(), capture(tiny_llava, "lm.layer[0].attn.probs"):
                tiny_llava.forward(inputs)
    finally:
        handle.remove()
