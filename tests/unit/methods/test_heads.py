"""Head importance: equal to a head zeroed by hand (at the hook site and in the weights of a
copy), the gradient equal to a finite difference of the head's scale, batching, the top heads'
attention, every architecture, and the model left as found."""

import copy
import json

import numpy as np
import pytest
import torch

from mmscope.core.errors import InputError
from mmscope.core.hooks import capture, patch
from mmscope.core.registry import REGISTRY
from mmscope.core.state import model_state
from mmscope.core.targets import Predicted, TokenId, default_target
from mmscope.methods.analysis import run_scores
from mmscope.methods.layer.heads import HeadImportance, HeadResult
from mmscope.world import render, sample_scenes

PROMPT = "what color is the circle ?"


@pytest.fixture(scope="module")
def images():
    return [render(scene, 48).image for scene in sample_scenes(2, 5)]


def _inputs(vlm, images):
    prompts = ["a red circle", "a blue square"] if vlm.contrastive else [PROMPT] * 2
    return vlm.prepare(images, prompts)


def _target(vlm, inputs):
    """The default target with its tokens frozen (so copies of the model are asked the same)."""
    if vlm.contrastive:
        return default_target(vlm)
    return TokenId(Predicted().token_ids(vlm, inputs))


def _zero_head(heads, h, scale=0.0):
    def fn(x):
        d = x.shape[-1] // heads
        x = x.clone()
        x[..., h * d : (h + 1) * d] *= scale
        return x

    return fn


def test_registered_as_a_layer_level_analysis():
    entry = REGISTRY.get("head_importance", "analysis")
    assert entry.obj is HeadImportance and entry.level == "model/layer"
    assert entry.family == "inside/heads"


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_qwen2_vl", "tiny_clip"])
def test_ablation_equals_zeroing_each_head_by_hand(family, images, request):
    """Qwen2-VL's vision heads are unbatched ``(patches, dim)``: zeroed for both images at
    once by hand, one row per item by the analysis."""
    vlm = request.getfixturevalue(family)
    inputs = _inputs(vlm, images)
    target = _target(vlm, inputs)
    result = HeadImportance()(vlm, inputs, target)
    bound = target.bind(vlm, inputs)
    clean = run_scores(vlm, bound)
    np.testing.assert_allclose(result.clean, clean.numpy(), rtol=1e-6)
    for stack, imp in result.importance.items():
        layers, heads = vlm.num_layers(stack), vlm.num_heads(stack)
        assert imp.shape == (2, layers, heads)
        for layer in range(layers):
            for h in range(heads):
                with patch(vlm, {f"{stack}[{layer}].attn.heads": _zero_head(heads, h)}):
                    drop = clean - run_scores(vlm, bound)
                np.testing.assert_allclose(imp[:, layer, h], drop.numpy(), atol=2e-5)
    assert all(np.abs(imp).max() > 1e-4 for imp in result.importance.values())


def test_mean_fill_replaces_the_head_by_its_mean_over_the_items_positions(tiny_llava, images):
    vlm = tiny_llava
    inputs = vlm.prepare(images, [PROMPT, "what shape is it ?"])  # padded: means skip the pad
    target = _target(vlm, inputs)
    result = HeadImportance(stacks=["lm.layer"], fill="mean")(vlm, inputs, target)
    bound = target.bind(vlm, inputs)
    site, heads, h = "lm.layer[1].attn.heads", vlm.num_heads("lm.layer"), 1
    with capture(vlm, site) as cap:
        clean = run_scores(vlm, bound)
    value, keep = cap[site], inputs.attention_mask.bool()
    d = value.shape[-1] // heads
    sl = slice(h * d, (h + 1) * d)
    means = torch.stack([value[b, keep[b], sl].mean(0) for b in range(2)])

    def fill(x):
        x = x.clone()
        x[:, :, sl] = means[:, None]
        return x

    with patch(vlm, {site: fill}):
        drop = clean - run_scores(vlm, bound)
    np.testing.assert_allclose(result.importance["lm.layer"][:, 1, h], drop.numpy(), atol=2e-5)
    assert result.fill == "mean" and list(result.importance) == ["lm.layer"]


