import pytest
import torch

from mmscope.core.errors import InputError


def test_roles(tiny_clip):
    m = tiny_clip.model
    assert (
        tiny_clip.resolve("vision.layer[0].mlp.act")
        is m.vision_model.encoder.layers[0].mlp.activation_fn
    )
    assert tiny_clip.resolve("text.layer[-1]") is m.text_model.encoder.layers[1]
    assert tiny_clip.resolve("vision.proj") is m.visual_projection


def test_prepare_spans_in_the_vision_sequence(tiny_clip, scene_image):
    inputs = tiny_clip.prepare(
        [scene_image, scene_image], ["a red circle", "a blue square and a red circle"]
    )
    assert inputs.batch_size == 2
    span = inputs.image_spans[0][0]
    assert (span.start, span.end, span.grid, span.sequence) == (1, 17, (4, 4), "vision")
    assert inputs.prompt_tokens[1] == tuple("a blue square and a red circle".split())
    sims = tiny_clip.similarity(inputs)
    assert sims.shape == (2, 2)
    # identical images give identical rows
    assert torch.allclose(sims[0], sims[1])


def test_vision_tokens_match_the_span(tiny_clip, scene_image):
    from mmscope.core.hooks import capture

    inputs = tiny_clip.prepare(scene_image, "a red circle")
    with torch.no_grad(), capture(tiny_clip, "vision.layer[-1]") as cap:
        tiny_clip.forward(inputs)
    assert cap["vision.layer[-1]"].shape[1] == inputs.image_spans[0][0].end


def test_needs_text_and_image(tiny_clip, scene_image):
    with pytest.raises(InputError):
        tiny_clip.prepare(scene_image, "")
    with pytest.raises(InputError, match="at least one image"):
        tiny_clip.prepare(None, "a red circle")
