"""Logit lens: equal to a hand computation, the last layer equal to the model's own output,
the same on every architecture, and on toy-llava the answer forms in the late layers."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from mmscope.core.errors import InputError
from mmscope.core.state import model_state
from mmscope.core.targets import Token
from mmscope.methods.analysis import make_analysis
from mmscope.methods.token.lens import LensResult, LogitLens
from mmscope.world.items import world_items

PROMPT = "what color is the circle ?"


def test_equals_a_hand_computation_on_a_tiny_llava(tiny_llava, scene_image):
    inputs = tiny_llava.prepare(scene_image, PROMPT)
    result = LogitLens(k=3)(tiny_llava, inputs, Token("red"))
    with torch.no_grad():
        out = tiny_llava.forward(inputs, output_hidden_states=True)
    norm, head = tiny_llava.resolve("lm.norm"), tiny_llava.resolve("lm_head")
    red = tiny_llava.tokenizer.convert_tokens_to_ids("red")
    n = tiny_llava.num_layers("lm.layer")
    for layer in range(n):
        h = out.hidden_states[layer + 1]
        with torch.no_grad():  # transformers records the last layer after the final norm
            probs = torch.softmax(head(h if layer == n - 1 else norm(h)).float(), -1)[0]
        np.testing.assert_allclose(result.target_probs[layer, 0], probs[:, red], atol=1e-5)
        top = probs.topk(3, dim=-1)
        np.testing.assert_array_equal(result.top_ids[layer, 0], top.indices.numpy())
        rank = (probs > probs[:, red : red + 1]).sum(-1)
        np.testing.assert_array_equal(result.target_ranks[layer, 0], rank.numpy())
    # the last layer read at the last position is the model's own next-token distribution
    final = torch.softmax(out.logits[0, -1].float(), -1)
    assert result.target_probs[-1, 0, -1] == pytest.approx(float(final[red]), abs=1e-5)
    assert result.target_ids == (red,)


def test_default_target_is_the_answer_and_clip_reads_out_against_its_texts(tiny_clip, scene_image):
    texts = ["a red circle", "a blue square", "a green cross"]
    inputs = tiny_clip.prepare([scene_image, scene_image], texts[:2])
    result = LogitLens(k=3)(tiny_clip, inputs)
    with torch.no_grad():
        out = tiny_clip.forward(inputs)
    # the last layer's class token read out = CLIP's own image-text logits
    expected = torch.softmax(out.logits_per_image.float(), -1)
    np.testing.assert_allclose(result.target_probs[-1, :, 0], expected.diagonal(), atol=1e-5)
    assert result.target_ids == (0, 1)
    assert set(result.names.values()) <= set(texts)


def test_runs_on_every_architecture_and_leaves_the_model_as_found(any_vlm, scene_image):
    prompt = "a red circle" if any_vlm.contrastive else PROMPT
    inputs = any_vlm.prepare(scene_image, prompt)
    before = model_state(any_vlm.model)
    result = make_analysis("logit_lens", k=2, layers=[0, -1])(any_vlm, inputs)
    assert model_state(any_vlm.model) == before
    assert isinstance(result, LensResult) and len(result.layers) == 2
    if any_vlm.capabilities.images_in == "cross_attention":  # Mllama: the text positions only
        assert result.spans == ((),) and result.top_ids.shape[2] == inputs.input_ids.shape[1]
        with pytest.raises(InputError, match="cross-attention"):
            result.image_map(0)
    else:
        span = inputs.image_spans[0][0]
        assert result.image_map(0).shape == span.grid
        assert result.patch_tokens(0).shape == span.grid
    assert np.all((result.top_probs >= 0) & (result.top_probs <= 1))
    d = result.to_dict()
    assert d["layers"] == list(result.layers)
    assert result.plot() is not None


def test_bad_settings_raise_input_errors():
    with pytest.raises(InputError):
        make_analysis("logit_lens", k=0)
    with pytest.raises(InputError):
        make_analysis("logit_lens", depth=3)


def test_first_top_layer_reads_the_ranks():
    ranks = np.array([[[2]], [[0]], [[1]], [[0]], [[0]]])
    result = LensResult(
        (0, 1, 2, 3, 4), np.zeros((5, 1, 1, 1), int), np.zeros((5, 1, 1, 1)), (0,),
        np.zeros((5, 1, 1)), ranks, {0: "a"}, (("a",),), ((),),
    )  # fmt: skip
    assert result.first_top_layer(0, 0) == 3
    assert replace(result, target_ranks=ranks[::-1].copy()).first_top_layer(0, 0) is None


def test_on_toy_llava_the_answer_forms_in_the_upper_layers(toy_llava):
    """Measured on 50 world questions (seed 5): the answer's mean probability at the last
    position is 0.28, 0.39, 0.84, 0.96 over the 4 layers; the rise is in layer 2, where the last
    token reads the image (see the knockout test). Answers read from the image become the top
    token from layer 2 on ("yes" 8 of 8, colour 10 of 10; over seeds 5, 0, 1: "yes" 18 of 19,
    colour 21 of 30), answers the prior gives anyway are top from layer 0 on ("no" 2 of 2,
    the count "one" 6 of 6; over the three seeds 23 of 26)."""
    items = world_items(50, seed=5)
    inputs = toy_llava.prepare([it.image for it in items], [it.prompt for it in items])
    result = LogitLens(k=3)(toy_llava, inputs)
    answer = result.target_probs[:, :, -1]
    assert answer[-1].mean() > answer[0].mean() + 0.3
    rise = np.diff(answer.mean(1))
    assert int(np.argmax(rise)) == 1 and rise[1] > 2 * max(rise[0], rise[2])  # 0.44 vs 0.12
    first = {key: [] for key in ("yes", "color", "prior")}
    for b, item in enumerate(items):
        key = "color" if item.kind == "color" else item.answer
        key = "prior" if key in ("no", "one") else key
        if key in first:
            first[key].append(result.first_top_layer(b))
    assert min(len(v) for v in first.values()) >= 5, first
    assert np.mean([f is not None and f >= 2 for f in first["yes"]]) >= 0.8, first  # 8 of 8
    assert np.mean([f is not None and f >= 2 for f in first["color"]]) >= 0.7, first  # 10 of 10
    assert np.mean([f == 0 for f in first["prior"]]) >= 0.7, first  # 8 of 8
