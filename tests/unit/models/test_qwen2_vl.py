"""The Qwen2-VL adapter on a tiny random-weight model built offline."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_rebuilt_alike,
    assert_roles_resolve,
    assert_sites_refused,
    saved_and_loaded,
)
from PIL import Image
from torch import nn
from transformers.models.qwen2_vl import modeling_qwen2_vl as hf

from mmscope.core.registry import REGISTRY
from mmscope.models.qwen2_vl import ImageOnlyQwen2VLProcessor, Qwen2VLVLM
from mmscope.toys.tiny.qwen2_vl import tiny_qwen2_vl

PROMPTS = ["what colour is the circle ?", "how many objects are there"]


@pytest.fixture(scope="module")
def vlm() -> Qwen2VLVLM:
    return tiny_qwen2_vl(seed=0)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    # 56x84 keeps its size (merged grid 3 rows x 2 cols); 112x56 gives 2 rows x 4 cols.
    return [Image.new("RGB", (56, 84), "red"), Image.new("RGB", (112, 56), "blue")]


@pytest.fixture(scope="module")
def inputs(vlm, images):
    return vlm.prepare(images, PROMPTS)


EXPECTED = {
    "vision.embed": hf.PatchEmbed,
    "vision.layer": hf.Qwen2VLVisionBlock,
    "vision.layer.attn": hf.VisionAttention,
    "vision.layer.attn.heads": nn.Linear,  # the output projection, whose input is read
    "vision.layer.mlp": hf.VisionMlp,
    "vision.layer.mlp.act": nn.Module,  # QuickGELU from ACT2FN
    "projector": hf.PatchMerger,
    "lm.embed": nn.Embedding,
    "lm.layer": hf.Qwen2VLDecoderLayer,
    "lm.layer.attn": hf.Qwen2VLAttention,
    "lm.layer.attn.heads": nn.Linear,
    "lm.layer.mlp": hf.Qwen2MLP,
    "lm.layer.mlp.act": nn.Module,  # SiLU from ACT2FN
    "lm.norm": hf.Qwen2VLRMSNorm,
    "lm_head": nn.Linear,
}


def test_registered_under_hf_class():
    entry = REGISTRY.get("qwen2_vl", kind="adapter")
    assert entry.obj is Qwen2VLVLM
    assert "Qwen2VLForConditionalGeneration" in entry.extra["hf_classes"]


def test_every_role_resolves_to_its_module_type(vlm):
    assert set(EXPECTED) == set(Qwen2VLVLM.ROLES)
    assert_roles_resolve(vlm, EXPECTED)
    assert type(vlm.resolve("vision.layer[0].mlp.act")).__name__ == "QuickGELUActivation"
    assert type(vlm.resolve("lm.layer[0].mlp.act")).__name__ == "SiLUActivation"
    assert vlm.resolve("lm.layer[0].mlp.act") is vlm.resolve("lm.layer[0].mlp").act_fn
    assert vlm.resolve("projector") is vlm.model.model.visual.merger
    assert vlm.resolve("lm.layer[0].attn.heads") is vlm.resolve("lm.layer[0].attn").o_proj
    assert "lm.layer.attn.probs" in vlm.roles and "vision.layer.attn.probs" not in vlm.roles


def test_negative_indices_and_bad_sites(vlm):
    assert vlm.num_layers("lm.layer") == 2 and vlm.num_layers("vision.layer") == 2
    assert vlm.resolve("lm.layer[-1]") is vlm.resolve("lm.layer[1]")
    assert vlm.resolve("vision.layer[-2].attn") is vlm.resolve("vision.layer[0].attn")
    layers = vlm.model.model.language_model.layers
    assert vlm.resolve("lm.layer[-1].mlp.act") is layers[1].mlp.act_fn
    assert_sites_refused(
        vlm, ("lm.layer[2]", "vision.layer[-3]", "lm.layer", "projector[0]", "text.layer[0]")
    )


def test_tiny_model_is_deterministic_and_leaves_global_rng(vlm):
    other = assert_rebuilt_alike(vlm, lambda: tiny_qwen2_vl(seed=0))
    assert isinstance(other.processor, ImageOnlyQwen2VLProcessor)
    assert other.processor.to_dict()["processor_class"] == "Qwen2VLProcessor"


def test_image_spans_follow_the_dynamic_grids(vlm, inputs):
    tensors = inputs.tensors
    assert {"input_ids", "attention_mask", "pixel_values", "image_grid_thw"} <= set(tensors)
    assert "mm_token_type_ids" in tensors  # needed by the model for M-RoPE
    thw = tensors["image_grid_thw"].tolist()
    assert thw == [[1, 6, 4], [1, 4, 8]]
    assert tensors["pixel_values"].shape[0] == sum(t * h * w for t, h, w in thw)
    merge = vlm.merge_size
    image_id = vlm.image_token_id
    for b, (item_spans, (t, h, w)) in enumerate(zip(inputs.image_spans, thw, strict=True)):
        (span,) = item_spans
        rows, cols = span.grid
        assert (rows, cols) == (h // merge, w // merge)
        assert span.end - span.start == rows * cols == t * h * w // merge**2
        ids = tensors["input_ids"][b]
        assert bool((ids[span.start : span.end] == image_id).all())
        assert int((ids == image_id).sum()) == rows * cols
        mm = tensors["mm_token_type_ids"][b]
        assert mm[span.start : span.end].eq(1).all() and int(mm.sum()) == rows * cols
        assert span.sequence == "lm"
        image = inputs.images[b][0]
        assert span.crop == (0.0, 0.0, float(image.width), float(image.height))
    assert inputs.image_spans[0][0].grid == (3, 2) and inputs.image_spans[1][0].grid == (2, 4)


def test_prompt_spans_hold_the_prompt_words(vlm, inputs):
    for b, prompt in enumerate(PROMPTS):
        start, end = inputs.prompt_spans[b]
        assert inputs.prompt_tokens[b] == tuple(prompt.split())
        ids = inputs.input_ids[b, start:end].tolist()
        assert vlm.tokenizer.convert_ids_to_tokens(ids) == prompt.split()


def test_two_images_in_one_item_and_text_only(vlm, images):
    both = vlm.prepare(images, "what colour is the circle ?")  # one prompt, two images
    spans = both.image_spans[0]
    assert [s.grid for s in spans] == [(3, 2), (2, 4)]
    assert spans[0].end <= spans[1].start
    text = vlm.prepare(None, "describe the image")
    assert text.image_spans == ((),)
    assert text.prompt_tokens[0] == ("describe", "the", "image")
    with torch.no_grad():
        assert vlm.forward(text).logits.shape[:2] == text.input_ids.shape


def test_forward_and_projector_features(vlm, inputs):
    seen = []
    handle = vlm.resolve("projector").register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        with torch.no_grad():
            out = vlm.forward(inputs)
    finally:
        handle.remove()
    batch, length = inputs.input_ids.shape
    assert out.logits.shape == (batch, length, vlm.model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()
    (features,) = seen
    n_tokens = sum(s.end - s.start for item in inputs.image_spans for s in item)
    assert features.shape == (n_tokens, vlm.model.config.text_config.hidden_size)


def test_eager_attention_probabilities(vlm, inputs):
    before = vlm.model.config._attn_implementation
    with torch.no_grad(), vlm.attention("eager"):
        assert vlm.model.config.text_config._attn_implementation == "eager"
        out = vlm.forward(inputs, output_attentions=True)
        captured = []
        handle = vlm.resolve("lm.layer[-1].attn").register_forward_hook(
            lambda m, i, o: captured.append(o[1])
        )
        try:
            vlm.forward(inputs)
        finally:
            handle.remove()
    assert vlm.model.config._attn_implementation == before
    batch, length = inputs.input_ids.shape
    heads = vlm.model.config.text_config.num_attention_heads
    assert len(out.attentions) == vlm.num_layers("lm.layer")
    for probs in [*out.attentions, *captured]:
        assert probs.shape == (batch, heads, length, length)
        assert torch.allclose(probs.sum(-1), torch.ones(batch, heads, length), atol=1e-5)
    assert torch.allclose(captured[0], out.attentions[-1])


def test_generate_returns_one_string_per_item(vlm, inputs):
    texts = vlm.generate(inputs, max_new_tokens=3)
    assert isinstance(texts, list) and len(texts) == 2
    assert all(isinstance(t, str) for t in texts)


def test_saved_folder_loads_through_mmscope_load(tmp_path, tiny_qwen2_vl):
    vlm = saved_and_loaded(tiny_qwen2_vl, tmp_path)
    assert type(vlm).__name__ == "Qwen2VLVLM"
    image = Image.new("RGB", (56, 84), (200, 30, 30))
    with torch.no_grad():
        a = vlm.forward(vlm.prepare(image, "what color is it ?")).logits
        b = tiny_qwen2_vl.forward(tiny_qwen2_vl.prepare(image, "what color is it ?")).logits
    assert torch.allclose(a, b, atol=1e-6)
