"""The Gemma 4 adapter (Google 2026) on a tiny random-weight model built offline."""

from __future__ import annotations

import math

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
from transformers import Gemma4ForConditionalGeneration
from transformers.models.gemma4 import modeling_gemma4 as hf

from mmscope.core.errors import NotApplicableError, SiteError
from mmscope.core.hooks import capture, patch
from mmscope.core.registry import REGISTRY
from mmscope.core.targets import TokenId
from mmscope.methods.token.lens import LogitLens
from mmscope.models.gemma4 import Gemma4VLM, ImageOnlyGemma4Processor
from mmscope.toys.tiny.gemma4 import SLIDING_WINDOW, SOFTCAP, tiny_gemma4

PROMPTS = ["what color is the circle ?", "how many objects are there"]
EXPECTED = {
    "vision.embed": hf.Gemma4VisionPatchEmbedder,
    "vision.layer": hf.Gemma4VisionEncoderLayer,
    "vision.layer.attn": hf.Gemma4VisionAttention,
    "vision.layer.attn.heads": nn.Linear,
    "vision.layer.mlp": hf.Gemma4VisionMLP,
    "vision.layer.mlp.act": nn.Module,
    "projector": hf.Gemma4MultimodalEmbedder,
    "lm.embed": hf.Gemma4TextScaledWordEmbedding,
    "lm.embed.per_layer": hf.Gemma4TextScaledWordEmbedding,
    "lm.layer": hf.Gemma4TextDecoderLayer,
    "lm.layer.attn": hf.Gemma4TextAttention,
    "lm.layer.attn.heads": nn.Linear,
    "lm.layer.mlp": hf.Gemma4TextMLP,
    "lm.layer.mlp.act": nn.Module,
    "lm.layer.mlp.router": hf.Gemma4TextRouter,
    "lm.layer.mlp.experts": hf.Gemma4TextExperts,
    "lm.norm": hf.Gemma4RMSNorm,
    "lm_head": nn.Linear,
}
#: <bos> <|turn> user <|image> [64 soft tokens] <image|> prompt <turn|> <|turn> model
START, END, LENGTH = 4, 68, 78


@pytest.fixture(scope="module")
def vlm() -> Gemma4VLM:
    return tiny_gemma4(seed=0)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), "red"), Image.new("RGB", (64, 40), "blue")]


@pytest.fixture(scope="module")
def inputs(vlm, images):
    return vlm.prepare(images, PROMPTS)


def test_registered_roles_and_layer_types(vlm):
    entry = REGISTRY.get("gemma4", kind="adapter")
    assert entry.obj is Gemma4VLM
    assert entry.extra["hf_classes"] == ("Gemma4ForConditionalGeneration",)
    assert set(EXPECTED) == set(Gemma4VLM.ROLES) and vlm.moe
    assert_roles_resolve(vlm, EXPECTED)
    assert vlm.resolve("projector") is vlm.model.model.embed_vision
    kinds = [vlm.resolve(f"lm.layer[{i}].attn").sliding_window for i in range(2)]
    assert kinds == [SLIDING_WINDOW, None]  # one sliding-window layer, one global
    assert [vlm.resolve(f"lm.layer[{i}].attn").head_dim for i in range(2)] == [16, 16]
    assert vlm.num_heads("lm.layer") == 2 and vlm.num_heads("vision.layer") == 2
    assert_sites_refused(
        vlm, ("lm.layer[2]", "vision.layer[-3]", "projector[0]", "lm.layer.mlp.router")
    )
    assert_rebuilt_alike(vlm, lambda: tiny_gemma4(seed=0))


