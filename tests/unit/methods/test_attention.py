"""Attention attributions: raw attention, rollout and Chefer relevance against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import mmscope.methods  # noqa: F401  (registers the methods)
from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.hooks import capture
from mmscope.core.registry import REGISTRY
from mmscope.core.targets import BoundTarget, Generated, Predicted, Similarity
from mmscope.methods.attribution.attention import (
    AttentionRollout,
    CheferRelevance,
    RawAttention,
    split,
)
from mmscope.world import render, sample_scenes

QUESTIONS = ["what color is the circle ?", "is there a red square left of the circle ?"]
METHODS = [RawAttention, AttentionRollout, CheferRelevance]


@pytest.fixture(scope="module")
def images():
    scenes = sample_scenes(2, 3)
    return [render(s, 48).image for s in scenes]


def _probs(vlm, inputs, stack):
    sites = [f"{stack}[{i}].attn.probs" for i in range(vlm.num_layers(stack))]
    with torch.no_grad(), capture(vlm, sites) as cap:
        vlm.forward(inputs)
    return [cap[s] for s in sites]


def _last_real(mask):
    return mask.shape[1] - 1 - mask.flip(-1).argmax(-1)


def test_registered_with_family():
    for key, cls in [
        ("raw_attention", RawAttention),
        ("attention_rollout", AttentionRollout),
        ("chefer_relevance", CheferRelevance),
    ]:
        entry = REGISTRY.get(key)
        assert entry.obj is cls and entry.family == "attribution/attention" and entry.paper


def test_raw_attention_one_layer_and_head_is_the_captured_entries(tiny_llava, images):
    vlm = tiny_llava
    inputs = vlm.prepare(images[0], QUESTIONS[0])
    probs = _probs(vlm, inputs, "lm.layer")
    q = inputs.input_ids.shape[1] - 1  # Predicted() reads the last position
    span, (p0, p1) = inputs.image_spans[0][0], inputs.prompt_spans[0]
    for layer, head in [(1, 1), (-1, -1), (0, 0)]:
        e = RawAttention(layer=layer, head=head)(vlm, inputs, Predicted())
        a = probs[layer][0, head, q]
        # the layers not read run SDPA: equal to the all-eager capture up to rounding
        torch.testing.assert_close(
            torch.from_numpy(e.image_scores[0][0][0]), a[span.start : span.end].reshape(span.grid)
        )
        torch.testing.assert_close(torch.from_numpy(e.text_scores[0][0]), a[p0:p1])
        assert e.extras["total"][0][0] == pytest.approx(1.0, abs=1e-5)  # a softmax row
    e = RawAttention(layer="mean", head="mean")(vlm, inputs)
    mean = torch.stack(probs).mean((0, 2))[0, q]
    np.testing.assert_allclose(e.text_scores[0][0], mean[p0:p1].numpy(), rtol=1e-5, atol=1e-7)
    e = RawAttention(layer=0, head="max")(vlm, inputs)
    np.testing.assert_allclose(e.text_scores[0][0], probs[0][0, :, q, p0:p1].amax(0).numpy())


def test_raw_attention_clip_reads_class_token_and_end_of_text(tiny_clip, images):
    vlm = tiny_clip
    inputs = vlm.prepare(images[0], "a red circle")
    vision, text = _probs(vlm, inputs, "vision.layer"), _probs(vlm, inputs, "text.layer")
    e = RawAttention(layer=1, head=0)(vlm, inputs)
    expect = vision[1][0, 0, 0, 1:].reshape(4, 4)
    # layer 0 runs SDPA when only layer 1 is read: equal up to rounding
    torch.testing.assert_close(torch.from_numpy(e.image_scores[0][0][0]), expect)
    eot = int(_last_real(inputs.attention_mask)[0])
    p0, p1 = inputs.prompt_spans[0]
    torch.testing.assert_close(torch.from_numpy(e.text_scores[0][0]), text[1][0, 0, eot, p0:p1])


def _numpy_rollout(probs, fusion="mean", start=0):
    stack = [p.double().numpy() for p in probs[start:]]
    t = stack[0].shape[-1]
    rollout = np.broadcast_to(np.eye(t), stack[0].shape[:1] + (t, t)).copy()
    for a in stack:
        m = 0.5 * getattr(a, fusion)(axis=1) + 0.5 * np.eye(t)
        rollout = (m / m.sum(-1, keepdims=True)) @ rollout
    return rollout


@pytest.mark.parametrize("fusion,start", [("mean", 0), ("max", 1)])
def test_rollout_equals_numpy(tiny_llava, images, fusion, start):
    vlm = tiny_llava
    inputs = vlm.prepare(images[0], QUESTIONS[0])
    rollout = _numpy_rollout(_probs(vlm, inputs, "lm.layer"), fusion, start)
    np.testing.assert_allclose(rollout.sum(-1), 1.0, atol=1e-9)  # rows sum to 1 before splitting
    e = AttentionRollout(head=fusion, start_layer=start)(vlm, inputs, Predicted())
    row = rollout[0, inputs.input_ids.shape[1] - 1]
    span, (p0, p1) = inputs.image_spans[0][0], inputs.prompt_spans[0]
    np.testing.assert_allclose(
        e.image_scores[0][0][0], row[span.start : span.end].reshape(span.grid), rtol=1e-5
    )
    np.testing.assert_allclose(e.text_scores[0][0], row[p0:p1], rtol=1e-5)
    assert e.extras["total"][0][0] == pytest.approx(1.0, abs=1e-5)
    assert 0 < e.extras["image_mass"][0][0] + e.extras["prompt_mass"][0][0] < 1
    assert (e.image_scores[0][0] >= 0).all() and (e.text_scores[0] >= 0).all()


def _chefer_reference(vlm, bound, stacks):
    """Keep every layer's A and dA; one backward per output; R = I, R += Abar R in order."""
    sites = {s: [f"{s}[{i}].attn.probs" for i in range(vlm.num_layers(s))] for s in stacks}
    with capture(vlm, [x for xs in sites.values() for x in xs], detach=False) as cap:
        scores = bound(vlm.forward(bound.inputs))
    out = {s: [] for s in stacks}
    for j in range(scores.shape[1]):
        for s in stacks:
            maps = [cap[x] for x in sites[s]]
            grads = torch.autograd.grad(scores[:, j].sum(), maps, retain_graph=True)
            eye = torch.eye(maps[0].shape[-1])
            r = eye.expand_as(maps[0][:, 0]).clone()
            for a, g in zip(maps, grads):
                r = r + (g * a).clamp(min=0).mean(1) @ r
            out[s].append(r - eye)
    return {s: torch.stack(v).detach() for s, v in out.items()}  # (k, batch, T, T)


