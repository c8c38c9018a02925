"""The PaliGemma adapter (Beyer et al. 2024) on a tiny random-weight model built offline."""

from __future__ import annotations

import math

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
from transformers.models.gemma import modeling_gemma as gemma
from transformers.models.paligemma import modeling_paligemma as hf
from transformers.models.siglip import modeling_siglip as siglip

from mmscope.core.hooks import capture
from mmscope.core.registry import REGISTRY
from mmscope.core.targets import TokenId
from mmscope.methods.token.lens import LogitLens
from mmscope.models.paligemma import PaliGemmaVLM
from mmscope.toys.tiny.paligemma import tiny_paligemma

PROMPTS = ["what color is the circle ?", "how many objects are there"]
EXPECTED = {
    "vision.embed": siglip.SiglipVisionEmbeddings,
    "vision.layer": siglip.SiglipEncoderLayer,
    "vision.layer.attn": siglip.SiglipAttention,
    "vision.layer.attn.heads": nn.Linear,  # the output projection, whose input is read
    "vision.layer.mlp": siglip.SiglipMLP,
    "vision.layer.mlp.act": nn.Module,  # gelu (tanh) from ACT2FN
    "vision.norm": nn.LayerNorm,
    "projector": hf.PaliGemmaMultiModalProjector,
    "lm.embed": gemma.GemmaTextScaledWordEmbedding,
    "lm.layer": gemma.GemmaDecoderLayer,
    "lm.layer.attn": gemma.GemmaAttention,
    "lm.layer.attn.heads": nn.Linear,
    "lm.layer.mlp": gemma.GemmaMLP,
    "lm.layer.mlp.act": nn.Module,
    "lm.norm": gemma.GemmaRMSNorm,
    "lm_head": nn.Linear,
}


@pytest.fixture(scope="module")
def vlm() -> PaliGemmaVLM:
    return tiny_paligemma(seed=0)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), "red"), Image.new("RGB", (64, 40), "blue")]


@pytest.fixture(scope="module")
def inputs(vlm, images):
    return vlm.prepare(images, PROMPTS)


def test_registered_under_hf_class():
    entry = REGISTRY.get("paligemma", kind="adapter")
    assert entry.obj is PaliGemmaVLM
    assert entry.extra["hf_classes"] == ("PaliGemmaForConditionalGeneration",)


def test_every_role_resolves_to_its_module_type(vlm):
    assert set(EXPECTED) == set(PaliGemmaVLM.ROLES)
    assert_roles_resolve(vlm, EXPECTED)
    m = vlm.model.model
    layers = m.vision_tower.encoder.layers
    assert vlm.resolve("vision.layer[1].mlp.act") is layers[1].mlp.activation_fn
    assert vlm.resolve("lm.layer[-1].mlp.act") is m.language_model.layers[1].mlp.act_fn
    assert vlm.resolve("lm.layer[0].attn.heads") is m.language_model.layers[0].self_attn.o_proj
    assert vlm.resolve("vision.norm") is m.vision_tower.post_layernorm
    assert {"lm.layer.attn.probs", "vision.layer.attn.probs"} <= set(vlm.roles)
    assert vlm.num_heads("lm.layer") == 2 and vlm.num_heads("vision.layer") == 2
    caps = vlm.capabilities
    assert caps.generates and not caps.class_token
    assert set(caps.attention) == {"lm.layer", "vision.layer"}


def test_negative_indices_and_bad_sites(vlm):
    assert vlm.num_layers("lm.layer") == 2 and vlm.num_layers("vision.layer") == 2
    assert vlm.resolve("vision.layer[-2]") is vlm.resolve("vision.layer[0]")
    assert_sites_refused(
        vlm, ("lm.layer[2]", "vision.layer[-3]", "lm.layer", "projector[0]", "text.layer[0]")
    )


def test_tiny_model_is_deterministic_and_leaves_global_rng(vlm):
    assert_rebuilt_alike(vlm, lambda: tiny_paligemma(seed=0))