@pytest.mark.parametrize(("family", "stack", "proj"), [
    ("tiny_llava", "lm.layer", "o_proj"), ("tiny_clip", "vision.layer", "out_proj"),
])  # fmt: skip
def test_ablation_equals_zeroing_the_output_projection_columns_of_a_copy(
    family, stack, proj, images, request
):
    vlm = request.getfixturevalue(family)
    inputs = _inputs(vlm, images)
    target = _target(vlm, inputs)
    result = HeadImportance(stacks=[stack])(vlm, inputs, target)
    heads = vlm.num_heads(stack)
    for layer, h in [(0, 0), (1, heads - 1)]:
        model = copy.deepcopy(vlm.model)
        twin = type(vlm)(model, vlm.processor, vlm.name)
        out = twin.resolve(f"{stack}[{layer}].attn.heads")
        assert type(out).__name__ == "Linear" and proj in [n for n, _ in twin.resolve(
            f"{stack}[{layer}].attn").named_children()]  # fmt: skip
        d = out.in_features // heads
        with torch.no_grad():
            out.weight[:, h * d : (h + 1) * d] = 0
        drop = run_scores(vlm, target.bind(vlm, inputs)) - run_scores(
            twin, target.bind(twin, inputs)
        )
        np.testing.assert_allclose(result.importance[stack][:, layer, h], drop.numpy(), atol=2e-5)


def test_gradient_equals_a_finite_difference_of_the_head_scale(tiny_llava, images):
    """|(s(1 + e) - s(1 - e)) / 2e| per item, layer and head, s the answer's log-probability
    (central differences: error O(e^2); e = 1e-2 stays clear of float32 rounding)."""
    twin = tiny_llava
    inputs = _inputs(twin, images)
    target = _target(twin, inputs)
    result = HeadImportance(method="gradient")(twin, inputs, target)
    ids, eps = torch.tensor(target.id), 1e-2

    def score(site, heads, h, scale):
        with torch.no_grad(), patch(twin, {site: _zero_head(heads, h, scale)}):
            logp = torch.log_softmax(twin.forward(inputs).logits[:, -1].double(), -1)
        return logp[torch.arange(2), ids]

    for stack, imp in result.importance.items():
        heads = twin.num_heads(stack)
        for layer in range(twin.num_layers(stack)):
            for h in range(heads):
                site = f"{stack}[{layer}].attn.heads"
                up, down = score(site, heads, h, 1 + eps), score(site, heads, h, 1 - eps)
                fd = ((up - down) / (2 * eps)).abs().numpy()
                np.testing.assert_allclose(imp[:, layer, h], fd, rtol=2e-3, atol=1e-5)
    assert result.method == "gradient" and result.importance["lm.layer"].max() > 1e-3


@pytest.mark.parametrize("family", ["tiny_llava", "tiny_qwen2_vl"])
def test_batched_rows_and_items_equal_single_runs(family, images, request):
    vlm = request.getfixturevalue(family)
    inputs = _inputs(vlm, images)
    target = _target(vlm, inputs)
    many = HeadImportance(batch_size=64)(vlm, inputs, target)
    one = HeadImportance(batch_size=1)(vlm, inputs, target)
    alone = HeadImportance()(vlm, vlm.prepare(images[1], PROMPT), TokenId(target.id[1]))
    for stack in many.importance:
        np.testing.assert_allclose(many.importance[stack], one.importance[stack], atol=1e-5)
        np.testing.assert_allclose(many.importance[stack][1:], alone.importance[stack], atol=1e-4)


def test_top_heads_and_their_attention_over_the_image(tiny_llava, images):
    vlm = tiny_llava
    inputs = _inputs(vlm, images)
    result = HeadImportance(top=3)(vlm, inputs)
    top = result.top_heads(3)
    means = sorted(
        (float(imp[:, i, h].mean()), s, i, h)
        for s, imp in result.importance.items()
        for i in range(imp.shape[1])
        for h in range(imp.shape[2])
    )[::-1][:3]
    assert [(s, i, h) for _, s, i, h in means] == [t[:3] for t in top]
    assert [(p.stack, p.layer, p.head) for p in result.patterns] == [t[:3] for t in top]
    span, last = inputs.image_spans[0][0], inputs.input_ids.shape[1] - 1
    for p in result.patterns:
        with torch.no_grad(), capture(vlm, f"{p.stack}[{p.layer}].attn.probs") as cap:
            vlm.forward(inputs)
        probs = cap[f"{p.stack}[{p.layer}].attn.probs"]
        if p.stack == "lm.layer":
            row, query = probs[:, p.head, last, span.start : span.end], f"position {last}"
        else:  # the vision tower's class token over its patches
            row, query = probs[:, p.head, 0, 1:], "class token"
        assert p.query == query
        for b in range(2):
            np.testing.assert_allclose(p.maps[b], row[b].reshape(span.grid).numpy(), atol=1e-6)