def test_a_dense_checkpoint_without_ple_has_no_router_experts_or_ple(vlm):
    config = vlm.model.config.__class__.from_dict(vlm.model.config.to_dict())
    config.text_config.enable_moe_block = False
    config.text_config.hidden_size_per_layer_input = 0
    with torch.random.fork_rng(devices=[]):
        dense = Gemma4VLM(Gemma4ForConditionalGeneration(config).eval(), vlm.processor)
    gone = {"lm.layer.mlp.router", "lm.layer.mlp.experts", "lm.embed.per_layer"}
    assert not dense.moe and not gone & set(dense.roles) and gone < set(vlm.roles)
    with pytest.raises(SiteError, match="enable_moe_block is off"):
        dense.resolve("lm.layer[0].mlp.experts")
    with pytest.raises(SiteError, match="hidden_size_per_layer_input is off"):
        dense.resolve("lm.embed.per_layer")
    assert isinstance(dense.resolve("lm.layer[1].mlp.act"), nn.Module)
    with torch.no_grad():
        assert dense.forward(dense.prepare(None, PROMPTS[0])).logits.isfinite().all()


def test_soft_token_counts_and_grids_for_two_image_sizes(vlm, inputs):
    # 32x32 -> 64x64 (the largest multiple of 8 px a side within 280 patches of 4 px):
    # 16x16 patches, pooled 2x2 -> 8x8 = 64 soft tokens. 64x40 (w x h) -> 80x48: 20x12
    # patches -> 10 cols x 6 rows = 60 soft tokens, 5 fewer, so item 1 has 5 pads on the left.
    tok = vlm.tokenizer
    assert inputs.input_ids.shape == (2, LENGTH)
    assert inputs.pixel_values.shape == (2, 280, 4 * 4 * 3)
    expected = [(START, END, (8, 8), (0.0, 0.0, 32.0, 32.0)), (9, 69, (6, 10), (0, 0, 64, 40))]
    for b, (start, end, grid, crop) in enumerate(expected):
        (span,) = inputs.image_spans[b]
        assert (span.start, span.end, span.grid, span.crop) == (start, end, grid, crop)
        ids = inputs.input_ids[b]
        assert int(ids[span.start - 1]) == tok.boi_token_id
        assert int(ids[span.end]) == tok.eoi_token_id
        assert int((ids == tok.bos_token_id).sum()) == 1
        types = inputs.tensors["mm_token_type_ids"][b]
        assert types.nonzero().view(-1).tolist() == list(span.positions)
        start, end = inputs.prompt_spans[b]
        assert (start, end) == (span.end + 1, LENGTH - 3)
        assert tok.convert_ids_to_tokens(ids[start:end].tolist()) == PROMPTS[b].split()
    positions = inputs.tensors["image_position_ids"][1]
    assert positions[:240].max(0).values.tolist() == [19, 11]  # x < 20 patches, y < 12
    assert positions[21].tolist() == [1, 1] and (positions[240:] == -1).all()
    assert inputs.extend_fill == {}


def test_prepare_matches_the_processors_own_chat_path(vlm, images):
    content = [{"type": "image", "image": images[1]}, {"type": "text", "text": PROMPTS[0]}]
    native = vlm.processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    ours = vlm.prepare(images[1], PROMPTS[0])
    for key in ("input_ids", "pixel_values", "image_position_ids", "mm_token_type_ids"):
        assert torch.equal(native[key], ours.tensors[key]), key


