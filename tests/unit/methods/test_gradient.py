"""The gradient family: hand-checked reductions, integrated gradients' completeness, and
agreement with captum's implementations on the same function of the pixels."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from captum.attr import IntegratedGradients as CaptumIG
from captum.attr import Saliency

from mmscope.core.errors import InputError
from mmscope.core.hooks import capture, patch
from mmscope.core.targets import Generated, Similarity, Token
from mmscope.methods.attribution.gradient import (
    InputXGradient,
    IntegratedGradients,
    SmoothGrad,
)
from mmscope.methods.attribution.gradient import Saliency as OurSaliency
from mmscope.world import render, sample_scenes

PROMPT = "what color is the circle ?"


@pytest.fixture(scope="module")
def image():
    return render(sample_scenes(1, 5)[0], 48).image


def _pixel_function(vlm, bound):
    """The target as a function of pixel_values alone (what captum sees)."""

    def f(pixels):
        tiled = bound.inputs.tile(pixels.shape[0]) if pixels.shape[0] > 1 else bound.inputs
        out = bound(vlm.forward(replace(tiled, tensors={**tiled.tensors, "pixel_values": pixels})))
        return out[:, 0]

    return f


def _grid(vlm, inputs, per_pixel):
    return vlm.pixel_grid(per_pixel, inputs)[0].numpy()


def test_saliency_and_input_x_gradient_equal_hand_reductions(tiny_llava, image):
    vlm = tiny_llava
    inputs = vlm.prepare(image, PROMPT)
    bound = Token("red").bind(vlm, inputs)
    pixels = inputs.pixel_values.clone().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(_pixel_function(vlm, bound)(pixels).sum(), pixels)
    sal = OurSaliency()(vlm, inputs, Token("red"))
    ixg = InputXGradient()(vlm, inputs, Token("red"))
    np.testing.assert_allclose(sal.image_map(), _grid(vlm, inputs, grad.abs()), rtol=1e-4)
    np.testing.assert_allclose(
        ixg.image_map(), _grid(vlm, inputs, grad * inputs.pixel_values), rtol=1e-4, atol=1e-7
    )
    # captum's saliency (abs=True) summed per patch is ours
    ref = Saliency(_pixel_function(vlm, bound)).attribute(inputs.pixel_values.clone())
    np.testing.assert_allclose(sal.image_map(), _grid(vlm, inputs, ref), rtol=1e-4)


def test_integrated_gradients_agree_with_captum(any_vlm, image):
    """captum's IG over (pixels, prompt embeddings) with the same baselines is the same
    computation: pixels to the mean colour (0), the prompt's word vectors to zero."""
    vlm = any_vlm
    inputs = vlm.prepare(image, "a red circle" if vlm.contrastive else PROMPT)
    target = Similarity() if vlm.contrastive else Token("red")
    bound = target.bind(vlm, inputs)
    ours = IntegratedGradients(steps=16, baseline="mean", batch_steps=5)(vlm, inputs, target)
    with torch.no_grad(), capture(vlm, vlm.TEXT_EMBED_SITE) as cap:
        vlm.forward(inputs)
    text = cap[vlm.TEXT_EMBED_SITE]
    start, end = inputs.prompt_spans[0]
    base_text = text.clone()
    base_text[:, start:end] = 0

    def f(pixels, words):
        tiled = inputs.tile(pixels.shape[0] // inputs.pixel_values.shape[0])
        tiled = replace(tiled, tensors={**tiled.tensors, "pixel_values": pixels})
        with patch(vlm, {vlm.TEXT_EMBED_SITE: lambda out: words.to(out)}):
            return bound(vlm.forward(tiled))[:, 0]

    pixels_attr, text_attr = CaptumIG(f).attribute(
        (inputs.pixel_values.clone(), text.clone()),
        baselines=(torch.zeros_like(inputs.pixel_values), base_text),
        n_steps=16,
        method="gausslegendre",
    )
    expected = vlm.pixel_grid(pixels_attr, inputs)[0].numpy()
    np.testing.assert_allclose(ours.image_map(), expected, rtol=1e-3, atol=1e-6)
    words = text_attr.sum(-1)[0, start:end].numpy()
    np.testing.assert_allclose(ours.text_scores[0][0], words, rtol=1e-3, atol=1e-6)


def test_integrated_gradients_complete_on_every_architecture(any_vlm, image):
    vlm = any_vlm
    inputs = vlm.prepare(image, "a red circle" if vlm.contrastive else PROMPT)
    # 256 steps: the random Gemma 3's SigLIP path is curved enough that 64 leave a 23% gap;
    # Gemma 4's RMS norms of q, k and v (eps 1e-6) switch on within the first 0.1% of the path
    # from a zero prompt, where 256 nodes are too few: more steps where the gap says so
    for steps in (256, 1024):
        exp = IntegratedGradients(steps=steps)(vlm, inputs)
        gap, delta = exp.extras["completeness_gap"][0][0], exp.extras["delta"][0][0]
        if abs(gap) <= 0.05 * abs(delta) + 1e-3:
            break
    total = sum(float(m.sum()) for m in exp.image_scores[0]) + float(exp.text_scores[0].sum())
    assert total - delta == pytest.approx(gap, abs=1e-5)
    assert abs(gap) <= 0.05 * abs(delta) + 1e-3, (gap, delta)


def test_generated_target_explains_every_token_in_one_pass(tiny_llava, image):
    vlm = tiny_llava
    inputs = vlm.prepare(image, PROMPT)
    exp = OurSaliency()(vlm, inputs, Generated(4))
    k = len(exp.labels[0])
    assert exp.image_scores[0][0].shape[0] == k == exp.text_scores[0].shape[0]
    # each output's map equals that token explained alone (teacher-forced)
    bound = Generated(4).bind(vlm, inputs)
    prefix_len = inputs.input_ids.shape[1]
    for j in range(k):
        ids = bound.inputs.input_ids[:, : prefix_len + j]
        forced = replace(
            inputs,
            tensors={
                **inputs.tensors,
                "input_ids": ids,
                "attention_mask": bound.inputs.attention_mask[:, : prefix_len + j],
            },
        )
        token = int(bound.inputs.input_ids[0, prefix_len + j])
        from mmscope.core.targets import TokenId

        alone = OurSaliency()(vlm, forced, TokenId(token))
        np.testing.assert_allclose(exp.image_scores[0][0][j], alone.image_map(), rtol=1e-4)


def test_smoothgrad_is_the_mean_of_captum_saliency_over_its_noise(tiny_clip, image):
    vlm = tiny_clip
    inputs = vlm.prepare(image, "a red circle")
    exp = SmoothGrad("saliency", samples=4, noise=0.1, seed=3)(vlm, inputs, Similarity())
    bound = Similarity().bind(vlm, inputs)
    # the same noise, drawn the way SmoothGrad draws it, through captum's saliency
    maps = []
    for sample in range(4):
        generator = torch.Generator().manual_seed(3 * 100_003 + sample)
        noise = torch.randn(inputs.pixel_values.shape, generator=generator)
        noisy = inputs.pixel_values + 0.1 * vlm.pixel_range * noise
        grad = Saliency(_pixel_function(vlm, bound)).attribute(noisy)
        maps.append(_grid(vlm, inputs, grad))
    np.testing.assert_allclose(exp.image_map(), np.mean(maps, axis=0), rtol=1e-4, atol=1e-7)


def test_token_space_and_bad_settings(tiny_llava, image):
    inputs = tiny_llava.prepare(image, PROMPT)
    exp = IntegratedGradients(steps=32, space="tokens", baseline="zero")(tiny_llava, inputs)
    assert abs(exp.extras["completeness_gap"][0][0]) <= 0.05 * abs(exp.extras["delta"][0][0])
    with pytest.raises(InputError):
        IntegratedGradients(baseline="zero")  # a token baseline in pixel space
    with pytest.raises(InputError):
        IntegratedGradients(space="latent")
    with pytest.raises(InputError):
        SmoothGrad("grad_cam")
    with pytest.raises(InputError):
        Token("two words").bind(tiny_llava, inputs)


def test_a_bfloat16_model_keeps_its_dtype_and_gets_float32_maps(image):
    from mmscope.core.state import model_state
    from mmscope.toys.tiny import tiny_llava

    vlm = tiny_llava()
    vlm.model.to(torch.bfloat16)
    inputs = vlm.prepare(image, PROMPT).to("cpu", torch.bfloat16)
    before = model_state(vlm.model)
    for method in (
        OurSaliency(),
        IntegratedGradients(steps=4),
        IntegratedGradients(steps=4, space="tokens", baseline="mean"),
    ):
        exp = method(vlm, inputs, Token("red"))
        assert exp.image_map().dtype == np.float32 and np.isfinite(exp.image_map()).all()
        assert np.abs(exp.image_map()).sum() > 0
    assert model_state(vlm.model) == before
