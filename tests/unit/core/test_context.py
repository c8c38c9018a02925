"""Sequences longer than the model's context are refused, and generations that would run
past it are shortened with a warning; never run silently."""

import warnings

import pytest

from mmscope import explain
from mmscope.core.context import check_length, check_prompts, context_length, fit_new_tokens
from mmscope.core.errors import InputError
from mmscope.core.targets import AnswerLogProb, Generated, Predicted, Token
from mmscope.decoding import generate


def _words(n: int) -> str:
    return " ".join(["red"] * n)


def test_context_length_comes_from_the_text_config(tiny_llava, tiny_clip):
    assert context_length(tiny_llava) == tiny_llava.model.config.text_config.max_position_embeddings
    assert context_length(tiny_clip) == tiny_clip.model.config.text_config.max_position_embeddings
    assert context_length(object()) is None


def test_a_prompt_longer_than_the_context_is_refused_before_any_image_is_read(tiny_llava):
    limit = context_length(tiny_llava)
    with pytest.raises(InputError, match=f"prompt is {limit + 5} tokens, longer than the {limit}"):
        tiny_llava.prepare("no-such-image.png", _words(limit + 5))  # the image is never opened
    check_prompts(tiny_llava, [_words(limit)])  # exactly the context: fine


def test_the_whole_sequence_counts_image_tokens(tiny_llava, scene_image):
    limit = context_length(tiny_llava)
    short = tiny_llava.prepare(scene_image, "what ?")
    fill = limit - short.input_ids.shape[1] + 2  # words that fit alone, not with the image
    inputs = tiny_llava.prepare(scene_image, "what " + _words(fill))
    assert inputs.input_ids.shape[1] > limit
    with pytest.raises(InputError, match="prepared sequence is .* longer than the"):
        check_length(tiny_llava, inputs)
    for target in (Predicted(), Token("red")):
        with pytest.raises(InputError, match="context"):
            target.bind(tiny_llava, inputs)
    with pytest.raises(InputError, match="context"):
        explain(tiny_llava, inputs, Token("red"), method="saliency")
    with pytest.raises(InputError, match="one new token"):
        generate(tiny_llava, inputs)


def test_a_long_answer_is_refused_and_a_long_generation_shortened(tiny_llava, scene_image):
    limit = context_length(tiny_llava)
    inputs = tiny_llava.prepare(scene_image, "what color is the circle ?")
    room = limit - inputs.input_ids.shape[1]
    with pytest.raises(InputError, match="with the answer"):
        AnswerLogProb(_words(room + 3)).bind(tiny_llava, inputs)
    with pytest.warns(UserWarning, match=f"generating {room} new tokens, not {room + 10}"):
        assert fit_new_tokens(tiny_llava, inputs, room + 10) == room
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # within the context: no warning
        assert fit_new_tokens(tiny_llava, inputs, room) == room
    with pytest.warns(UserWarning, match="context"):
        bound = Generated(room + 10).bind(tiny_llava, inputs)
    assert bound.inputs.input_ids.shape[1] <= limit


@pytest.mark.parametrize("name", ["tiny_clip", "tiny_siglip"])
def test_dual_encoders_refuse_texts_past_their_text_tower(name, request, scene_image):
    vlm = request.getfixturevalue(name)
    limit = context_length(vlm)
    with pytest.raises(InputError, match=f"prompt is .* tokens, longer than the {limit}-token"):
        vlm.prepare(scene_image, _words(limit + 4))