def test_pixel_layout_and_a_masked_cell_reaches_exactly_its_soft_token(vlm):
    # 64x64 is not resized: 16x16 patches of 4 px, soft-token cells of 8 px
    picture = np.zeros((64, 64, 3), np.uint8)
    picture[16:24, 40:48] = 255  # cell (2, 5): patches rows 4-5, columns 10-11
    picture[61, 2, 0] = 255  # patch (15, 0), its pixel (1, 2), red
    one = vlm.prepare(Image.fromarray(picture), PROMPTS[0])
    pixels = one.pixel_values
    assert one.image_spans[0][0].grid == (8, 8)
    assert pixels[0, 15 * 16 + 0, (1 * 4 + 2) * 3 + 0] == 1  # (row, column, channel) order
    (grid,) = vlm.pixel_grid(pixels, one)
    assert grid[2, 5] == 8 * 8 * 3 and grid[7, 0] == 1 and grid.sum() == 193
    keep = torch.ones(1, 8, 8)
    keep[0, 2, 5] = 0
    masked = vlm.mask_pixels(pixels, one, keep)
    changed = (masked != pixels).any(-1)[0].nonzero().view(-1).tolist()
    assert changed == [4 * 16 + 10, 4 * 16 + 11, 5 * 16 + 10, 5 * 16 + 11]
    assert vlm.pixel_grid(masked, one)[0].sum() == 1
    positions = one.tensors["image_position_ids"]
    embeds = []
    for values in (pixels, masked):
        with torch.no_grad(), capture(vlm, ["vision.embed"]) as cap:
            vlm.model.model.get_image_features(values, positions)
        embeds.append(cap["vision.embed"])
    assert (embeds[0] != embeds[1]).any(-1)[0].nonzero().view(-1).tolist() == changed
    pooler, padding = vlm.model.model.vision_tower.pooler, (positions == -1).all(-1)
    with torch.no_grad():  # the model's own pooling of those patches
        pooled = [pooler(e, positions, padding, output_length=70)[0][0] for e in embeds]
    assert (pooled[0] != pooled[1]).any(-1).nonzero().view(-1).tolist() == [2 * 8 + 5]


def test_vision_grid_is_the_finer_patch_grid(vlm, inputs):
    value = torch.randn(2, 280, 32)
    grids = vlm.vision_grid(value, inputs)
    assert [g.shape for g in grids] == [(16, 16, 32), (12, 20, 32)]
    assert torch.equal(grids[1][3, 5], value[1, 3 * 20 + 5])
    with capture(vlm, ["vision.layer[-1]", "projector"]) as cap:
        vlm.forward(inputs)
    assert cap["vision.layer[-1]"].shape == (2, 280, 32)
    assert cap["projector"].shape == (64 + 60, 32)


def test_image_tokens_are_the_projector_output_and_embeddings_scaled(vlm, images):
    one = vlm.prepare(images[0], PROMPTS[0])
    seen = []
    handle = vlm.resolve("lm.layer[0]").register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("hidden_states", a[0] if a else None)),
        with_kwargs=True,
    )
    try:
        with torch.no_grad(), capture(vlm, ["lm.embed", "lm.embed.per_layer", "projector"]) as cap:
            vlm.forward(one)
    finally:
        handle.remove()
    # image positions are looked up as the pad token, in both embeddings
    ids = one.input_ids.masked_fill(one.input_ids == vlm.image_token_id, vlm.tokenizer.pad_token_id)
    for site, width in (("lm.embed", 32), ("lm.embed.per_layer", 8)):
        weight = vlm.resolve(site).weight
        assert torch.allclose(cap[site], weight[ids] * math.sqrt(width), atol=1e-6)
    assert cap["lm.embed.per_layer"].shape == (1, LENGTH, 2 * 8)  # both layers', packed
    (hidden,) = seen
    assert torch.allclose(hidden[0, START:END], cap["projector"])
    assert torch.allclose(hidden[0, END:], cap["lm.embed"][0, END:])
    with torch.no_grad():
        other = vlm.forward(vlm.prepare(Image.new("RGB", (32, 32), "green"), PROMPTS[0]))
        same = vlm.forward(one)
    assert (other.logits[0, -1] - same.logits[0, -1]).abs().max() > 1e-4


