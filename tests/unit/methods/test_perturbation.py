"""Perturbation attributions: the masking engine, occlusion, RISE, LIME and KernelSHAP."""

from __future__ import annotations

from dataclasses import replace

import captum.attr as captum_attr
import numpy as np
import pytest
import torch
from captum._utils.models.linear_model import SkLearnLasso
from PIL import Image

from mmscope.core.errors import InputError
from mmscope.core.hooks import patch
from mmscope.core.inputs import ImageSpan, Inputs
from mmscope.core.targets import BoundTarget, Generated, Predicted, Similarity
from mmscope.methods.attribution.perturbation import (
    RISE,
    Features,
    Occlusion,
    masked_forwards,
)
from mmscope.methods.attribution.surrogate import (
    LIME,
    KernelSHAP,
    item_forward,
)
from mmscope.models.base import VLM
from mmscope.world import render, sample_scenes

PROMPTS = ("what color is the circle ?", "how many objects are there ?")
TEXTS = ("a red circle", "a blue square and a green cross")
#: Cheap settings for runs on the tiny models.
CHEAP = {
    "occlusion": lambda: Occlusion(batch_size=32),
    "rise": lambda: RISE(masks=24, batch_size=24),
    "lime": lambda: LIME(samples=24, alpha=1e-4, batch_size=24),
    "kernel_shap": lambda: KernelSHAP(samples=24, batch_size=24),
}


@pytest.fixture(scope="module")
def images():
    return [render(s, 48).image for s in sample_scenes(2, 11)]


def _prompts(vlm):
    return TEXTS if vlm.contrastive else PROMPTS


def _flat(exp, item=0, output=0):
    """An item's maps as one vector in feature order: image cells, then prompt tokens."""
    cells = [m[output].ravel() for m in exp.image_scores[item]]
    return np.concatenate(cells + [exp.text_scores[item][output]])


# ----- a model whose target is linear in every feature's keep value ---------------------------
class _LinearNet(torch.nn.Module):
    """score_k = <w_pix_k, pixels> + sum_l w_tok_k[l] * embedding[l] (every embedding is 1)."""

    def __init__(self, w_pix: torch.Tensor, w_tok: torch.Tensor) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 1)
        self.embed.weight.data.fill_(1.0)
        self.register_buffer("w_pix", w_pix)
        self.register_buffer("w_tok", w_tok)

    def forward(self, input_ids, attention_mask, pixel_values):
        words = self.embed(input_ids)[..., 0]
        return torch.einsum("bchw,kchw->bk", pixel_values, self.w_pix) + words @ self.w_tok.T


class _LinearVLM(VLM):
    ROLES = {"lm.embed": "embed"}


def _linear_case(w_pix, w_tok, pixels):
    """A linear model on 8x8-pixel images over a 4x4 grid, with 2 outputs and 3 prompt tokens
    (positions 1-3 of 5); ``a`` is each feature's exact contribution per output."""
    k, length = w_tok.shape
    vlm = _LinearVLM(_LinearNet(w_pix, w_tok), processor=None, name="linear")
    inputs = Inputs(
        tensors={
            "input_ids": torch.ones(1, length, dtype=torch.long),
            "attention_mask": torch.ones(1, length, dtype=torch.long),
            "pixel_values": pixels,
        },
        images=((Image.new("RGB", (8, 8)),),),
        image_spans=((ImageSpan(0, 16, (4, 4)),),),
        prompts=("x y z",),
        prompt_spans=((1, 4),),
        prompt_tokens=(("x", "y", "z"),),
    )
    bound = BoundTarget(inputs, (("a", "b"),), lambda out: out)
    cells = (pixels * w_pix).sum(1).reshape(k, 4, 2, 4, 2).sum((2, 4))  # (k, 4, 4)
    a = torch.cat([cells.reshape(k, -1), w_tok[:, 1:4]], dim=1)  # (k, 19)
    return vlm, bound, a


@pytest.fixture(scope="module")
def linear():
    g = torch.Generator().manual_seed(0)
    w_pix, w_tok = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 5, generator=g)
    return _linear_case(w_pix, w_tok, torch.randn(1, 3, 8, 8, generator=g))