def test_runs_on_every_architecture_and_leaves_the_model_as_found(any_vlm, images, tmp_path):
    inputs = _inputs(any_vlm, images)
    before = model_state(any_vlm.model)
    for method in ("ablation", "gradient"):
        result = HeadImportance(method=method)(any_vlm, inputs)
        assert model_state(any_vlm.model) == before
        assert isinstance(result, HeadResult) and result.clean.shape == (2,)
        expected = (
            ["vision.layer", "text.layer"] if any_vlm.contrastive else ["lm.layer", "vision.layer"]
        )
        # and any other stack with heads (Mllama's global vision layers)
        more = [s for s in any_vlm.LAYER_LISTS if f"{s}.attn.heads" in any_vlm.ROLES]
        expected += [s for s in more if s not in expected]
        assert list(result.importance) == expected
        for stack, imp in result.importance.items():  # NaN at layers without softmax heads
            heads = any_vlm.softmax_layers(stack)
            assert np.isfinite(imp[:, heads]).all()
            assert np.isnan(np.delete(imp, heads, axis=1)).all()
        saved = json.loads(result.save(tmp_path / "result.json").read_text())
        assert list(saved["importance"]) == expected and saved["method"] == method
        assert [tuple(t) for t in saved["top_heads"]] == [tuple(t) for t in result.top_heads()]
        assert len(result.plot().axes) >= len(expected)


@pytest.mark.parametrize(
    "settings",
    [
        {"method": "pruning"},
        {"fill": "noise"},
        {"method": "gradient", "fill": "mean"},
        {"stacks": "lm.layer"},
        {"stacks": []},
        {"top": 0},
        {"batch_size": 0},
    ],  # fmt: skip
)
def test_bad_settings_raise_input_error(settings):
    with pytest.raises(InputError):
        HeadImportance(**settings)


def test_a_stack_without_heads_raises_input_error(tiny_clip, images):
    with pytest.raises(InputError, match="lm.layer"):
        HeadImportance(stacks=["lm.layer"])(tiny_clip, _inputs(tiny_clip, images))


def test_toy_llava_heads_that_read_the_image_look_at_the_evidence(toy_llava):
    """Colour and shape questions answered right. The vision tower's last layer feeds nothing
    (LLaVA reads the layer before it): its heads matter exactly zero. The top language-model
    heads that read the image from the last token put their attention on the evidence object
    (measured: 5.0, 5.5 and 4.9 times the object's share of the grid on three seeds)."""
    from mmscope.methods.token.sets import object_cells
    from mmscope.world.items import world_items

    items = [it for it in world_items(60, seed=7) if it.kind in ("color", "shape")]
    inputs = toy_llava.prepare([it.image for it in items], [it.prompt for it in items])
    with torch.no_grad():
        top = toy_llava.forward(inputs).logits[:, -1].argmax(-1).tolist()
    right = [
        it for it, t in zip(items, top) if toy_llava.tokenizer.decode([t]).strip() == it.answer
    ]
    inputs = toy_llava.prepare([it.image for it in right], [it.prompt for it in right])
    result = HeadImportance(top=12, batch_size=128)(toy_llava, inputs)
    feature = toy_llava.model.config.vision_feature_layer % toy_llava.num_layers("vision.layer")
    unused = result.importance["vision.layer"][:, feature + 1 :]
    assert unused.size and np.all(unused == 0)
    assert np.abs(result.importance["vision.layer"][:, : feature + 1]).max() > 0.1
    ratios = []
    for p in result.patterns:
        maps = [m for m in p.maps if m is not None]
        if p.stack != "lm.layer" or np.mean([m.sum() for m in maps]) < 0.5:
            continue  # a head that reads the prompt, not the image
        for it, m, spans in zip(right, maps, inputs.image_spans):
            cells = object_cells(it.mask, spans[0])
            ratios.append(m[cells].sum() / m.sum() / cells.mean())
    assert len(ratios) >= 3 * len(right)
    assert np.mean(ratios) > 2.0