@pytest.mark.parametrize(
    "name,target", [("tiny_llava", Generated(3)), ("tiny_qwen2_vl", Predicted())]
)
def test_chefer_equals_reference_decoders(request, images, name, target):
    vlm = request.getfixturevalue(name)
    inputs = vlm.prepare(images[0], QUESTIONS[0])
    bound = target.bind(vlm, inputs)
    ref = _chefer_reference(vlm, bound, ["lm.layer"])["lm.layer"]
    e = CheferRelevance()(vlm, inputs, target)
    span, (p0, p1) = inputs.image_spans[0][0], inputs.prompt_spans[0]
    assert e.image_scores[0][0].shape == (bound.k, *span.grid)
    for j, pos in enumerate(bound.positions):
        row = ref[j, 0, list(pos)].mean(0)
        torch.testing.assert_close(
            torch.from_numpy(e.image_scores[0][0][j]),
            row[span.start : span.end].reshape(span.grid),
            rtol=1e-4,
            atol=1e-7,
        )
        torch.testing.assert_close(
            torch.from_numpy(e.text_scores[0][j]), row[p0:p1], rtol=1e-4, atol=1e-7
        )
        # R - I: the query's own identity entry is not counted in the total
        assert e.extras["total"][0][j] == pytest.approx(float(row.sum()), rel=1e-4)
    assert (e.image_scores[0][0] >= 0).all() and e.image_scores[0][0].sum() > 0


