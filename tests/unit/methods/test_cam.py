"""CAM family: Grad-CAM, HiResCAM, Grad-CAM++, Score-CAM, gScore-CAM on a vision-tower layer."""

from dataclasses import replace

import numpy as np
import pytest
import torch
from captum.attr import LayerGradCam

from mmscope.core.errors import InputError
from mmscope.core.hooks import capture, patch
from mmscope.core.registry import REGISTRY
from mmscope.core.state import model_state
from mmscope.core.targets import Generated, Predicted, Similarity
from mmscope.methods.attribution.cam import (
    CAM,
    GradCAM,
    GradCAMPlusPlus,
    GScoreCAM,
    HiResCAM,
    ScoreCAM,
    activations,
    masked_scores,
)

SITE = "vision.layer[-1]"
ALL = [GradCAM, HiResCAM, GradCAMPlusPlus, ScoreCAM, GScoreCAM]


@pytest.fixture(scope="module")
def images():
    from mmscope.world import render, sample_scenes

    return [render(s, 48).image for s in sample_scenes(2, 5)]


def _prompt(vlm, i=0):
    if vlm.contrastive:
        return ["a red circle", "two blue squares here"][i]
    return ["what color is the circle ?", "how many squares ?"][i]


def _with_pixels(inputs, pixels):
    return replace(inputs, tensors={**inputs.tensors, "pixel_values": pixels})


def _llava_layer(vlm, bound, site=SITE):
    """By hand: the LLaVA layer's patch grid (class token dropped) and d score / d it."""
    pixels = bound.inputs.pixel_values.clone().requires_grad_(True)
    with torch.enable_grad(), capture(vlm, site, grads=True) as cap:
        out = bound(vlm.forward(_with_pixels(bound.inputs, pixels)))
        torch.autograd.grad(out.sum(), pixels)
    value, grad = cap[site], cap.grad(site)
    rows, cols = bound.inputs.image_spans[0][0].grid
    grid = value[0, 1:].reshape(rows, cols, -1).detach()
    return grid, grad[0, 1:].reshape(rows, cols, -1)


def test_registered_in_the_cam_family():
    for key, cls in [
        ("grad_cam", GradCAM),
        ("hires_cam", HiResCAM),
        ("grad_cam_pp", GradCAMPlusPlus),
        ("score_cam", ScoreCAM),
        ("gscore_cam", GScoreCAM),
    ]:
        entry = REGISTRY.get(key)
        assert entry.obj is cls and entry.family == "attribution/cam" and entry.paper
        assert issubclass(cls, CAM)


def test_grad_cam_matches_captum_layer_grad_cam(tiny_llava, images):
    """captum's LayerGradCam needs a (N, C, H, W) layer: an identity module that the patch
    routes the patches through. The patch is at vision.layer[-2]: LLaVA reads the last layer
    from transformers' recorded hidden states, which a patch of vision.layer[-1] cannot change."""
    vlm, site = tiny_llava, "vision.layer[-2]"
    bound = Predicted().bind(vlm, vlm.prepare(images[0], _prompt(vlm)))
    rows, cols = bound.inputs.image_spans[0][0].grid
    grid_layer = torch.nn.Identity()  # captum hooks this: the layer's patches as (1, C, H, W)

    def through_grid(out):
        grid = out[:, 1:].reshape(1, rows, cols, -1).permute(0, 3, 1, 2)
        patches = grid_layer(grid).permute(0, 2, 3, 1).reshape(1, rows * cols, -1)
        return torch.cat([out[:, :1], patches], dim=1)

    def forward(pixels):
        with patch(vlm, {site: through_grid}):
            return bound(vlm.forward(_with_pixels(bound.inputs, pixels)))[:, 0]

    theirs = (
        LayerGradCam(forward, grid_layer)
        .attribute(bound.inputs.pixel_values, relu_attributions=False)[0, 0]
        .detach()
    )
    assert (theirs > 0).any() and (theirs < 0).any()  # the ReLU matters here
    ours = GradCAM(layer=site)(vlm, bound.inputs, Predicted()).image_scores[0][0][0]
    np.testing.assert_allclose(ours, torch.relu(theirs).numpy(), rtol=1e-4, atol=1e-7)
    # by hand at the default layer: weights = the spatial mean of the gradient
    act, grad = _llava_layer(vlm, bound)
    hand = torch.relu((act * grad.mean((0, 1))).sum(-1))
    assert (hand > 0).any()
    default = GradCAM()(vlm, bound.inputs, Predicted()).image_scores[0][0][0]
    np.testing.assert_allclose(default, hand.numpy(), rtol=1e-4, atol=1e-7)