def test_image_tokens_come_first_then_bos_and_the_prompt(vlm, inputs):
    # 32 px / patch 8 -> 4x4 = 16 image tokens; then <bos>; the 6- and 5-word prompts give
    # 23 and 22 tokens, so the second item is left-padded by one.
    tok = vlm.tokenizer
    assert inputs.input_ids.shape == (2, 23)
    assert set(inputs.tensors) == {"input_ids", "attention_mask", "pixel_values", "token_type_ids"}
    assert inputs.pixel_values.shape == (2, 3, 32, 32)
    for b, pad in enumerate((0, 1)):
        (span,) = inputs.image_spans[b]
        assert (span.start, span.end, span.grid) == (pad, pad + 16, (4, 4))
        ids = inputs.input_ids[b]
        assert int((ids == vlm.image_token_id).sum()) == 16
        assert int(ids[pad + 16]) == tok.bos_token_id
        assert inputs.prompt_spans[b] == (pad + 17, 23)
        assert inputs.prompt_tokens[b] == tuple(PROMPTS[b].split())
        words = tok.convert_ids_to_tokens(ids[pad + 17 :].tolist())
        assert words == PROMPTS[b].split()
        assert inputs.tensors["token_type_ids"][b].eq(0).all()  # the whole prefix
    assert int(inputs.attention_mask[1, 0]) == 0
    # resized to 32x32 whole (aspect not kept): the grid covers the full original image
    assert inputs.image_spans[1][0].crop == (0.0, 0.0, 64.0, 40.0)
    assert inputs.extend_fill == {"token_type_ids": 1}


def test_prepare_matches_the_processor_called_as_documented(vlm, images):
    native = vlm.processor(images=images[1], text="<image>" + PROMPTS[0], return_tensors="pt")
    ours = vlm.prepare(images[1], PROMPTS[0])
    for key in ("input_ids", "attention_mask", "pixel_values", "token_type_ids"):
        assert torch.equal(native[key], ours.tensors[key]), key


def test_two_images_are_cut_from_one_run_and_text_only_works(vlm, images):
    both = vlm.prepare(images, "what color is the circle ?")
    first, second = both.image_spans[0]
    assert (first.start, first.end, second.start, second.end) == (0, 16, 16, 32)
    assert both.prompt_spans[0] == (33, 39)
    text = vlm.prepare(None, "describe the image")
    words = vlm.tokenizer.convert_tokens_to_ids(["describe", "the", "image"])
    assert text.input_ids.tolist() == [[vlm.tokenizer.bos_token_id, *words]]
    assert text.image_spans == ((),) and text.prompt_spans == ((1, 4),)
    with torch.no_grad():
        assert vlm.forward(text).logits.shape[:2] == (1, 4)


def test_a_masked_cell_and_a_pixel_map_to_their_token(vlm, images):
    inputs = vlm.prepare(images[0], "what color is the circle ?")
    keep = torch.ones(1, 4, 4)
    keep[0, 1, 2] = 0  # rows 8-15, columns 16-23 of the 32x32 image
    masked = vlm.mask_pixels(inputs.pixel_values, inputs, keep)
    changed = (masked != inputs.pixel_values).any(1)[0]
    assert changed[8:16, 16:24].all() and int(changed.sum()) == 64
    with torch.no_grad(), capture(vlm, ["vision.embed"]) as cap:
        vlm.model.model.vision_tower(inputs.pixel_values)
        clean = cap["vision.embed"]
    with torch.no_grad(), capture(vlm, ["vision.embed"]) as cap:
        vlm.model.model.vision_tower(masked)
    differs = (cap["vision.embed"] != clean).any(-1)[0]
    assert differs.nonzero().view(-1).tolist() == [1 * 4 + 2]  # patch (1, 2): token 6
    one = torch.zeros_like(inputs.pixel_values)
    one[0, 1, 13, 30] = 1.0
    (grid,) = vlm.pixel_grid(one, inputs)
    assert grid.shape == (4, 4) and grid[1, 3] == 1 and grid.sum() == 1


def test_vision_grid_is_the_patch_grid(vlm, inputs):
    value = torch.arange(2 * 16 * 3, dtype=torch.float).view(2, 16, 3)
    grids = vlm.vision_grid(value, inputs)
    assert [g.shape for g in grids] == [(4, 4, 3)] * 2
    assert torch.equal(grids[1][2, 1], value[1, 9])


