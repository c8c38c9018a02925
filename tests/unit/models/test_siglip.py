"""The SigLIP adapter (Zhai et al. 2023) on a tiny random-weight ``SiglipModel``: no class token,
an attention-pooling head, texts padded to the tower's length and pooled at the last position."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_rebuilt_alike,
    assert_roles_resolve,
    assert_sites_refused,
    saved_and_loaded,
)
from PIL import Image
from torch import nn
from transformers import SiglipImageProcessorPil, SiglipProcessor
from transformers.models.siglip import modeling_siglip as hf

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.hooks import capture
from mmscope.core.registry import REGISTRY
from mmscope.models.loading import supported_classes
from mmscope.models.siglip import SiglipVLM
from mmscope.toys.tiny import siglip as builder
from mmscope.toys.tiny.siglip import TEXT_LENGTH

TEXTS = ["a red circle", "a blue square and a green cross"]
EXPECTED = {
    "vision.embed": hf.SiglipVisionEmbeddings,
    "vision.layer": hf.SiglipEncoderLayer,
    "vision.layer.attn": hf.SiglipAttention,
    "vision.layer.attn.heads": nn.Linear,  # the output projection, whose input is read
    "vision.layer.mlp": hf.SiglipMLP,
    "vision.layer.mlp.act": nn.Module,
    "vision.norm": nn.LayerNorm,
    "vision.head": hf.SiglipMultiheadAttentionPoolingHead,
    "vision.head.attn": nn.MultiheadAttention,
    "vision.head.mlp": hf.SiglipMLP,
    "text.embed": hf.SiglipTextEmbeddings,
    "text.layer": hf.SiglipEncoderLayer,
    "text.layer.attn": hf.SiglipAttention,
    "text.layer.attn.heads": nn.Linear,
    "text.layer.mlp": hf.SiglipMLP,
    "text.layer.mlp.act": nn.Module,
    "text.norm": nn.LayerNorm,
    "text.proj": nn.Linear,
}


@pytest.fixture(scope="module")
def image() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def inputs(tiny_siglip, image):
    return tiny_siglip.prepare([image, image], TEXTS)


def test_registered_under_hf_class():
    assert REGISTRY.get("siglip", kind="adapter").obj is SiglipVLM
    assert supported_classes()["SiglipModel"] is SiglipVLM
    assert SiglipVLM.contrastive and not SiglipVLM.CLASS_TOKEN


def test_every_role_resolves_to_its_module_type(tiny_siglip):
    vlm, m = tiny_siglip, tiny_siglip.model
    assert set(EXPECTED) == set(SiglipVLM.ROLES)
    assert_roles_resolve(vlm, EXPECTED)
    assert (
        vlm.resolve("vision.layer[-1].mlp.act")
        is m.vision_model.encoder.layers[1].mlp.activation_fn
    )
    assert vlm.resolve("vision.head") is m.vision_model.head
    assert vlm.resolve("text.proj") is m.text_model.head
    assert vlm.num_layers("vision.layer") == 2 and vlm.num_heads("text.layer") == 2
    assert {"vision.layer.attn.probs", "text.layer.attn.probs"} <= set(vlm.roles)
    assert_sites_refused(
        vlm, ("vision.proj", "vision.layer[2]", "text.layer", "vision.head[0]", "lm.layer[0]")
    )


def test_texts_are_padded_to_the_tower_and_spans_hold_the_words(tiny_siglip, inputs):
    ids, tok = inputs.input_ids, tiny_siglip.tokenizer
    assert ids.shape == (2, TEXT_LENGTH) and inputs.pixel_values.shape == (2, 3, 32, 32)
    assert inputs.prompt_spans == ((0, 3), (0, 7))  # no start token; </s> is not a word
    assert inputs.prompt_tokens[1] == tuple(TEXTS[1].split())
    assert ids[0, 3] == tok.eos_token_id and ids[1, 7] == tok.eos_token_id
    assert (ids[0, 4:] == tok.pad_token_id).all() and inputs.attention_mask[0].sum() == 4
    for item in inputs.image_spans:  # every position of the vision sequence is a patch
        (span,) = item
        assert (span.start, span.end, span.grid, span.sequence) == (0, 16, (4, 4), "vision")
        assert span.crop == (0.0, 0.0, 32.0, 32.0)
    assert tiny_siglip.text_pooling(inputs) == [TEXT_LENGTH - 1] * 2


def test_a_wide_image_is_squashed_whole(tiny_siglip):
    wide = Image.new("RGB", (80, 40), "red")  # resized to 32x32, aspect not kept
    span = tiny_siglip.prepare(wide, "a red circle").image_spans[0][0]
    assert span.grid == (4, 4) and span.crop == (0.0, 0.0, 80.0, 40.0)


def test_bad_inputs(tiny_siglip, image):
    with pytest.raises(InputError, match="empty"):
        tiny_siglip.prepare(image, " ")
    with pytest.raises(InputError, match="at least one image"):
        tiny_siglip.prepare(None, "a red circle")
    with pytest.raises(InputError, match="longer than the 24 tokens"):
        tiny_siglip.prepare(image, " ".join(["a"] * TEXT_LENGTH))


def test_one_masked_cell_changes_exactly_its_token(tiny_siglip, inputs):
    """Cell (1, 2) is pixels rows 8-15, columns 16-23; with no class token it is position 6."""
    vlm = tiny_siglip
    keep = torch.ones(2, 4, 4)
    keep[:, 1, 2] = 0
    masked = vlm.mask_pixels(inputs.pixel_values, inputs, keep, 0.0)
    changed = (masked != inputs.pixel_values).any(1)[0]
    assert changed[8:16, 16:24].all() and changed.sum() == 64
    embed = vlm.resolve("vision.embed")
    with torch.no_grad():
        a, b = embed(inputs.pixel_values), embed(masked)
    moved = (a - b).abs().amax(-1)[0] > 1e-6
    assert moved.nonzero().view(-1).tolist() == [6]
    grid = vlm.pixel_grid((masked - inputs.pixel_values).abs(), inputs)[0]
    assert grid.nonzero().tolist() == [[1, 2]]
    tokens = vlm.image_tokens(a, inputs)
    assert tokens.shape == (32, 32) and torch.equal(vlm.with_image_tokens(a, tokens, inputs), a)
    assert torch.equal(vlm.vision_grid(a, inputs)[0][1, 2], a[0, 6])


def test_similarity_is_scaled_cosine_plus_bias(tiny_siglip, inputs):
    vlm, m = tiny_siglip, tiny_siglip.model
    with torch.no_grad(), capture(vlm, ["vision.layer[-1]", "text.norm"]) as cap:
        out = vlm.forward(inputs)
    assert cap["vision.layer[-1]"].shape == (2, 16, 32)  # no class token
    with torch.no_grad():
        image = m.vision_model.head(m.vision_model.post_layernorm(cap["vision.layer[-1]"]))
        text = m.text_model.head(cap["text.norm"][:, -1])  # the last (padding) position
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    expect = image @ text.T * m.logit_scale.exp() + m.logit_bias
    torch.testing.assert_close(out.logits_per_image, expect)
    torch.testing.assert_close(vlm.similarity(inputs), expect)
    # padded to the tower's length, a text scores the same alone as in a batch
    alone = vlm.similarity(vlm.prepare(inputs.images[0][0], TEXTS[0]))
    torch.testing.assert_close(alone[0, 0], expect[0, 0])


def test_vision_pooling_is_the_probe_attention(tiny_siglip, inputs):
    vlm, head = tiny_siglip, tiny_siglip.model.vision_model.head
    with torch.no_grad(), capture(vlm, "vision.norm") as cap:
        vlm.forward(inputs)
        x, d = cap["vision.norm"], 32
        w, b = head.attention.in_proj_weight, head.attention.in_proj_bias
        q = (head.probe @ w[:d].T + b[:d]).view(1, 2, 16)  # 2 heads of 16
        k = (x @ w[d : 2 * d].T + b[d : 2 * d]).view(2, 16, 2, 16)
        probs = torch.einsum("qhc,bkhc->bhk", q, k).div(4.0).softmax(-1).mean(1)
    pooled = vlm.vision_pooling(inputs)
    assert pooled.shape == (2, 16)
    torch.testing.assert_close(pooled, probs)
    torch.testing.assert_close(pooled.sum(-1), torch.ones(2))


def test_raw_attention_reads_the_probe_and_the_last_text_position(tiny_siglip, inputs):
    from mmscope.methods.attribution.attention import RawAttention

    vlm = tiny_siglip
    one = vlm.prepare(inputs.images[0][0], TEXTS[0])
    sites = ["vision.layer[1].attn.probs", "text.layer[1].attn.probs"]
    with torch.no_grad(), vlm.attention("eager"), capture(vlm, sites) as cap:
        vlm.forward(one)
    e = RawAttention(layer=1, head=0)(vlm, one)
    row = vlm.vision_pooling(one)[0] @ cap[sites[0]][0, 0].float()
    torch.testing.assert_close(torch.from_numpy(e.image_scores[0][0][0]), row.view(4, 4))
    text = cap[sites[1]][0, 0, TEXT_LENGTH - 1, 0:3].float()
    torch.testing.assert_close(torch.from_numpy(e.text_scores[0][0]), text)


def test_logit_lens_reads_each_patch_as_a_one_token_image(tiny_siglip, inputs):
    from mmscope.methods.inside import analyse

    vlm, m = tiny_siglip, tiny_siglip.model
    lens = analyse("logit_lens", vlm, inputs)
    assert lens.top_ids.shape[:3] == (2, 2, 16) and "[class]" not in lens.positions[0]
    with torch.no_grad(), capture(vlm, "vision.layer[1]") as cap:
        out = vlm.forward(inputs)
        h = m.vision_model.post_layernorm(cap["vision.layer[1]"][0, 5])
        image = F.normalize(m.vision_model.head(h.view(1, 1, -1)), dim=-1)
        p = (image @ out.text_embeds.T * m.logit_scale.exp()).softmax(-1)[0, 0]
    assert lens.target_probs[1, 0, 5] == pytest.approx(float(p), abs=1e-5)


def test_class_token_methods_refuse(tiny_siglip, inputs):
    from mmscope.methods.inside import analyse
    from mmscope.methods.study import study
    from mmscope.world.items import world_items

    with pytest.raises(NotApplicableError, match="class token"):
        analyse("attention_knockout", tiny_siglip, inputs)
    with pytest.raises(NotApplicableError, match="class token"):
        study("textspan", tiny_siglip, world_items(3, contrastive=True))


def test_saved_folder_loads_through_mmscope_load(tmp_path, tiny_siglip, inputs):
    vlm = saved_and_loaded(tiny_siglip, tmp_path)
    assert type(vlm) is SiglipVLM and not vlm.model.training
    assert isinstance(vlm.processor, SiglipProcessor)
    assert isinstance(vlm.processor.image_processor, SiglipImageProcessorPil)
    again = vlm.prepare([im[0] for im in inputs.images], TEXTS)
    assert torch.equal(again.input_ids, inputs.input_ids)
    assert again.prompt_spans == inputs.prompt_spans
    torch.testing.assert_close(vlm.similarity(again), tiny_siglip.similarity(inputs))


def test_tiny_model_is_deterministic_and_leaves_global_rng(tiny_siglip):
    assert_rebuilt_alike(tiny_siglip, lambda: builder.tiny_siglip(seed=0))