def test_hires_cam_is_relu_of_grad_times_activation(tiny_llava, images):
    vlm = tiny_llava
    inputs = vlm.prepare(images[1], _prompt(vlm, 1))
    bound = Predicted().bind(vlm, inputs)
    act, grad = _llava_layer(vlm, bound)
    hand = torch.relu((grad * act).sum(-1))
    ours = HiResCAM()(vlm, inputs, Predicted()).image_scores[0][0][0]
    assert (hand > 0).any()
    np.testing.assert_allclose(ours, hand.numpy(), rtol=1e-4, atol=1e-8)
    # it differs from Grad-CAM (elementwise, not a spatially pooled weight)
    assert not np.allclose(ours, GradCAM()(vlm, inputs, Predicted()).image_scores[0][0][0])


def test_grad_cam_pp_weights_on_a_constructed_case():
    act = torch.zeros(2, 2, 3)
    grad = torch.zeros(1, 2, 2, 3)
    act[..., 0] = 1.0  # sum 4;  one gradient of 1: a = 1 / (2 + 4) -> w = 1/6
    grad[0, 0, 0, 0] = 1.0
    act[..., 1] = 0.125  # sum 0.5; two gradients of 2: a = 4 / (8 + 0.5 * 8) = 1/3 -> w = 4/3
    grad[0, 0, :, 1] = 2.0
    act[..., 2] = 1.0  # negative gradients: ReLU -> 0
    grad[0, ..., 2] = -1.0
    (w,) = GradCAMPlusPlus().weights(None, None, [act], [grad])  # type: ignore[arg-type]
    np.testing.assert_allclose(w[0].numpy(), [1 / 6, 4 / 3, 0.0], rtol=1e-5)


def test_grad_cam_pp_matches_pytorch_grad_cam_formula(tiny_llava, images):
    vlm = tiny_llava
    inputs = vlm.prepare(images[0], _prompt(vlm))
    bound = Predicted().bind(vlm, inputs)
    act, grad = _llava_layer(vlm, bound)
    # pytorch-grad-cam's GradCAMPlusPlus.get_cam_weights, (batch, C, H, W) numpy arrays
    a = act.permute(2, 0, 1)[None].numpy().astype(np.float64)
    g = grad.permute(2, 0, 1)[None].numpy().astype(np.float64)
    g2, g3 = g**2, g**3
    aij = g2 / (2 * g2 + a.sum(axis=(2, 3))[:, :, None, None] * g3 + 0.000001)
    aij = np.where(g != 0, aij, 0)
    weights = np.sum(np.maximum(g, 0) * aij, axis=(2, 3))
    cam = np.maximum((weights[:, :, None, None] * a).sum(1), 0)[0]
    acts, grads = activations(vlm, bound, SITE)
    (ours,) = GradCAMPlusPlus().weights(vlm, bound, acts, grads)
    assert (weights > 0).sum() > 3
    np.testing.assert_allclose(ours[0].numpy(), weights[0], rtol=1e-3, atol=1e-9)
    maps = GradCAMPlusPlus()(vlm, inputs, Predicted()).image_scores[0][0][0]
    np.testing.assert_allclose(maps, cam, rtol=1e-3, atol=1e-7)


def test_score_cam_weights_match_a_loop_of_single_masked_forwards(tiny_llava, images):
    vlm = tiny_llava
    bound = Predicted().bind(vlm, vlm.prepare(images[0], _prompt(vlm)))
    act, _ = _llava_layer(vlm, bound)
    pixels = bound.inputs.pixel_values
    side = pixels.shape[-1] // act.shape[0]

    def score(p):
        with torch.no_grad():
            return float(bound(vlm.forward(_with_pixels(bound.inputs, p)))[0, 0])

    baseline = score(torch.zeros_like(pixels))  # all masked: the processor's mean colour
    increases = []
    for c in range(act.shape[-1]):
        m = act[..., c]
        keep = (m - m.min()) / (m.max() - m.min() + 1e-8)
        up = keep.repeat_interleave(side, 0).repeat_interleave(side, 1)
        increases.append(score(pixels * up) - baseline)
    hand = torch.softmax(torch.tensor(increases), 0)
    acts, _ = activations(vlm, bound, SITE, with_grads=False)
    for batch_size in (1, 7):  # unbatched, and chunks of 7 copies
        (w,) = ScoreCAM(batch_size=batch_size).weights(vlm, bound, acts, None)
        np.testing.assert_allclose(w[0].numpy(), hand.numpy(), rtol=1e-4, atol=1e-6)
    ours = ScoreCAM()(vlm, bound.inputs, Predicted()).image_scores[0][0][0]
    np.testing.assert_allclose(ours, torch.relu((act * hand).sum(-1)).numpy(), rtol=1e-4, atol=1e-7)


