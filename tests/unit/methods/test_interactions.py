"""Harsanyi interactions: the transform, the masked forwards and the method on every adapter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from captum.attr import ShapleyValues

import mmscope.methods  # noqa: F401  (registers the methods)
from mmscope.core.errors import InputError
from mmscope.core.hooks import patch
from mmscope.core.registry import REGISTRY
from mmscope.core.targets import Generated, Predicted, Similarity, TokenId
from mmscope.methods.attribution.interactions import (
    Harsanyi,
    log_odds,
    moebius,
    players,
    shapley,
    values,
)

PROMPT = "what color is the circle ?"


def naive_moebius(v: torch.Tensor) -> torch.Tensor:
    """The definition, O(3^n): every subset T of every S, signed by |S| - |T|."""
    n = v.shape[-1].bit_length() - 1
    out = torch.zeros_like(v)
    for s in range(1 << n):
        t = s
        while True:
            sign = (-1) ** (bin(s).count("1") - bin(t).count("1"))
            out[..., s] += sign * v[..., t]
            if t == 0:
                break
            t = (t - 1) & s
    return out


def region_phi(expl, item: int = 0, output: int = 0) -> np.ndarray:
    """The four quadrant values back from a 4x4 map (each quadrant 2x2 patches)."""
    m = expl.image_scores[item][0][output]
    return np.array([m[r : r + 2, c : c + 2].sum() for r in (0, 2) for c in (0, 2)])


@pytest.fixture(scope="module")
def llava_inputs(tiny_llava, scene_image):
    return tiny_llava.prepare(scene_image, PROMPT)


# ----- the transform --------------------------------------------------------------------


@pytest.mark.parametrize("n", range(1, 7))
def test_fast_moebius_equals_the_definition(n):
    v = torch.randn(3, 1 << n, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    before = v.clone()
    assert torch.allclose(moebius(v), naive_moebius(v), atol=1e-12)
    assert torch.equal(v, before)  # the input is left alone


def test_and_of_two_players_is_one_pair_interaction():
    # bit 0 = a, bit 1 = b; v = 1 only when both are present
    assert moebius(torch.tensor([0.0, 0.0, 0.0, 1.0])).tolist() == [0.0, 0.0, 0.0, 1.0]
    # with a third, irrelevant player the pair {a, b} (index 3) is still the only one
    v = torch.tensor([float((t & 3) == 3) for t in range(8)])
    expected = torch.zeros(8)
    expected[3] = 1
    assert torch.equal(moebius(v), expected)
    assert shapley(moebius(v)).tolist() == [0.5, 0.5, 0.0]


def test_additive_v_has_only_singletons():
    w, c = torch.tensor([0.5, -2.0, 3.0]), 0.25
    v = torch.tensor([c + sum(float(w[i]) for i in range(3) if t >> i & 1) for t in range(8)])
    inter = moebius(v)
    assert inter[0] == pytest.approx(c)
    assert inter[[1, 2, 4]].tolist() == pytest.approx(w.tolist())
    assert inter[[3, 5, 6, 7]].abs().max() < 1e-6
    assert shapley(inter).tolist() == pytest.approx(w.tolist())


def test_moebius_needs_a_power_of_two():
    with pytest.raises(InputError):
        moebius(torch.zeros(6))


def test_log_odds_is_stable():
    p = torch.tensor([1e-12, 0.1, 0.5, 0.9, 0.999999], dtype=torch.float64)
    assert log_odds(p.log()).tolist() == pytest.approx((p / (1 - p)).log().tolist(), rel=1e-6)
    top = log_odds(torch.tensor([0.0, -1e-30]))
    assert torch.isfinite(top).all() and top[0] == top[1] > 15


# ----- the masked forwards --------------------------------------------------------------


def test_masked_value_equals_a_hand_built_forward(tiny_llava, llava_inputs):
    bound = Predicted().bind(tiny_llava, llava_inputs)
    (item,) = players(llava_inputs, (2, 2), [1, 4])
    assert item.names == (
        "image0:r0c0",
        "image0:r0c1",
        "image0:r1c0",
        "image0:r1c1",
        "color",
        "circle",
    )
    v = values(tiny_llava, bound, [item], batch_size=16)[0, 0]
    t = 0b100110  # keep r0c1, r1c0 and "circle"; remove r0c0, r1c1 and "color"
    pixels = llava_inputs.pixel_values.clone()  # (1, 3, 32, 32), 4x4 patches of 8 pixels
    pixels[..., :16, :16] = 0  # r0c0: processor's mean colour
    pixels[..., 16:, 16:] = 0  # r1c1
    start = llava_inputs.prompt_spans[0][0]
    hand = type(llava_inputs)(
        **{**vars(llava_inputs), "tensors": {**llava_inputs.tensors, "pixel_values": pixels}}
    )

    def zero_color(out):
        out = out.clone()
        out[:, start + 1] = 0
        return out

    with torch.no_grad(), patch(tiny_llava, {tiny_llava.TEXT_EMBED_SITE: zero_color}):
        expected = bound(tiny_llava.forward(hand)).double()[0, 0]
    assert v[t].item() == pytest.approx(expected.item(), abs=1e-5)
    with torch.no_grad():
        clean = bound(tiny_llava.forward(llava_inputs)).double()[0, 0]
    assert v[-1].item() == pytest.approx(clean.item(), abs=1e-5)
    assert abs(v[t] - v[-1]) > 1e-4  # the mask changes the output


def test_qwen_regions_are_its_merged_cells(tiny_qwen2_vl, scene_image):
    inputs = tiny_qwen2_vl.prepare(scene_image, PROMPT)
    assert inputs.image_spans[0][0].grid == (2, 2)
    bound = Predicted().bind(tiny_qwen2_vl, inputs)
    item = players(inputs, (2, 2), [])
    v = values(tiny_qwen2_vl, bound, item, batch_size=16)[0, 0]
    pixels = inputs.pixel_values.clone()  # (16, 1176): merged cell by merged cell, 4 rows each
    pixels[4:8] = 0  # remove r0c1 only
    hand = type(inputs)(**{**vars(inputs), "tensors": {**inputs.tensors, "pixel_values": pixels}})
    with torch.no_grad():
        expected = bound(tiny_qwen2_vl.forward(hand)).double()[0, 0]
    assert v[0b1101].item() == pytest.approx(expected.item(), abs=1e-5)


# ----- the method -----------------------------------------------------------------------


def test_registered():
    entry = REGISTRY.get("harsanyi")
    assert entry.obj is Harsanyi and entry.family == "attribution/interaction"
    assert entry.level == "model/architecture"


def test_efficiency_on_a_real_model(tiny_llava, llava_inputs):
    expl = Harsanyi(words=[1, 4], top=100)(tiny_llava, llava_inputs)
    (report,) = expl.extras["interactions"][0]
    assert expl.extras["value"] == "log-odds"
    assert len(report["top"]) == 2**6 - 1  # every non-empty S listed
    total = sum(entry["value"] for entry in report["top"])
    bound = Predicted().bind(tiny_llava, llava_inputs)
    with torch.no_grad():
        v_n = log_odds(bound(tiny_llava.forward(llava_inputs)))[0, 0].item()
    assert report["delta"] == pytest.approx(v_n - report["v_empty"], abs=1e-4)
    assert total == pytest.approx(report["delta"], abs=1e-6)
    # the Shapley maps are efficient too: patches + words add up to v(N) - v(empty)
    mass = expl.image_scores[0][0].sum() + expl.text_scores[0].sum()
    assert mass == pytest.approx(report["delta"], abs=1e-5)
    assert abs(report["delta"]) > 1e-4
    # words that are not players score 0; the players do not all
    words = expl.text_scores[0][0]
    assert words[[0, 2, 3, 5]].tolist() == [0, 0, 0, 0] and words[[1, 4]].any()
    # ordered by |I|, sparsity is a share
    sizes = [abs(e["value"]) for e in report["top"]]
    assert sizes == sorted(sizes, reverse=True) and 0 < report["sparsity"] <= 1


def test_shapley_values_match_captum(tiny_llava, llava_inputs):
    expl = Harsanyi(words=[])(tiny_llava, llava_inputs)
    bound = Predicted().bind(tiny_llava, llava_inputs)
    item = players(llava_inputs, (2, 2), [])
    v = log_odds(values(tiny_llava, bound, item)[0, 0])  # 16 subsets of the 4 quadrants

    def game(x: torch.Tensor) -> torch.Tensor:
        index = (x.round().long() * (2 ** torch.arange(4))).sum(1)
        return v[index]

    exact = ShapleyValues(game).attribute(
        torch.ones(1, 4, dtype=torch.float64), baselines=torch.zeros(1, 4, dtype=torch.float64)
    )[0]
    assert region_phi(expl) == pytest.approx(exact.numpy(), abs=1e-5)
    assert np.abs(exact.numpy()).max() > 1e-4
    # each quadrant's value is spread evenly over its 2x2 patches
    m = expl.image_scores[0][0][0]
    assert np.allclose(m[:2, :2], m[0, 0]) and np.allclose(m[2:, 2:], m[3, 3])


def test_runs_on_qwen2_vl(tiny_qwen2_vl, scene_image):
    inputs = tiny_qwen2_vl.prepare(scene_image, PROMPT)
    expl = Harsanyi(words=[4])(tiny_qwen2_vl, inputs)
    (report,) = expl.extras["interactions"][0]
    assert report["players"] == [
        "image0:r0c0",
        "image0:r0c1",
        "image0:r1c0",
        "image0:r1c1",
        "circle",
    ]
    assert expl.image_scores[0][0].shape == (1, 2, 2) and expl.text_scores[0].shape == (1, 6)
    mass = expl.image_scores[0][0].sum() + expl.text_scores[0].sum()
    assert mass == pytest.approx(report["delta"], abs=1e-5)


def test_runs_on_clip_with_similarity(tiny_clip, scene_image):
    inputs = tiny_clip.prepare(scene_image, "a red circle")
    expl = Harsanyi()(tiny_clip, inputs, Similarity())
    (report,) = expl.extras["interactions"][0]
    assert expl.extras["value"] == "score"  # not a log-probability: used as is
    assert report["players"][4:] == ["a", "red", "circle"]
    with torch.no_grad():
        full = tiny_clip.similarity(inputs)[0, 0].item()
    assert report["delta"] == pytest.approx(full - report["v_empty"], abs=1e-4)
    mass = expl.image_scores[0][0].sum() + expl.text_scores[0].sum()
    assert mass == pytest.approx(report["delta"], abs=1e-4)
    assert np.abs(expl.text_scores[0]).max() > 1e-3


def test_generated_outputs_each_get_interactions(tiny_llava, llava_inputs):
    bound = Generated(3).bind(tiny_llava, llava_inputs)
    method = Harsanyi(regions=(1, 2), words=[4])
    expl = method(tiny_llava, llava_inputs, Generated(3))
    reports = expl.extras["interactions"][0]
    assert len(reports) == len(expl.labels[0]) == 3
    assert len({round(r["delta"], 8) for r in reports}) == 3
    first = bound.inputs.input_ids[0, llava_inputs.input_ids.shape[1]].item()
    alone = method(tiny_llava, llava_inputs, TokenId(first))
    assert expl.image_scores[0][0][0] == pytest.approx(alone.image_scores[0][0][0], abs=1e-4)
    assert reports[0]["delta"] == pytest.approx(
        alone.extras["interactions"][0][0]["delta"], abs=1e-4
    )


def test_batch_of_two_equals_each_alone(tiny_llava, tiny_clip, tiny_qwen2_vl):
    from mmscope.world import render, sample_scenes

    images = [render(s, 48).image for s in sample_scenes(2, 11)]
    cases = [
        # prompts of different lengths (left padding) and so 8 and 7 players: items differ in
        # their players' positions and number, and read their own 2^n entries
        (tiny_llava, [PROMPT, "is there a circle ?"], Harsanyi(regions=(1, 2))),
        (tiny_clip, ["a red circle"] * 2, Harsanyi(words=[1])),  # CLIP: one shared text
        (tiny_qwen2_vl, [PROMPT] * 2, Harsanyi(words=[])),
    ]
    for vlm, prompts, method in cases:
        shared = prompts[0] if vlm.contrastive else prompts
        both = method(vlm, vlm.prepare(images, shared))
        for b, image in enumerate(images):
            alone = method(vlm, vlm.prepare(image, prompts[b]))
            assert both.image_scores[b][0] == pytest.approx(alone.image_scores[0][0], abs=1e-4)
            assert both.text_scores[b] == pytest.approx(alone.text_scores[0], abs=1e-4)
            mine, theirs = both.extras["interactions"][b][0], alone.extras["interactions"][0][0]
            assert mine["players"] == theirs["players"]
            assert mine["delta"] == pytest.approx(theirs["delta"], abs=1e-4)
            assert [e["value"] for e in mine["top"]] == pytest.approx(
                [e["value"] for e in theirs["top"]], abs=1e-4
            )
        assert not np.allclose(both.image_scores[0][0], both.image_scores[1][0])


def test_too_many_players_raise(tiny_llava, llava_inputs, tiny_qwen2_vl, scene_image):
    with pytest.raises(InputError, match="at most 12"):
        Harsanyi(regions=(4, 4), words=[])(tiny_llava, llava_inputs)
    with pytest.raises(InputError, match="choose fewer words"):  # 9 regions + 6 named words
        Harsanyi(regions=(3, 3), words=range(6))(tiny_llava, llava_inputs)
    with pytest.raises(InputError, match="out of range"):
        Harsanyi(words=[6])(tiny_llava, llava_inputs)
    with pytest.raises(InputError, match="too few patches"):
        qwen_inputs = tiny_qwen2_vl.prepare(scene_image, PROMPT)
        Harsanyi(regions=(3, 1), words=[])(tiny_qwen2_vl, qwen_inputs)
    for bad in ({"regions": (0, 2)}, {"top": 0}, {"batch_size": 0}):
        with pytest.raises(InputError):
            Harsanyi(**bad)


def test_long_prompts_keep_their_most_salient_words(tiny_llava, llava_inputs):
    """9 regions leave room for 3 of the 6 words: the three with the largest |x * grad|."""
    from mmscope.core.targets import Predicted
    from mmscope.methods.attribution.gradient import InputXGradient

    exp = Harsanyi(regions=(3, 3))(tiny_llava, llava_inputs, Predicted())
    players = exp.extras["interactions"][0][0]["players"]
    words = [p for p in players if not p.startswith("image")]
    salience = np.abs(InputXGradient()(tiny_llava, llava_inputs, Predicted()).text_scores[0][0])
    top3 = sorted(np.argsort(-salience)[:3].tolist())
    assert words == [llava_inputs.prompt_tokens[0][i] for i in top3]


def test_subset_layout_matches_bits():
    # v(T) = 1 for exactly one T: I(S) = (-1)^{|S|-|T|} for every S containing T
    n, t = 4, 0b0101
    v = torch.zeros(1 << n, dtype=torch.float64)
    v[t] = 1
    inter = moebius(v)
    for s in range(1 << n):
        want = (-1) ** (bin(s).count("1") - 2) if s & t == t else 0
        assert inter[s].item() == want
    assert inter.sum().item() == v[-1].item()  # sum over all S of I(S) = v(N)


def test_model_left_as_found_and_result_serialises(tiny_clip, scene_image):
    import json

    from mmscope.core.explanation import Explanation
    from mmscope.core.state import model_state

    inputs = tiny_clip.prepare(scene_image, "a red circle")
    before = model_state(tiny_clip.model)
    expl = Harsanyi(regions=(1, 2), words=[0, 2], top=3)(tiny_clip, inputs)
    assert model_state(tiny_clip.model) == before
    with pytest.raises(InputError):
        Harsanyi(regions=(4, 4))(tiny_clip, inputs)
    assert model_state(tiny_clip.model) == before
    d = json.loads(json.dumps(expl.to_dict()))
    back = Explanation.from_dict(d)
    assert back.extras["interactions"][0][0]["top"] == expl.extras["interactions"][0][0]["top"]
    assert len(expl.extras["interactions"][0][0]["top"]) == 3
