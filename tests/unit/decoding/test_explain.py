"""Explaining a hallucinated object: the phrase is found in what the decoder produced, and on
toy-llava a co-occurrence hallucination is traced to the objects it borrowed from."""

import numpy as np
import pytest

from mmscope.core.errors import InputError
from mmscope.core.state import model_state
from mmscope.decoding.explain import _find, explain_hallucination
from mmscope.methods.token.sets import object_cells
from mmscope.world import render, sample_scenes
from mmscope.world.captions import hallucinated


def test_find_returns_the_last_word_of_the_first_occurrence():
    tokens = ["a", "▁red", "circle", ",", "a", "red", "square"]
    assert _find(tokens, ["red", "square"]) == 6
    assert _find(tokens, ["red"]) == 1
    assert _find(tokens, ["blue", "square"]) == -1


def test_a_phrase_the_decoder_did_not_produce_is_refused(tiny_llava, scene_image):
    with pytest.raises(InputError, match="is not in the greedy decoding"):
        explain_hallucination(tiny_llava, scene_image, "zebra crossing", max_new_tokens=3)


def test_on_toy_llava_a_hallucination_is_traced_to_the_objects_it_borrows_from(toy_llava):
    """Measured: toy-llava describes scene 3 of seed 4242 (a purple triangle, a yellow circle, a
    green cross, a purple circle) with a "purple cross": its Chefer relevance lies on the
    purple objects and the green cross, the colour and the shape it binds wrongly."""
    scene = sample_scenes(40, 4242)[3]
    rendered = render(scene)
    before = model_state(toy_llava.model)
    result = explain_hallucination(toy_llava, rendered.image, "purple cross")
    assert model_state(toy_llava.model) == before
    assert hallucinated(result.caption, scene) == ["purple cross"]
    word = toy_llava.tokenizer.convert_tokens_to_ids("cross")
    assert result.lens.target_ids == (word,)
    assert result.lens.target_probs[-1, 0, -1] > 0.5  # the model was sure of it
    span = result.relevance.spans[0][0]
    donors = np.zeros(span.grid, bool)  # patches of the purple objects and of the cross
    for obj, mask in zip(scene.objects, rendered.masks):
        if obj.color == "purple" or obj.shape == "cross":
            donors |= object_cells(mask, span)
    relevance = np.clip(result.relevance.image_scores[0][0][0], 0, None)
    inside = relevance[donors].sum() / relevance.sum()  # measured 0.70 on 28% of the patches
    assert inside > 2 * donors.mean(), (inside, donors.mean())
    assert len(result.image_attention) == toy_llava.num_layers("lm.layer")
    assert np.all(result.image_attention + result.text_attention <= 1 + 1e-5)
    assert result.to_dict()["phrase"] == "purple cross"