def _vector(maps):
    return torch.cat([maps.image[0].reshape(maps.image[0].shape[0], -1), maps.text[0]], dim=1)


# ----- the engine -----------------------------------------------------------------------------
def _by_hand(vlm, bound, mask):
    """One masked forward written out: pixels by ``mask_pixels``, words zeroed by a hook."""
    inputs = bound.inputs
    grids = [s.grid for s in vlm.flat_spans(inputs)]
    keep, start = [], 0
    for rows, cols in grids:
        keep.append(mask[start : start + rows * cols].reshape(rows, cols))
        start += rows * cols
    same = len(set(grids)) == 1
    pixels = vlm.mask_pixels(inputs.pixel_values, inputs, torch.stack(keep) if same else keep, 0.0)
    words = torch.ones(inputs.input_ids.shape)
    for r, (a, b) in enumerate(inputs.prompt_spans):
        words[r, a:b] = mask[start : start + b - a]
        start += b - a
    masked = replace(inputs, tensors={**inputs.tensors, "pixel_values": pixels})
    hook = {vlm.TEXT_EMBED_SITE: lambda out: out * words[..., None].to(out)}
    with torch.no_grad(), patch(vlm, hook):
        return bound(vlm.forward(masked)).float()


@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen2_vl", "tiny_clip"])
def test_batched_engine_equals_single_forwards(name, request, images):
    vlm = request.getfixturevalue(name)
    inputs = vlm.prepare(images, list(_prompts(vlm)))
    bound = (Similarity() if vlm.contrastive else Predicted()).bind(vlm, inputs)
    features = Features.of(vlm, inputs)
    masks = torch.rand(5, features.size, generator=torch.Generator().manual_seed(1))
    masks[0] = 1
    masks[1] = (masks[1] > 0.5).float()
    batched = masked_forwards(vlm, bound, masks, batch_size=3)
    assert batched.shape == (5, 2, 1)
    for m in range(5):
        torch.testing.assert_close(batched[m], _by_hand(vlm, bound, masks[m]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(batched, masked_forwards(vlm, bound, masks, batch_size=1))


def test_features_layout(tiny_qwen2_vl, images):
    inputs = tiny_qwen2_vl.prepare(images, list(PROMPTS))
    f = Features.of(tiny_qwen2_vl, inputs)
    cells = [s.grid[0] * s.grid[1] for s in tiny_qwen2_vl.flat_spans(inputs)]
    words = [len(t) for t in inputs.prompt_tokens]
    assert f.size == sum(cells) + sum(words)
    expected0 = list(range(cells[0])) + list(range(sum(cells), sum(cells) + words[0]))
    assert f.of_item(0).tolist() == expected0


def test_bad_masks_raise(tiny_llava, images):
    inputs = tiny_llava.prepare(images[0], PROMPTS[0])
    bound = Predicted().bind(tiny_llava, inputs)
    with pytest.raises(InputError, match="masks must be"):
        masked_forwards(tiny_llava, bound, torch.ones(2, 3))


# ----- occlusion ------------------------------------------------------------------------------
def test_occlusion_of_one_patch_and_one_word_by_hand(tiny_llava, images):
    inputs = tiny_llava.prepare(images[0], PROMPTS[0])
    bound = Predicted().bind(tiny_llava, inputs)
    exp = Occlusion()(tiny_llava, inputs, Predicted())
    f_x = _by_hand(tiny_llava, bound, torch.ones(Features.of(tiny_llava, inputs).size))[0, 0]
    keep = torch.ones(1, 4, 4)
    keep[0, 2, 1] = 0
    pixels = tiny_llava.mask_pixels(inputs.pixel_values, inputs, keep, 0.0)
    masked = replace(inputs, tensors={**inputs.tensors, "pixel_values": pixels})
    with torch.no_grad():
        f_patch = bound(tiny_llava.forward(masked))[0, 0]
    assert exp.image_scores[0][0][0, 2, 1] == pytest.approx(float(f_x - f_patch), abs=1e-5)
    start = inputs.prompt_spans[0][0]

    def drop_word(out):
        out = out.clone()
        out[:, start + 1] = 0
        return out

    with torch.no_grad(), patch(tiny_llava, {tiny_llava.TEXT_EMBED_SITE: drop_word}):
        f_word = bound(tiny_llava.forward(inputs))[0, 0]
    assert exp.text_scores[0][0, 1] == pytest.approx(float(f_x - f_word), abs=1e-5)


def test_occlusion_on_a_linear_model_by_hand(linear):
    vlm, bound, a = linear
    torch.testing.assert_close(_vector(Occlusion().attribute(vlm, bound)), a, rtol=1e-4, atol=1e-4)
    # 2x2 windows, stride 1: a cell's score is the mean of the windows' drops over it
    got = Occlusion(window=2).attribute(vlm, bound).image[0]
    cells = a[:, :16].reshape(2, 4, 4)
    total, count = torch.zeros(2, 4, 4), torch.zeros(4, 4)
    for top in range(3):
        for left in range(3):
            total[:, top : top + 2, left : left + 2] += cells[
                :, top : top + 2, left : left + 2
            ].sum((1, 2), keepdim=True)
            count[top : top + 2, left : left + 2] += 1
    torch.testing.assert_close(got, total / count, rtol=1e-4, atol=1e-4)
    # 3x3 windows, stride 2: one window fits; the last row and column are covered by none
    got = Occlusion(window=3, stride=2).attribute(vlm, bound).image[0]
    torch.testing.assert_close(
        got[:, :3, :3],
        cells[:, :3, :3].sum((1, 2))[:, None, None].expand(2, 3, 3),
        rtol=1e-4,
        atol=1e-4,
    )
    assert got[:, 3].abs().max() == 0 and got[:, :, 3].abs().max() == 0


def test_a_shared_clip_text_is_scored_per_image(tiny_clip, images):
    both = Occlusion()(tiny_clip, tiny_clip.prepare(images, TEXTS[0]))
    alone = [Occlusion()(tiny_clip, tiny_clip.prepare(im, TEXTS[0])) for im in images]
    assert len(both.text_scores) == 2  # Similarity pairs the text with each image
    for b in range(2):
        np.testing.assert_allclose(both.text_scores[b], alone[b].text_scores[0], atol=1e-5)
        np.testing.assert_allclose(both.image_scores[b][0], alone[b].image_scores[0][0], atol=1e-5)


# ----- RISE -----------------------------------------------------------------------------------
def test_rise_with_p_one_is_zero(tiny_llava, images):
    """Nothing is ever removed: every masked score is f(x), so the centred map is 0."""
    inputs = tiny_llava.prepare(images[0], PROMPTS[0])
    exp = RISE(masks=8, p=1.0)(tiny_llava, inputs)
    np.testing.assert_allclose(exp.image_scores[0][0], 0.0, atol=1e-5)
    np.testing.assert_allclose(exp.text_scores[0], 0.0, atol=1e-5)


def test_rise_masks(linear):
    vlm, bound, _ = linear
    features = Features.of(vlm, bound.inputs)
    masks = RISE(masks=400, cells=2, seed=3).draw(features)
    assert masks.shape == (400, 19) and 0 <= masks.min() and masks.max() <= 1
    assert torch.equal(masks, RISE(masks=400, cells=2, seed=3).draw(features))
    assert not torch.equal(masks, RISE(masks=400, cells=2, seed=4).draw(features))
    assert set(masks[:, 16:].unique().tolist()) == {0.0, 1.0}  # words: Bernoulli
    assert len(masks[:, :16].unique()) > 2  # cells: soft, bilinearly upsampled
    assert masks.mean() == pytest.approx(0.5, abs=0.05)


def test_rise_is_the_centred_papers_estimator_on_fixed_masks(tiny_llava, images):
    inputs = tiny_llava.prepare(images[0], PROMPTS[0])
    bound = Predicted().bind(tiny_llava, inputs)
    method = RISE(masks=6, p=0.5, seed=2)
    masks = method.draw(Features.of(tiny_llava, inputs))
    maps = method.attribute(tiny_llava, bound)
    f = torch.stack([_by_hand(tiny_llava, bound, m)[0, 0] for m in masks])
    expected = ((f - f.mean())[:, None] * masks).sum(0) / (6 * 0.5)
    torch.testing.assert_close(_vector(maps)[0], expected, rtol=1e-4, atol=1e-4)


def test_rise_recovers_linear_weights(linear):
    """f linear in the keeps: E[centred saliency] = Cov(M) a / p, the weights ``a`` seen
    through the masks' blur (words: independent, no blur)."""
    vlm, bound, a = linear
    sal = _vector(RISE(masks=4000, seed=0, batch_size=1000).attribute(vlm, bound))
    many = RISE(masks=50_000, seed=1).draw(Features.of(vlm, bound.inputs))
    cov = (many - many.mean(0)).T @ many / len(many)
    expected = (cov @ a.T).T / 0.5
    for k in range(2):
        assert np.corrcoef(sal[k, :16], expected[k, :16])[0, 1] > 0.98
        assert np.corrcoef(sal[k, 16:], a[k, 16:])[0, 1] > 0.95
    # one hot cell and one hot word per output: RISE puts its maximum on them
    w_pix, w_tok = torch.zeros(2, 3, 8, 8), torch.zeros(2, 5)
    w_pix[0, :, 2:4, 4:6] = 1  # cell (1, 2)
    w_pix[1, :, 6:8, 0:2] = 1  # cell (3, 0)
    w_tok[0, 3], w_tok[1, 1] = 5, 5  # words 2 and 0
    vlm, bound, _ = _linear_case(w_pix, w_tok, torch.ones(1, 3, 8, 8))
    maps = RISE(masks=2000, seed=0, batch_size=1000).attribute(vlm, bound)
    assert [int(m.argmax()) for m in maps.image[0]] == [1 * 4 + 2, 3 * 4 + 0]
    assert maps.text[0].argmax(-1).tolist() == [2, 0]


# ----- LIME and KernelSHAP --------------------------------------------------------------------
def test_surrogates_recover_a_linear_model_exactly(linear):
    vlm, bound, a = linear
    for method in (KernelSHAP(samples=100), LIME(samples=100, alpha=0.0)):
        maps = method.attribute(vlm, bound)
        torch.testing.assert_close(_vector(maps), a, rtol=1e-3, atol=1e-3)


def test_lime_and_kernel_shap_agree_with_captum(tiny_llava, images):
    inputs = tiny_llava.prepare(images[0], PROMPTS[0])
    bound = Predicted().bind(tiny_llava, inputs)
    forward = item_forward(tiny_llava, bound, 0, batch_size=8)
    n = len(Features.of(tiny_llava, inputs).of_item(0))
    pairs = [
        (
            LIME(samples=40, seed=3, alpha=1e-4, batch_size=8),
            captum_attr.Lime(forward, interpretable_model=SkLearnLasso(alpha=1e-4)),
        ),
        (KernelSHAP(samples=40, seed=3, batch_size=8), captum_attr.KernelShap(forward)),
    ]
    for ours, theirs in pairs:
        torch.manual_seed(3)
        ref = theirs.attribute(torch.ones(1, n), target=0, n_samples=40, perturbations_per_eval=8)
        got = _flat(ours(tiny_llava, inputs, Predicted()))
        assert np.abs(ref.numpy()).max() > 0
        np.testing.assert_allclose(got, ref.numpy().ravel(), rtol=1e-4, atol=1e-6)


def test_surrogates_leave_the_global_rng_alone(linear):
    vlm, bound, _ = linear
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    LIME(samples=20).attribute(vlm, bound)
    assert torch.equal(torch.rand(3), expected)


def test_kernel_shap_efficiency(tiny_llava, images):
    inputs = tiny_llava.prepare(images[0], PROMPTS[0])
    bound = Predicted().bind(tiny_llava, inputs)
    exp = KernelSHAP(samples=60)(tiny_llava, inputs, Predicted())
    size = Features.of(tiny_llava, inputs).size
    f = masked_forwards(tiny_llava, bound, torch.stack([torch.ones(size), torch.zeros(size)]))
    delta = float(f[0, 0, 0] - f[1, 0, 0])
    assert _flat(exp).sum() == pytest.approx(delta, abs=1e-4 + 1e-3 * abs(delta))
    assert exp.extras["delta"][0][0] == pytest.approx(delta, abs=1e-5)
    assert abs(exp.extras["efficiency_gap"][0][0]) < 1e-4 + 1e-3 * abs(delta)


# ----- every method on every architecture -----------------------------------------------------
@pytest.mark.parametrize("method", sorted(CHEAP))
def test_runs_on_every_architecture(method, any_vlm, images):
    vlm = any_vlm
    inputs = vlm.prepare(images[0], _prompts(vlm)[0])
    target = Similarity() if vlm.contrastive else None
    exp = CHEAP[method]()(vlm, inputs, target)
    assert exp.method == method
    grid = inputs.image_spans[0][0].grid
    assert exp.image_scores[0][0].shape == (1, *grid)
    assert exp.text_scores[0].shape == (1, len(inputs.prompt_tokens[0]))
    assert np.isfinite(_flat(exp)).all() and np.abs(_flat(exp)).max() > 0


@pytest.mark.parametrize("method", sorted(CHEAP))
def test_batch_of_two_equals_each_alone(method, any_vlm, images):
    vlm = any_vlm
    prompts = list(_prompts(vlm))
    both = CHEAP[method]()(vlm, vlm.prepare(images, prompts))
    for b in range(2):
        alone = CHEAP[method]()(vlm, vlm.prepare(images[b], prompts[b]))
        np.testing.assert_allclose(_flat(both, b), _flat(alone), rtol=2e-3, atol=2e-5)


@pytest.mark.parametrize("method", sorted(CHEAP))
def test_generated_target_gives_a_map_per_token(method, tiny_llava, images):
    inputs = tiny_llava.prepare(images[0], PROMPTS[0])
    exp = CHEAP[method]()(tiny_llava, inputs, Generated(3))
    assert len(exp.labels[0]) == 3
    assert exp.image_scores[0][0].shape == (3, 4, 4)
    assert exp.text_scores[0].shape == (3, len(inputs.prompt_tokens[0]))
    outputs = [_flat(exp, output=j) for j in range(3)]
    assert not np.allclose(outputs[0], outputs[1]) and not np.allclose(outputs[1], outputs[2])


def test_generated_maps_are_each_outputs_own(tiny_llava, images):
    """Output j of a Generated(3) map is the map of the teacher-forced token j alone."""
    inputs = tiny_llava.prepare(images[0], PROMPTS[0])
    bound = Generated(3).bind(tiny_llava, inputs)
    maps = Occlusion().attribute(tiny_llava, bound)
    for j in range(3):
        one = BoundTarget(bound.inputs, (("t",),), lambda out, j=j: bound(out)[:, j : j + 1])
        torch.testing.assert_close(
            _vector(Occlusion().attribute(tiny_llava, one))[0], _vector(maps)[j]
        )


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: Occlusion(window=0), "window"),
        (lambda: Occlusion(stride=-1), "stride"),
        (lambda: Occlusion(window=1.5), "window"),
        (lambda: Occlusion(batch_size=0), "batch_size"),
        (lambda: Occlusion(fill=float("nan")), "fill"),
        (lambda: RISE(masks=0), "masks"),
        (lambda: RISE(cells=0), "cells"),
        (lambda: RISE(p=0), "p must"),
        (lambda: RISE(p=1.5), "p must"),
        (lambda: RISE(seed=-1), "seed"),
        (lambda: RISE(seed="a"), "seed"),
        (lambda: LIME(samples=0), "samples"),
        (lambda: LIME(alpha=-1), "alpha"),
        (lambda: LIME(kernel_width=0), "kernel_width"),
        (lambda: KernelSHAP(samples=True), "samples"),
        (lambda: KernelSHAP(seed=1.0), "seed"),
    ],
)
def test_bad_settings_raise(make, match):
    with pytest.raises(InputError, match=match):
        make()