def test_image_tokens_attend_both_ways_in_sliding_layers_only(vlm, images):
    inputs = vlm.prepare(images[:1] * 2, PROMPTS[0])  # soft tokens 4-67 and 70-133
    forced = inputs.extend(torch.tensor([[10, 11]]))
    assert forced.tensors["mm_token_type_ids"][0, -2:].eq(0).all()
    sites = ["lm.layer[0].attn.probs", "lm.layer[1].attn.probs"]
    with capture(vlm, sites) as cap:
        vlm.forward(forced)
    sliding, full = cap[sites[0]][0], cap[sites[1]][0]  # (heads, T, T)
    length = forced.input_ids.shape[1]
    w = SLIDING_WINDOW  # a query reads keys k > q - w
    assert (sliding[:, 4, :68] > 0).all() and (sliding[:, 4, 68:] == 0).all()
    assert (sliding[:, 30, : 31 - w] == 0).all() and (sliding[:, 30, 31 - w : 68] > 0).all()
    assert (sliding[:, 67, : 68 - w] == 0).all() and (sliding[:, 67, 68:] == 0).all()
    assert (sliding[:, 70, 71 - w : 134] > 0).all() and (sliding[:, 70, 134:] == 0).all()
    for q in [3, 68, 69, *range(134, length)]:  # text, <|image>, <image|>: causal
        back = max(0, q + 1 - w)
        assert (sliding[:, q, q + 1 :] == 0).all() and (sliding[:, q, back : q + 1] > 0).all()
        assert (sliding[:, q, :back] == 0).all()
    for q in range(length):  # the global layer: causal for every token, image or text
        assert (full[:, q, q + 1 :] == 0).all() and (full[:, q, : q + 1] > 0).all()
    for p in (sliding, full):
        assert torch.allclose(p.sum(-1), torch.ones(2, length), atol=1e-5)


def test_router_and_experts_run_beside_the_dense_mlp(vlm, images):
    one = vlm.prepare(images[0], PROMPTS[0])
    sites = ["lm.layer[0].mlp.router", "lm.layer[0].mlp.experts", "lm.layer[0].mlp.act"]
    with torch.no_grad(), capture(vlm, sites) as cap:
        clean = vlm.forward(one).logits
    router, experts, act = (cap[s] for s in sites)
    assert router.shape == (LENGTH, 4) and torch.allclose(router.sum(-1), torch.ones(LENGTH))
    assert experts.shape == (LENGTH, 32) and act.shape == (1, LENGTH, 64)
    with torch.no_grad(), patch(vlm, {sites[1]: torch.zeros_like}):
        without = vlm.forward(one).logits
    assert (without - clean).abs().max() > 1e-4


def test_teacher_forcing_scores_what_generation_produces(vlm, images):
    inputs = vlm.prepare(images[1], PROMPTS[0])
    assert_teacher_forcing(vlm, inputs)


def test_logit_lens_reads_the_models_own_soft_capped_logits(vlm, inputs):
    assert vlm.final_logit_softcap == SOFTCAP == 30.0
    with torch.no_grad(), capture(vlm, ["lm.norm"]) as cap:
        logits = vlm.forward(inputs).logits[:, -1].float()
        raw = vlm.resolve("lm_head")(cap["lm.norm"][:, -1]).float()
    assert torch.allclose(logits, SOFTCAP * torch.tanh(raw / SOFTCAP), atol=1e-5)
    token = int(logits[0].argmax())
    lens = LogitLens(k=3)(vlm, inputs, TokenId(token))
    expected = torch.softmax(logits, -1)[:, token].numpy()
    np.testing.assert_allclose(lens.target_probs[-1, :, -1], expected, rtol=1e-4)
    assert lens.target_ranks[-1, 0, -1] == 0


def test_audio_is_refused(vlm, images):
    with pytest.raises(NotApplicableError, match="audio"):
        vlm.prepare(images[0], PROMPTS[0], audio=np.zeros(16_000, np.float32))
    with pytest.raises(NotApplicableError, match="audio"):
        vlm.prepare(images[0], "<|audio|> what is this ?")
    assert not vlm.capabilities.audio


def test_saved_folder_loads_through_mmscope_load(tmp_path, vlm, images):
    loaded = saved_and_loaded(vlm, tmp_path)
    assert type(loaded) is Gemma4VLM
    assert isinstance(loaded.processor, ImageOnlyGemma4Processor)
    assert loaded.processor.to_dict()["processor_class"] == "Gemma4Processor"
    assert type(loaded.processor.image_processor).__name__ == "Gemma4ImageProcessorPil"
    a_in = assert_same_run(loaded, vlm, images[1], PROMPTS[0])
    assert loaded.final_logit_softcap == SOFTCAP and loaded.moe
    assert len(loaded.generate(a_in, max_new_tokens=2)) == 1
