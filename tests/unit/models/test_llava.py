import numpy as np
import pytest
import torch
from PIL import Image

from mmscope.core.errors import InputError
from mmscope.models.base import parse_site


def test_parse_site():
    assert parse_site("lm.layer[3].mlp.act") == ("lm.layer.mlp.act", 3)
    assert parse_site("vision.layer[-1]") == ("vision.layer", -1)
    assert parse_site("projector") == ("projector", None)


def test_roles_resolve_to_the_right_modules(tiny_llava):
    m = tiny_llava.model
    assert tiny_llava.resolve("lm.layer[-1]") is m.model.language_model.layers[1]
    assert tiny_llava.resolve("lm.layer[0].mlp.act") is m.model.language_model.layers[0].mlp.act_fn
    assert (
        tiny_llava.resolve("vision.layer[1].attn")
        is m.model.vision_tower.encoder.layers[1].self_attn
    )
    assert tiny_llava.resolve("projector") is m.model.multi_modal_projector
    assert tiny_llava.resolve("lm_head") is m.lm_head
    assert tiny_llava.num_layers("lm.layer") == 2 and tiny_llava.num_layers("vision.layer") == 2
    assert "lm.layer.attn.probs" in tiny_llava.roles


def test_prepare_batch_spans_and_prompt_tokens(tiny_llava, scene_image):
    prompts = ["what color is the circle ?", "describe the image ."]
    inputs = tiny_llava.prepare([scene_image, scene_image], prompts)
    assert inputs.batch_size == 2
    ids = inputs.input_ids
    for b, prompt in enumerate(prompts):
        (span,) = inputs.image_spans[b]
        assert span.grid == (4, 4) and span.end - span.start == 16
        assert torch.all(ids[b, span.start : span.end] == tiny_llava.image_token_id)
        assert ids[b, : span.start].ne(tiny_llava.image_token_id).all()
        start, end = inputs.prompt_spans[b]
        assert list(inputs.prompt_tokens[b]) == prompt.split()
        decoded = tiny_llava.tokenizer.convert_ids_to_tokens(ids[b, start:end].tolist())
        assert decoded == prompt.split()
    # the shorter prompt is left-padded, so its spans are shifted by the padding
    pad = int((inputs.attention_mask[1] == 0).sum())
    assert pad == 2 and inputs.image_spans[1][0].start == inputs.image_spans[0][0].start + pad


def test_crop_box_maps_back_to_original_pixels(tiny_llava):
    wide = Image.fromarray(np.zeros((40, 80, 3), np.uint8))  # W=80, H=40
    span = tiny_llava.prepare(wide, "describe the image .").image_spans[0][0]
    # resize shortest edge 40 -> 32 (scale .8), centre crop 32x32 of 64x32 -> x 16..48 resized
    assert span.crop == pytest.approx((20.0, 0.0, 60.0, 40.0))


def test_batch_of_one_equals_batch_of_two(tiny_llava, scene_image):
    one = tiny_llava.prepare(scene_image, "describe the image .")
    two = tiny_llava.prepare(
        [scene_image, scene_image], ["describe the image .", "what color is the circle ?"]
    )
    with torch.no_grad():
        a = tiny_llava.forward(one).logits[0, -1]
        b = tiny_llava.forward(two).logits[0, -1]
    assert torch.allclose(a, b, atol=1e-5)


def test_generate_returns_strings(tiny_llava, scene_image):
    out = tiny_llava.generate(
        tiny_llava.prepare(scene_image, "describe the image ."), max_new_tokens=3
    )
    assert len(out) == 1 and isinstance(out[0], str)


def test_empty_prompt_and_mismatched_batch(tiny_llava, scene_image):
    with pytest.raises(InputError, match="empty"):
        tiny_llava.prepare(scene_image, "   ")
    with pytest.raises(InputError, match="2 prompts"):
        tiny_llava.prepare([scene_image], ["a ?", "b ?"])


def test_a_model_used_before_wrapping_still_generates(scene_image):
    """transformers hooks a vision tower on its first forward; wrapping the model afterwards
    must not hook it twice (which made LLaVA's penultimate-layer features vanish)."""
    from mmscope.models.llava import LlavaVLM
    from mmscope.toys import build

    model = build.build_llava(len(build.toy_tokenizer()), vision_feature_layer=-2).eval()
    first = LlavaVLM(model, build.llava_processor(), "first")
    inputs = first.prepare(scene_image, "what color is the circle ?")
    expected = first.generate(inputs, max_new_tokens=3)
    again = LlavaVLM(model, build.llava_processor(), "again")
    assert again.generate(inputs, max_new_tokens=3) == expected
    assert again.CAM_SITE == "vision.layer[-2]"