def test_chefer_equals_reference_clip(tiny_clip, images):
    vlm = tiny_clip
    inputs = vlm.prepare(images[0], "a red circle")
    ref = _chefer_reference(vlm, Similarity().bind(vlm, inputs), ["vision.layer", "text.layer"])
    e = CheferRelevance()(vlm, inputs)
    torch.testing.assert_close(
        torch.from_numpy(e.image_scores[0][0][0]),
        ref["vision.layer"][0, 0, 0, 1:].reshape(4, 4),
        rtol=1e-4,
        atol=1e-7,
    )
    eot = int(_last_real(inputs.attention_mask)[0])
    p0, p1 = inputs.prompt_spans[0]
    torch.testing.assert_close(
        torch.from_numpy(e.text_scores[0][0]),
        ref["text.layer"][0, 0, eot, p0:p1],
        rtol=1e-4,
        atol=1e-7,
    )


def test_chefer_needs_no_trainable_weights(images):
    from mmscope.toys.tiny import tiny_llava

    trainable, frozen = tiny_llava(), tiny_llava()
    frozen.model.requires_grad_(False)
    inputs = trainable.prepare(images[0], QUESTIONS[0])
    a, b = CheferRelevance()(trainable, inputs), CheferRelevance()(frozen, inputs)
    np.testing.assert_allclose(a.image_scores[0][0], b.image_scores[0][0], rtol=1e-5)
    assert a.image_scores[0][0].sum() > 0


@pytest.mark.parametrize("method", METHODS)
def test_every_adapter_gives_image_maps_and_word_scores(any_vlm, images, method, lacks):
    vlm = any_vlm
    inputs = vlm.prepare(images[0], "a red circle" if vlm.contrastive else QUESTIONS[0])
    before = vlm.model.config._attn_implementation
    if lacks(vlm, method().key):  # images behind cross-attention (Mllama): no query row to them
        with pytest.raises(NotApplicableError, match="not behind cross-attention"):
            method()(vlm, inputs)
        return
    e = method()(vlm, inputs)
    assert vlm.model.config._attn_implementation == before
    for scores, span in zip(e.image_scores[0], inputs.image_spans[0], strict=True):
        assert scores.shape == (1, *span.grid)  # one map per view of a tiled image
    assert e.text_scores[0].shape == (1, len(inputs.prompt_tokens[0]))
    image = np.concatenate([m.ravel() for m in e.image_scores[0]])  # all the image's views
    for arr in (image, e.text_scores[0]):
        assert np.isfinite(arr).all() and (arr >= 0).all() and arr.sum() > 0