def test_masked_scores_mask_one_image_of_an_item_at_a_time(tiny_qwen2_vl, images):
    vlm = tiny_qwen2_vl
    bound = Predicted().bind(vlm, vlm.prepare(images, "compare these ?"))
    grids = [s.grid for s in vlm.flat_spans(bound.inputs)]
    assert len(grids) == 2
    gen = torch.Generator().manual_seed(0)
    masks = [torch.rand((n, *g), generator=gen) for n, g in zip((3, 2), grids)]
    got = masked_scores(vlm, bound, masks, batch_size=2)
    for j in range(2):
        for t in range(len(masks[j])):
            keep = [masks[j][t] if i == j else torch.ones(grids[i]) for i in range(2)]
            pixels = vlm.mask_pixels(bound.inputs.pixel_values, bound.inputs, torch.stack(keep))
            with torch.no_grad():
                want = bound(vlm.forward(_with_pixels(bound.inputs, pixels)))[0]
            torch.testing.assert_close(got[j][t], want, rtol=1e-5, atol=1e-5)


def test_gscore_cam_is_score_cam_over_the_top_gradient_channels(tiny_llava, images):
    vlm = tiny_llava
    bound = Generated(3).bind(vlm, vlm.prepare(images[0], _prompt(vlm)))
    acts, grads = activations(vlm, bound, SITE)
    (full,) = ScoreCAM().weights(vlm, bound, acts, None)
    (same,) = GScoreCAM(channels=10_000).weights(vlm, bound, acts, grads)
    torch.testing.assert_close(same, full)
    (w,) = GScoreCAM(channels=4).weights(vlm, bound, acts, grads)
    assert grads is not None
    for k in range(3):
        top = grads[0][k].mean((0, 1)).topk(4).indices
        assert set(torch.nonzero(w[k]).flatten().tolist()) == set(top.tolist())
        torch.testing.assert_close(w[k, top], full[k, top] / full[k, top].sum())


@pytest.mark.parametrize("method", ALL)
def test_runs_on_every_architecture(method, any_vlm, images):
    vlm = any_vlm
    inputs = vlm.prepare(images[0], _prompt(vlm))
    target = Similarity() if vlm.contrastive else Predicted()
    before = model_state(vlm.model)
    e = method()(vlm, inputs, target)
    assert model_state(vlm.model) == before
    (views,) = e.image_scores  # one map per view (one view, or the tiles of a tiled image)
    with torch.no_grad(), capture(vlm, vlm.CAM_SITE) as cap:  # CAMs map the tower's own grid
        vlm.forward(inputs)
    grids = vlm.vision_grid(cap[vlm.CAM_SITE], inputs)
    assert len(views) == len(grids) == len(inputs.image_spans[0])
    for scores, grid in zip(views, grids):
        assert scores.shape == (1, *grid.shape[:2])
        assert np.isfinite(scores).all() and (scores >= 0).all()
    assert e.text_scores[0].shape == (1, len(inputs.prompt_tokens[0]))
    assert not e.text_scores[0].any()
    assert e.extras["layer"] == vlm.CAM_SITE
    assert REGISTRY.get(e.method).obj is method