def test_embeddings_are_scaled_and_image_features_replace_the_image_tokens(vlm, inputs):
    seen = []
    handle = vlm.resolve("lm.layer[0]").register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("hidden_states", a[0] if a else None)),
        with_kwargs=True,
    )
    try:
        with torch.no_grad(), capture(vlm, ["lm.embed", "projector"]) as cap:
            vlm.forward(inputs)
    finally:
        handle.remove()
    weight = vlm.resolve("lm.embed").weight
    scale = math.sqrt(vlm.model.config.text_config.hidden_size)
    assert torch.allclose(cap["lm.embed"], weight[inputs.input_ids] * scale, atol=1e-6)
    (hidden,) = seen
    span = inputs.image_spans[1][0]
    assert cap["projector"].shape == (2, 16, 32)
    assert torch.allclose(hidden[1, span.start : span.end], cap["projector"][1])
    assert torch.allclose(hidden[1, span.end :], cap["lm.embed"][1, span.end :])


def test_attention_prefix_is_bidirectional_and_the_suffix_causal(vlm, inputs):
    forced = inputs.extend(torch.tensor([[5, 6, 7], [5, 6, 7]]))
    assert forced.tensors["token_type_ids"][:, 23:].eq(1).all()
    with capture(vlm, ["lm.layer[0].attn.probs", "lm.layer[1].attn.probs"]) as cap:
        vlm.forward(forced)
    for probs in cap.values():
        p = probs[0]  # (heads, 26, 26), item 0 has no padding
        assert (p[:, 0, 1:23] > 0).all()  # image token 0 reads later image and prompt tokens
        assert (p[:, 3, 15] > 0).all() and (p[:, 20, 22] > 0).all()
        assert (p[:, :23, 23:] == 0).all()  # the prefix never reads the suffix
        assert (p[:, 23, 24:] == 0).all() and (p[:, 24, 25] == 0).all()  # suffix: causal
        assert (p[:, 25, :] > 0).all()
        assert (probs[1, :, :, 0] == 0).all()  # item 1's padding is read by no one
        assert torch.allclose(p.sum(-1), torch.ones(2, 26), atol=1e-5)


def test_teacher_forcing_scores_what_generation_produces(vlm, images):
    inputs = vlm.prepare(images[0], "what color is the circle ?")
    assert_teacher_forcing(vlm, inputs, 22)


def test_logit_lens_applies_paligemma_2_soft_cap(images):
    plain = tiny_paligemma(seed=0)
    assert plain.final_logit_softcap is None
    capped = tiny_paligemma(seed=0, text_model="gemma2")
    assert type(capped.resolve("lm.layer[0]")).__name__ == "Gemma2DecoderLayer"
    capped.model.config.text_config.final_logit_softcapping = 0.05  # strong, to be seen
    assert capped.final_logit_softcap == 0.05
    inputs = capped.prepare(images[0], "what color is the circle ?")
    with torch.no_grad():
        logits = capped.forward(inputs).logits[0, -1]
    assert logits.abs().max() < 0.05
    token = int(logits.argmin())
    lens = LogitLens(k=3)(capped, inputs, TokenId(token))
    expected = torch.softmax(logits.float(), -1)[token]
    assert lens.target_probs[-1, 0, -1] == pytest.approx(float(expected), rel=1e-4)
    with torch.no_grad(), capture(capped, ["lm.layer[-1]"]) as cap:
        capped.forward(inputs)
        raw = capped.resolve("lm_head")(capped.resolve("lm.norm")(cap["lm.layer[-1]"]))[0, -1]
    assert raw.abs().max() > 0.2  # uncapped, the lens would read other probabilities
    assert torch.softmax(raw, -1)[token] < 0.9 * expected


def test_generate_returns_one_string_per_item(vlm, inputs):
    texts = vlm.generate(inputs, max_new_tokens=3)
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)


def test_saved_folder_loads_through_mmscope_load(tmp_path, vlm, images):
    loaded = saved_and_loaded(vlm, tmp_path)
    assert type(loaded) is PaliGemmaVLM
    assert type(loaded.processor).__name__ == "PaliGemmaProcessor"
    assert type(loaded.processor.image_processor).__name__ == "SiglipImageProcessorPil"
    assert_same_run(loaded, vlm, images[1], PROMPTS[0])
