"""Visual-token ablation: the replaced tokens are the chosen ones (hand check on a tiny model),
every architecture, and on toy-llava the evidence object's tokens matter far more than
random ones."""

import numpy as np
import pytest
import torch

from mmscope.core.errors import InputError
from mmscope.core.hooks import patch
from mmscope.core.state import model_state
from mmscope.core.targets import Token, TokenId
from mmscope.methods.analysis import make_analysis
from mmscope.methods.token.ablation import TokenAblation, first_image_rows, mean_image_token
from mmscope.methods.token.sets import object_cells
from mmscope.world.items import world_items


def _box_mask(size: int = 48) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    mask[8:20, 16:30] = True  # rows 1-2, cols 2-3 of the 6x6 grid, at least 10% each
    return mask


def test_object_set_replaces_exactly_the_object_tokens(tiny_llava, scene_image):
    inputs = tiny_llava.prepare(scene_image, "what color is the circle ?")
    mask = _box_mask()
    result = TokenAblation(sets=("object",), buffer=0, fill="zero")(
        tiny_llava, inputs, Token("red"), masks=[mask]
    )
    cells = object_cells(mask, inputs.image_spans[0][0])
    assert result.counts[0, 0] == cells.sum() > 0
    rows = torch.as_tensor(np.flatnonzero(cells))

    def by_hand(value):
        flat = value.reshape(-1, value.shape[-1]).clone()
        flat[rows] = 0.0
        return flat.reshape(value.shape)

    red = tiny_llava.tokenizer.convert_tokens_to_ids("red")
    with torch.no_grad(), patch(tiny_llava, {"projector": by_hand}):
        logits = tiny_llava.forward(inputs).logits[0, -1]
    expected = torch.log_softmax(logits.float(), -1)[red]
    assert result.ablated[0, 0] == pytest.approx(float(expected), abs=1e-5)


def test_mean_fill_and_rows_of_a_batch(tiny_llava, scene_image):
    images = [scene_image, scene_image.rotate(90)]
    inputs = tiny_llava.prepare(images, ["what color is the circle ?", "how many ?"])
    assert first_image_rows(inputs) == [0, 16]
    mean = mean_image_token(tiny_llava, [inputs])
    ablation = TokenAblation(sets=("random",), seed=3)
    default = ablation(tiny_llava, inputs)
    given = ablation(tiny_llava, inputs, mean=mean)
    shifted = ablation(tiny_llava, inputs, mean=mean + 1.0)
    # the default fill is the mean image token over the batch: both images' tokens
    np.testing.assert_allclose(default.ablated, given.ablated, atol=1e-6)
    assert not np.allclose(default.ablated, shifted.ablated)
    assert default.counts[0].tolist() == [1, 1]  # a tenth of the 4x4 grid without masks
    assert default.correct is not None and default.correct.all()  # Predicted: right at first


def test_runs_on_every_architecture_and_leaves_the_model_as_found(any_vlm, scene_image):
    prompt = "a red circle" if any_vlm.contrastive else "what color is the circle ?"
    inputs = any_vlm.prepare(scene_image, prompt)
    before = model_state(any_vlm.model)
    result = make_analysis("token_ablation", buffer=0)(any_vlm, inputs, masks=[_box_mask()])
    assert model_state(any_vlm.model) == before
    assert result.counts.shape == (3, 1) and (result.counts[:2] > 0).all()
    assert np.isfinite(result.ablated).all()
    if any_vlm.contrastive:
        assert result.correct is None and np.isnan(result.flip_rate("object"))
    assert set(result.to_dict()["sets"]) == {"object", "random", "high_norm"}
    assert result.plot() is not None


def test_bad_settings_and_data_raise_input_errors(tiny_llava, scene_image):
    with pytest.raises(InputError):
        make_analysis("token_ablation", sets=("nearby",))
    with pytest.raises(InputError):
        make_analysis("token_ablation", fill="noise")
    inputs = tiny_llava.prepare(scene_image, "what color is the circle ?")
    with pytest.raises(InputError, match="masks"):
        TokenAblation()(tiny_llava, inputs)
    with pytest.raises(InputError, match="2 masks"):
        TokenAblation()(tiny_llava, inputs, masks=[None, None])


def test_on_toy_llava_object_tokens_flip_far_more_answers_than_random_ones(toy_llava):
    """Measured on 100 world questions with evidence (buffer 1, mean fill): ablating the
    object's tokens flips 79% of the right answers, as many random tokens 5%."""
    items = [it for it in world_items(80, seed=9) if it.mask is not None and it.kind != "count"]
    inputs = toy_llava.prepare([it.image for it in items], [it.prompt for it in items])
    answers = TokenId(
        [toy_llava.tokenizer.convert_tokens_to_ids(it.answer.split()[0]) for it in items]
    )
    result = TokenAblation(sets=("object", "random"), buffer=1)(
        toy_llava, inputs, answers, masks=[it.mask for it in items]
    )
    assert result.correct is not None and result.correct.sum() >= 20
    assert result.flip_rate("object") > 0.5
    assert result.flip_rate("object") > result.flip_rate("random") + 0.35
    np.testing.assert_array_equal(result.counts[0], result.counts[1])