@pytest.mark.parametrize("method", [GradCAM, HiResCAM, GradCAMPlusPlus])
def test_clip_last_block_patches_get_no_gradient_but_the_one_before_does(method, tiny_clip, images):
    inputs = tiny_clip.prepare(images[0], "a red circle")
    last = method(layer="vision.layer[-1]")(tiny_clip, inputs, Similarity())
    assert not last.image_scores[0][0].any()  # only the class token is pooled after it
    acts, grads = activations(tiny_clip, Similarity().bind(tiny_clip, inputs), "vision.layer[-2]")
    assert grads is not None and grads[0].abs().sum() > 0


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("family", ["tiny_llava", "tiny_clip", "tiny_qwen2_vl"])
def test_a_batch_of_two_equals_each_alone(method, family, images, request):
    vlm = request.getfixturevalue(family)
    prompts = [_prompt(vlm, 0), _prompt(vlm, 1)]
    target = Similarity() if vlm.contrastive else Predicted()
    m = method(channels=4) if method is GScoreCAM else method()
    both = m(vlm, vlm.prepare(images, prompts), target)
    for b in range(2):
        alone = m(vlm, vlm.prepare(images[b], prompts[b]), target)
        np.testing.assert_allclose(
            both.image_scores[b][0], alone.image_scores[0][0], rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("method", ALL)
@pytest.mark.parametrize("family", ["tiny_llava", "tiny_qwen2_vl"])
def test_generated_tokens_get_one_map_each(method, family, images, request):
    vlm = request.getfixturevalue(family)
    inputs = vlm.prepare(images[0], _prompt(vlm))
    site = vlm.CAM_SITE  # Qwen2-VL's: the block before the merger's layer norm
    m = method(layer=site, channels=4) if method is GScoreCAM else method(layer=site)
    e = m(vlm, inputs, Generated(3))
    assert len(e.labels[0]) == 3
    maps = e.image_scores[0][0]
    assert maps.shape[0] == 3
    if issubclass(method, ScoreCAM):  # softmax weights are positive: the maps themselves
        raw = torch.from_numpy(maps)
    else:  # the gradient maps before the ReLU, which may zero two of them alike
        bound = Generated(3).bind(vlm, inputs)
        acts, grads = activations(vlm, bound, site)
        assert grads is not None
        if method is HiResCAM:
            raw = (grads[0] * acts[0]).sum(-1)
        else:
            (w,) = m.weights(vlm, bound, acts, grads)
            raw = torch.einsum("kc,rwc->krw", w, acts[0])
        np.testing.assert_allclose(maps, torch.relu(raw).numpy(), rtol=1e-4, atol=1e-7)
    assert raw.abs().max() > 0
    for i in range(3):
        for j in range(i):
            assert (raw[i] - raw[j]).abs().max() > 1e-5 * raw.abs().max()


@pytest.mark.parametrize("method", [GradCAM, ScoreCAM])
def test_a_shorter_answer_leaves_its_extra_outputs_at_zero(method, tiny_qwen2_vl, images):
    vlm = tiny_qwen2_vl
    inputs = vlm.prepare(images, [_prompt(vlm, 0), _prompt(vlm, 1)])
    bound = Generated(3).bind(vlm, inputs)
    full = method().attribute(vlm, bound).image
    short = replace(bound, labels=(bound.labels[0], bound.labels[1][:1]))  # item 1 stopped
    maps = method().attribute(vlm, short).image
    torch.testing.assert_close(maps[0], full[0])
    torch.testing.assert_close(maps[1][:1], full[1][:1])
    assert full[1][1:].any() and not maps[1][1:].any()


@pytest.mark.parametrize(
    "layer", ["lm.layer[0]", "projector", "vision.layer", "vision.layer[99]", "vision.nope[0]"]
)
def test_a_bad_layer_raises_input_error(layer, tiny_llava, images):
    inputs = tiny_llava.prepare(images[0], _prompt(tiny_llava))
    with pytest.raises(InputError):
        GradCAM(layer=layer)(tiny_llava, inputs)


def test_a_layer_that_is_not_a_patch_grid_raises_input_error(tiny_clip, images):
    inputs = tiny_clip.prepare(images[0], "a red circle")
    with pytest.raises(InputError, match="patch grid"):
        ScoreCAM(layer="vision.norm")(tiny_clip, inputs)  # the pooled class token only


@pytest.mark.parametrize(
    "make",
    [
        lambda: ScoreCAM(batch_size=0),
        lambda: GScoreCAM(channels=0),
        lambda: GScoreCAM(channels=2.5),
        lambda: GradCAM(layer=3),
        lambda: HiResCAM(layer="vision.layer[0][1]"),
    ],
)
def test_bad_settings_raise_input_error(make):
    with pytest.raises(InputError):
        make()