@pytest.mark.parametrize("name", ["tiny_llava", "tiny_qwen2_vl"])
def test_batch_with_left_padding_equals_each_alone(request, images, name):
    vlm = request.getfixturevalue(name)
    batch = vlm.prepare(images, QUESTIONS)
    mask = batch.attention_mask
    assert (mask[0] == 0).any()  # the shorter question is left-padded
    bound = Predicted().bind(vlm, batch)
    alone = [Predicted().bind(vlm, vlm.prepare(images[b], QUESTIONS[b])) for b in range(2)]
    assert [a.labels[0] for a in alone] == list(bound.labels)
    for method in (RawAttention(layer="mean"), AttentionRollout(), CheferRelevance()):
        inputs, rows = method.rows(vlm, bound)
        assert (rows[0][:, mask == 0] == 0).all()  # padded keys get no relevance
        maps = split(vlm, bound, inputs, rows)
        for b in range(2):
            single = method.attribute(vlm, alone[b])
            torch.testing.assert_close(maps.image[b], single.image[0], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(maps.text[b], single.text[0], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("texts", [["a red circle"], ["a red circle", "a big blue square on top"]])
def test_clip_batch_equals_each_alone(tiny_clip, images, texts):
    vlm = tiny_clip
    batch = vlm.prepare(images, texts)
    assert len(texts) == 1 or (batch.attention_mask == 0).any()  # texts of different lengths
    for method in METHODS:
        e = method()(vlm, batch)
        assert len(e.text_scores) == 2  # one per image, a shared text included
        for b in range(2):
            single = method()(vlm, vlm.prepare(images[b], texts[b % len(texts)]))
            np.testing.assert_allclose(
                e.image_scores[b][0], single.image_scores[0][0], rtol=1e-4, atol=1e-6
            )
            np.testing.assert_allclose(
                e.text_scores[b], single.text_scores[0], rtol=1e-4, atol=1e-6
            )


def test_generated_gives_one_map_per_output(tiny_llava, images):
    vlm = tiny_llava
    inputs = vlm.prepare(images[0], QUESTIONS[0])
    bound = Generated(3).bind(vlm, inputs)
    probs = _probs(vlm, bound.inputs, "lm.layer")
    span, (p0, p1) = inputs.image_spans[0][0], inputs.prompt_spans[0]
    for method in METHODS:
        e = method()(vlm, inputs, Generated(3))
        assert len(e.labels[0]) == 3
        assert e.image_scores[0][0].shape == (3, *span.grid) and e.text_scores[0].shape == (
            3,
            p1 - p0,
        )
        assert not np.allclose(e.text_scores[0][0], e.text_scores[0][2])  # its own row per output
    e = RawAttention(layer=-1, head=0)(vlm, inputs, Generated(3))
    for j, (q,) in enumerate(bound.positions):
        assert torch.equal(torch.from_numpy(e.text_scores[0][j]), probs[-1][0, 0, q, p0:p1])


def test_outputs_past_an_items_count_are_zero(tiny_llava, images):
    vlm = tiny_llava
    inputs = vlm.prepare(images, QUESTIONS)
    q = inputs.input_ids.shape[1] - 1
    bound = BoundTarget(
        inputs, (("a", "b"), ("a",)), lambda out: out.logits[:, -1, :2], ((q,), (q,))
    )
    inputs2, rows = RawAttention().rows(vlm, bound)
    maps = split(vlm, bound, inputs2, rows)
    assert maps.image[0][1].sum() > 0 and maps.image[1][0].sum() > 0
    assert (maps.image[1][1] == 0).all() and (maps.text[1][1] == 0).all()


def test_bad_settings_raise(tiny_llava, images):
    for make in (
        lambda: RawAttention(layer="last"),
        lambda: RawAttention(layer=True),
        lambda: RawAttention(head="sum"),
        lambda: RawAttention(head=1.5),
        lambda: AttentionRollout(residual=1.0),
        lambda: AttentionRollout(residual=-0.1),
        lambda: AttentionRollout(start_layer=-1),
        lambda: CheferRelevance(start_layer="1"),
    ):
        with pytest.raises(InputError):
            make()
    inputs = tiny_llava.prepare(images[0], QUESTIONS[0])
    for method in (
        RawAttention(layer=2),
        RawAttention(layer=-3),
        RawAttention(head=2),
        AttentionRollout(start_layer=2),
        CheferRelevance(start_layer=5),
    ):
        with pytest.raises(InputError):
            method(tiny_llava, inputs)
    with pytest.raises(InputError, match="no query positions"):
        RawAttention().attribute(tiny_llava, BoundTarget(inputs, (("x",),), lambda o: o, ()))


def test_chefer_outputs_taken_a_few_at_a_time_equal_all_at_once(tiny_llava, images):
    from mmscope.core.targets import Generated
    from mmscope.methods.attribution.attention import CheferRelevance

    inputs = tiny_llava.prepare(images[0], "what color is the circle ?")
    together = CheferRelevance()(tiny_llava, inputs, Generated(3))
    one_by_one = CheferRelevance(outputs_per_pass=1)(tiny_llava, inputs, Generated(3))
    pairs = CheferRelevance(outputs_per_pass=2)(tiny_llava, inputs, Generated(3))
    assert together.image_scores[0][0].shape[0] == 3
    for other in (one_by_one, pairs):
        np.testing.assert_allclose(other.image_scores[0][0], together.image_scores[0][0], atol=1e-6)
        np.testing.assert_allclose(other.text_scores[0], together.text_scores[0], atol=1e-6)
