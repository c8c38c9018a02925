"""Targets compute the scalar they promise: checked against log-softmax by hand."""

import pytest
import torch

from mmscope.core.errors import InputError
from mmscope.core.targets import (
    AnswerLogProb,
    Contrast,
    Generated,
    Predicted,
    Similarity,
    Token,
    TokenId,
    token_id,
)

PROMPT = "what color is the circle ?"


@pytest.fixture
def inputs(tiny_llava, scene_image):
    return tiny_llava.prepare(scene_image, PROMPT)


def _logits(vlm, inputs):
    with torch.no_grad():
        return vlm.forward(inputs).logits.float()


def test_token_and_contrast_and_predicted(tiny_llava, inputs):
    logits = _logits(tiny_llava, inputs)[0, -1]
    red, blue = token_id(tiny_llava, "red"), token_id(tiny_llava, "blue")
    bound = Token("red").bind(tiny_llava, inputs)
    with torch.no_grad():
        got = bound(tiny_llava.forward(inputs))
    assert got.shape == (1, 1)
    assert float(got) == pytest.approx(float(torch.log_softmax(logits, -1)[red]), abs=1e-5)
    contrast = Contrast("red", "blue").bind(tiny_llava, inputs)
    with torch.no_grad():
        assert float(contrast(tiny_llava.forward(inputs))) == pytest.approx(
            float(logits[red] - logits[blue]), abs=1e-5
        )
    top = int(logits.argmax())
    predicted = Predicted().bind(tiny_llava, inputs)
    assert predicted.labels[0][0] == tiny_llava.tokenizer.decode([top]).strip()
    assert TokenId(top).bind(tiny_llava, inputs).positions == predicted.positions
    with pytest.raises(InputError):
        TokenId(10**6).bind(tiny_llava, inputs)


def test_answer_log_prob_is_the_sum_of_teacher_forced_log_probs(tiny_llava, inputs):
    answer = "a red circle"
    bound = AnswerLogProb(answer).bind(tiny_llava, inputs)
    ids = tiny_llava.tokenizer.encode(answer, add_special_tokens=False)
    with torch.no_grad():
        got = float(bound(tiny_llava.forward(bound.inputs)))
    expected = 0.0
    seq = inputs.input_ids[0].tolist()
    for token in ids:  # one forward per prefix, by hand
        forced = inputs.extend(torch.tensor([seq[len(inputs.input_ids[0]) :]]))
        logp = torch.log_softmax(_logits(tiny_llava, forced)[0, -1], -1)
        expected += float(logp[token])
        seq.append(token)
    assert got == pytest.approx(expected, abs=1e-4)
    assert len(bound.positions[0]) == len(ids)


def test_generated_explains_the_greedy_answer(tiny_llava, inputs):
    bound = Generated(5).bind(tiny_llava, inputs)
    with torch.no_grad():
        out = tiny_llava.model.generate(
            **inputs.tensors, max_new_tokens=5, do_sample=False, pad_token_id=0
        )
    new = out[0, inputs.input_ids.shape[1] :].tolist()
    labels = bound.labels[0]
    assert list(labels) == tiny_llava.tokenizer.convert_ids_to_tokens(new[: len(labels)])
    with torch.no_grad():
        scores = bound(tiny_llava.forward(bound.inputs))
    assert scores.shape == (1, bound.k)
    assert (scores <= 0).all()
    # a tiled batch scores the same per copy
    with torch.no_grad():
        tiled = bound(tiny_llava.forward(bound.inputs.tile(3)))
    torch.testing.assert_close(tiled, scores.repeat(3, 1), rtol=1e-4, atol=1e-5)


def test_similarity_reads_each_pair(tiny_clip, scene_image):
    images = [scene_image, scene_image.rotate(90)]
    inputs = tiny_clip.prepare(images, ["a red circle", "a blue square"])
    bound = Similarity().bind(tiny_clip, inputs)
    with torch.no_grad():
        sims = tiny_clip.forward(inputs).logits_per_image
        got = bound(tiny_clip.forward(inputs))
        tiled = bound(tiny_clip.forward(inputs.tile(2)))
    torch.testing.assert_close(got[:, 0], sims.diagonal())
    torch.testing.assert_close(tiled, got.repeat(2, 1))
    with pytest.raises(InputError):
        Token("red").bind(tiny_clip, inputs)


def test_contrastive_and_generative_targets_do_not_mix(tiny_llava, inputs):
    with pytest.raises(InputError):
        Similarity().bind(tiny_llava, inputs)


def test_one_text_for_several_images_is_paired_with_each(tiny_clip, scene_image):
    from mmscope.methods.attribution.gradient import IntegratedGradients

    images = [scene_image, scene_image.rotate(90)]
    inputs = tiny_clip.prepare(images, "a red circle")
    bound = Similarity().bind(tiny_clip, inputs)
    assert bound.inputs.input_ids.shape[0] == 2 and len(bound.inputs.prompt_spans) == 2
    exp = IntegratedGradients(steps=8)(tiny_clip, inputs, Similarity())
    alone = IntegratedGradients(steps=8)(tiny_clip, tiny_clip.prepare(images[1], "a red circle"))
    assert [w for w, _ in exp.text_map(item=1)] == [w for w, _ in alone.text_map()]
    assert exp.text_scores[1] == pytest.approx(alone.text_scores[0], rel=1e-3, abs=1e-6)
    assert len(exp.extras["completeness_gap"]) == 2


def test_token_ids_per_item_freeze_the_predicted_tokens(tiny_llava):
    from mmscope.world import render, sample_scenes

    images = [render(s, 48).image for s in sample_scenes(3, 2)]
    batch = tiny_llava.prepare(images, ["what color is the circle ?"] * 2 + ["how many ?"])
    ids = Predicted().token_ids(tiny_llava, batch)
    frozen = TokenId(ids).bind(tiny_llava, batch)
    live = Predicted().bind(tiny_llava, batch)
    with torch.no_grad():
        out = tiny_llava.forward(batch)
        assert torch.equal(frozen(out), live(out)) and frozen.labels == live.labels
        tiled = batch.tile(2)  # methods batch masked copies this way
        assert torch.equal(frozen(tiny_llava.forward(tiled)), live(tiny_llava.forward(tiled)))
    with pytest.raises(InputError, match="3 token ids for a batch of 1"):
        TokenId(ids).bind(tiny_llava, tiny_llava.prepare(images[0], "what ?"))
    with pytest.raises(InputError):
        TokenId([1, "x"])
