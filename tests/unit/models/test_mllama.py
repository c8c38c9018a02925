"""The Mllama adapter (Meta 2024, Llama 3.2 Vision) on a tiny random-weight model built offline:
tiles of 32 px (4x4 patches of 8 px and a class token each), at most 2 per image, 2 local + 1
global vision layers, 3 LM layers of which layer 1 cross-attends to the image."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from helpers import (
    assert_rebuilt_alike,
    assert_roles_resolve,
    assert_same_run,
    assert_sites_refused,
    assert_teacher_forcing,
    saved_and_loaded,
)
from PIL import Image
from torch import nn
from transformers.models.mllama import modeling_mllama as hf

from mmscope.core.errors import InputError, NotApplicableError, SiteError
from mmscope.core.hooks import capture, patch
from mmscope.core.registry import REGISTRY
from mmscope.core.targets import TokenId
from mmscope.methods.analysis import make_analysis
from mmscope.methods.explain import make_method
from mmscope.methods.token.lens import LogitLens
from mmscope.models.mllama import MllamaVLM
from mmscope.toys.tiny.mllama import tiny_mllama

PROMPTS = ["what color is the circle ?", "how many objects are there"]
_VISION = {
    "": hf.MllamaVisionEncoderLayer,
    ".attn": hf.MllamaVisionAttention,
    ".attn.heads": nn.Linear,
    ".mlp": hf.MllamaVisionMLP,
    ".mlp.act": nn.Module,
}
EXPECTED = {
    "vision.embed": nn.Conv2d,
    **{f"vision.layer{k}": v for k, v in _VISION.items()},
    "vision.norm": nn.LayerNorm,
    **{f"vision.global.layer{k}": v for k, v in _VISION.items()},
    "projector": nn.Linear,
    "lm.embed": nn.Embedding,
    "lm.layer": hf.MllamaSelfAttentionDecoderLayer,
    "lm.layer.attn": hf.MllamaTextSelfAttention,
    "lm.layer.attn.heads": nn.Linear,
    "lm.layer.mlp": hf.MllamaTextMLP,
    "lm.layer.mlp.act": nn.Module,
    "lm.norm": hf.MllamaTextRMSNorm,
    "lm_head": nn.Linear,
}
#: <|begin_of_text|> <|start_header_id|> user <|end_header_id|> <|image|> prompt ...
IMAGE_AT = 4


@pytest.fixture(scope="module")
def vlm() -> MllamaVLM:
    return tiny_mllama(seed=0)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    # 64x32 fits two tiles side by side; 48x48 is shrunk into one tile (a square canvas)
    return [Image.new("RGB", (64, 32), "red"), Image.new("RGB", (48, 48), "blue")]


@pytest.fixture(scope="module")
def inputs(vlm, images):
    return vlm.prepare(images, PROMPTS)


def test_registered_roles_and_layer_types(vlm):
    entry = REGISTRY.get("mllama", kind="adapter")
    assert entry.obj is MllamaVLM
    assert entry.extra["hf_classes"] == ("MllamaForConditionalGeneration",)
    assert set(EXPECTED) | {"lm.layer.cross_attn", "lm.layer.cross_attn.heads"} == set(
        MllamaVLM.ROLES
    )
    assert_roles_resolve(vlm, EXPECTED)
    m = vlm.model.model
    assert vlm.resolve("vision.global.layer[-1]") is m.vision_model.global_transformer.layers[0]
    assert vlm.resolve("lm.layer[1]") is m.language_model.layers[1]
    assert isinstance(vlm.resolve("lm.layer[1]"), hf.MllamaCrossAttentionDecoderLayer)
    assert isinstance(vlm.resolve("lm.layer[-2].cross_attn"), hf.MllamaTextCrossAttention)
    cross = m.language_model.layers[1].cross_attn
    assert vlm.resolve("lm.layer[1].cross_attn.heads") is cross.o_proj
    assert vlm.resolve("lm.layer[2].attn") is m.language_model.layers[2].self_attn
    assert vlm.capabilities.images_in == "cross_attention" and vlm.capabilities.generates
    assert vlm.non_softmax_layers("lm.layer").keys() == {1}
    assert vlm.softmax_layers("lm.layer") == [0, 2] and vlm.num_heads("lm.layer") == 2


def test_each_layer_has_only_its_own_kind_of_attention(vlm):
    with pytest.raises(SiteError, match=r"lm.layer\[1\].*cross-attention layer.*cross_attn"):
        vlm.resolve("lm.layer[1].attn")
    with pytest.raises(SiteError, match="cross-attention layer"):
        vlm.resolve("lm.layer[-2].attn.probs")
    with pytest.raises(SiteError, match=r"self-attention layer.*lm.layer\[0\].attn"):
        vlm.resolve("lm.layer[0].cross_attn")
    assert_sites_refused(
        vlm,
        (
            "lm.layer[2].cross_attn.heads",
            "lm.layer[3]",
            "vision.global.layer[1]",
            "vision.layer[-3]",
            "projector[0]",
            "lm.layer.cross_attn",
        ),
    )


def test_tiny_model_is_deterministic_leaves_the_global_rng_and_opens_its_gates(vlm):
    assert_rebuilt_alike(vlm, lambda: tiny_mllama(seed=0))
    gate = vlm.resolve("lm.layer[1]").cross_attn_attn_gate
    assert 0.5 <= float(gate.detach()) <= 1.0  # transformers would start it at 0: no image at all


def test_tiles_tokens_and_spans(vlm, inputs):
    # 64x32 -> a 1x2 canvas of 32 px tiles, filled; 48x48 -> one tile (32x32), the other unused
    assert inputs.pixel_values.shape == (2, 1, 2, 3, 32, 32)
    assert inputs.tensors["aspect_ratio_ids"].tolist() == [[2], [1]]  # (1, 2) and (1, 1)
    assert inputs.tensors["aspect_ratio_mask"].tolist() == [[[1, 1]], [[1, 0]]]
    assert (inputs.pixel_values[1, 0, 1] == 0).all()
    (wide,), (square,) = inputs.image_spans
    assert (wide.start, wide.end, wide.grid, wide.sequence) == (0, 32, (4, 8), "vision")
    assert wide.crop == (0.0, 0.0, 64.0, 32.0)
    assert (square.start, square.end, square.grid, square.crop) == (0, 16, (4, 4), (0, 0, 48, 48))
    with torch.no_grad(), capture(vlm, ["projector", "vision.layer[-1]"]) as cap:
        vlm.forward(inputs)
    # per tile 4 * 4 patches + 1 class token = 17 tokens; the towers pad each tile to 24
    assert cap["projector"].shape == (2, 1, 2, 17, 32)
    assert cap["vision.layer[-1]"].shape == (2, 2 * 24, 32)
    assert vlm.image_tokens(cap["projector"], inputs).shape == (32 + 16, 32)
    # one <|image|> token in the text, where the chat template puts it
    for b, pad in enumerate((0, 1)):
        ids = inputs.input_ids[b]
        assert (ids == vlm.image_token_id).nonzero().view(-1).tolist() == [pad + IMAGE_AT]
    assert inputs.prompt_spans == ((5, 11), (6, 11))  # the 5-word prompt is left-padded by 1
    for b, prompt in enumerate(PROMPTS):
        start, end = inputs.prompt_spans[b]
        words = vlm.tokenizer.convert_ids_to_tokens(inputs.input_ids[b, start:end].tolist())
        assert words == prompt.split() and inputs.prompt_tokens[b] == tuple(prompt.split())


def test_a_partly_covered_grid_and_its_crop_box(vlm):
    # 44x32 fits a 1x2 canvas unscaled: 44 px wide = 5.5 patches -> 6 columns, the last half
    # padding; the crop box runs 4 px past the image's right edge
    one = vlm.prepare(Image.new("RGB", (44, 32), "red"), PROMPTS[0])
    (span,) = one.image_spans[0]
    assert span.grid == (4, 6) and span.crop == (0.0, 0.0, 48.0, 32.0)
    assert (one.pixel_values[0, 0, 1, :, :, 12:] == -1).all()  # zero padding, normalised


def test_cross_attention_mask(vlm, inputs):
    mask = inputs.tensors["cross_attention_mask"]
    length = inputs.input_ids.shape[1]
    assert mask.shape == (2, length, 1, 2)  # (batch, tokens, images, max tiles)
    pad = int((inputs.attention_mask[1] == 0).sum())
    assert (mask[0, :IMAGE_AT] == 0).all() and (mask[0, IMAGE_AT:] == 1).all()
    assert (mask[1, : pad + IMAGE_AT] == 0).all()
    assert (mask[1, pad + IMAGE_AT :, 0, 0] == 1).all() and (mask[1, :, 0, 1] == 0).all()
    forced = inputs.extend(torch.tensor([[7, 8], [9, 10]]))
    got = forced.tensors["cross_attention_mask"]
    assert got.shape == (2, length + 2, 1, 2)
    assert torch.equal(got[:, -2:], mask[:, -1:].expand(-1, 2, -1, -1))  # as the last token
    with capture(vlm, "lm.layer[1].cross_attn.probs") as cap:
        vlm.forward(inputs)
    probs = cap["lm.layer[1].cross_attn.probs"]  # keys: (images x tiles x 17) per item
    assert probs.shape == (2, 2, length, 2 * 17)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2, length), atol=1e-5)
    assert (probs[1, :, -1, 17:] == 0).all() and (probs[1, :, -1, :17] > 0).all()
    # before its <|image|> a token has no tile to read: transformers leaves its row unmasked
    assert (probs[1, :, pad, 17:] > 0).all()


def test_a_masked_cell_reaches_exactly_its_tile_patch_and_token(vlm, images):
    one = vlm.prepare(images[0], PROMPTS[0])  # grid 4x8 over two 4x4-patch tiles
    keep = torch.ones(1, 4, 8)
    keep[0, 1, 5] = 0  # row 1, column 5: tile 1, its patch (1, 1): pixels 8-15 x 8-15
    masked = vlm.mask_pixels(one.pixel_values, one, keep)
    changed = (masked != one.pixel_values).any(3)[0, 0]  # (tiles, 32, 32)
    assert changed[1, 8:16, 8:16].all() and int(changed.sum()) == 64
    embeds = []
    for pixels in (one.pixel_values, masked):
        with torch.no_grad(), capture(vlm, "vision.embed") as cap:
            vlm.forward(replace(one, tensors={**one.tensors, "pixel_values": pixels}))
        embeds.append(cap["vision.embed"])  # (tiles, dim, 4, 4)
    differs = (embeds[0] != embeds[1]).any(1)
    assert differs.nonzero().tolist() == [[1, 1, 1]]
    tile, pos = vlm.layout(images[0]).cells()
    assert (int(tile[1 * 8 + 5]), int(pos[1 * 8 + 5])) == (1, 1 + 1 * 4 + 1)
    pixel = torch.zeros_like(one.pixel_values)
    pixel[0, 0, 1, 2, 13, 30] = 1.0  # tile 1, patch (1, 3): grid cell (1, 4 + 3)
    (grid,) = vlm.pixel_grid(pixel, one)
    assert grid.shape == (4, 8) and grid[1, 7] == 1 and grid.sum() == 1
    value = torch.randn(1, 2 * 24, 5)
    (cells,) = vlm.vision_grid(value, one)
    assert cells.shape == (4, 8, 5) and torch.equal(cells[1, 5], value[0, 24 + 1 + 5])
    rows = vlm.vision_rows(one, 0, 2 * 24)  # what activation studies read at vision.* sites
    assert rows[:2] == [(0, "class", -1), (24, "class", -1)] and len(rows) == 2 + 32
    assert rows[2 + 1 * 8 + 5] == (24 + 1 + 5, "image", 1 * 8 + 5)


def test_a_replaced_image_token_is_one_key_of_the_cross_attention(vlm, images):
    one = vlm.prepare(images[0], PROMPTS[0])
    with torch.no_grad(), capture(vlm, "projector") as cap:
        clean = vlm.forward(one).logits
    value = cap["projector"]
    tokens = vlm.image_tokens(value, one)
    assert torch.equal(tokens[13], value[0, 0, 1, 6])
    edited = tokens.clone()
    edited[13] = 0
    out = vlm.with_image_tokens(value, edited, one)
    assert (out != value).any(-1).nonzero().tolist() == [[0, 0, 1, 6]]
    swap = {"projector": lambda v: vlm.with_image_tokens(v, edited, one)}
    with torch.no_grad(), patch(vlm, swap):
        ablated = vlm.forward(one).logits
    assert (ablated[0, -1] - clean[0, -1]).abs().max() > 1e-6  # the answer reads that key


def test_token_space_gradients_cover_every_cell(vlm, images):
    one = vlm.prepare(images[0], PROMPTS[0])
    exp = make_method("saliency", space="tokens")(vlm, one, TokenId(7))
    grid = exp.image_map(0)
    assert grid.shape == (4, 8) and np.isfinite(grid).all() and (grid > 0).all()
    pixels = make_method("saliency")(vlm, one, TokenId(7)).image_map(0)
    assert pixels.shape == (4, 8) and (pixels > 0).all()


def test_teacher_forcing_scores_what_generation_produces(vlm, images):
    one = vlm.prepare(images[0], PROMPTS[0])
    assert_teacher_forcing(vlm, one)
    assert len(vlm.generate(one, max_new_tokens=2)) == 1


def test_text_only_prompts_skip_the_cross_attention(vlm):
    text = vlm.prepare(None, "describe the image")
    assert text.image_spans == ((),) and text.prompt_tokens[0] == ("describe", "the", "image")
    with torch.no_grad(), capture(vlm, ["lm.layer[0]", "lm.layer[2]"]) as cap:
        logits = vlm.forward(text).logits
    assert logits.shape[:2] == text.input_ids.shape and not cap.calls("lm.layer[1]")


def test_logit_lens_reads_the_text_positions(vlm, inputs):
    with torch.no_grad():
        logits = vlm.forward(inputs).logits[:, -1].float()
    token = int(logits[0].argmax())
    lens = LogitLens(k=3)(vlm, inputs, TokenId(token))
    expected = torch.softmax(logits, -1)[:, token].numpy()
    np.testing.assert_allclose(lens.target_probs[-1, :, -1], expected, rtol=1e-4)
    assert lens.positions[0][IMAGE_AT] == "<|image|>" and lens.spans == ((), ())
    with pytest.raises(InputError, match="cross-attention"):
        lens.image_map(0)


def test_analyses_that_need_image_tokens_in_the_sequence_say_why(vlm, inputs):
    for key in ("attention_knockout", "fastv"):
        with pytest.raises(NotApplicableError, match="image tokens"):
            make_analysis(key)(vlm, inputs)
    with pytest.raises(NotApplicableError, match="not behind cross-attention"):
        make_method("raw_attention")(vlm, inputs)
    with pytest.raises(NotApplicableError, match="cross-attention"):
        make_analysis("causal_trace", positions="image")(vlm, inputs)


def test_saved_folder_loads_through_mmscope_load(tmp_path, vlm, images):
    loaded = saved_and_loaded(vlm, tmp_path)
    assert type(loaded) is MllamaVLM
    assert type(loaded.processor).__name__ == "MllamaProcessor"
    assert type(loaded.processor.image_processor).__name__ == "MllamaImageProcessorPil"
    a_in = assert_same_run(loaded, vlm, images[0], PROMPTS[0])
    assert len(loaded.generate(a_in, max_new_tokens=2)) == 1
