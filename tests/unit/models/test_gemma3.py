"""The Gemma 3 adapter (Gemma Team 2025) on a tiny random-weight model built offline."""

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
from transformers.models.gemma3 import modeling_gemma3 as hf
from transformers.models.siglip import modeling_siglip as siglip

from mmscope.core.hooks import capture
from mmscope.core.registry import REGISTRY
from mmscope.core.targets import TokenId
from mmscope.methods.token.lens import LogitLens
from mmscope.models.gemma3 import Gemma3VLM
from mmscope.toys.tiny.gemma3 import SLIDING_WINDOW, tiny_gemma3

PROMPTS = ["what color is the circle ?", "how many objects are there"]
EXPECTED = {
    "vision.embed": siglip.SiglipVisionEmbeddings,
    "vision.layer": siglip.SiglipEncoderLayer,
    "vision.layer.attn": siglip.SiglipAttention,
    "vision.layer.attn.heads": nn.Linear,
    "vision.layer.mlp": siglip.SiglipMLP,
    "vision.layer.mlp.act": nn.Module,
    "vision.norm": nn.LayerNorm,
    "projector": hf.Gemma3MultiModalProjector,
    "lm.embed": hf.Gemma3TextScaledWordEmbedding,
    "lm.layer": hf.Gemma3DecoderLayer,
    "lm.layer.attn": hf.Gemma3Attention,
    "lm.layer.attn.heads": nn.Linear,
    "lm.layer.mlp": hf.Gemma3MLP,
    "lm.layer.mlp.act": nn.Module,
    "lm.norm": hf.Gemma3RMSNorm,
    "lm_head": nn.Linear,
}
#: <bos> <start_of_turn> user <start_of_image> [16 soft tokens] <end_of_image> prompt ...
IMAGE_START, IMAGE_END = 4, 20


@pytest.fixture(scope="module")
def vlm() -> Gemma3VLM:
    return tiny_gemma3(seed=0)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    return [Image.new("RGB", (32, 32), "red"), Image.new("RGB", (64, 40), "blue")]


@pytest.fixture(scope="module")
def inputs(vlm, images):
    return vlm.prepare(images, PROMPTS)


def test_registered_roles_and_layer_types(vlm):
    entry = REGISTRY.get("gemma3", kind="adapter")
    assert entry.obj is Gemma3VLM and entry.extra["hf_classes"] == (
        "Gemma3ForConditionalGeneration",
    )
    assert set(EXPECTED) == set(Gemma3VLM.ROLES)
    assert_roles_resolve(vlm, EXPECTED)
    assert vlm.resolve("projector") is vlm.model.model.multi_modal_projector
    kinds = [vlm.resolve(f"lm.layer[{i}].attn").sliding_window for i in range(2)]
    assert kinds == [SLIDING_WINDOW, None]  # one sliding-window layer, one global
    assert_sites_refused(vlm, ("lm.layer[2]", "vision.layer[-3]", "projector[0]"))
    assert_rebuilt_alike(vlm, lambda: tiny_gemma3(seed=0))


def test_soft_tokens_sit_between_boi_and_eoi(vlm, inputs):
    # 32 px / patch 4 = 8x8 patches, pooled 2x2 -> 4x4 = 16 soft tokens per image
    tok = vlm.tokenizer
    assert inputs.input_ids.shape == (2, 30)
    for b, pad in enumerate((0, 1)):
        (span,) = inputs.image_spans[b]
        assert (span.start, span.end, span.grid) == (pad + IMAGE_START, pad + IMAGE_END, (4, 4))
        ids = inputs.input_ids[b]
        assert int(ids[pad]) == tok.bos_token_id and int((ids == tok.bos_token_id).sum()) == 1
        assert int(ids[span.start - 1]) == tok.boi_token_id
        assert int(ids[span.end]) == tok.eoi_token_id
        assert int((ids == vlm.image_token_id).sum()) == 16
        types = inputs.tensors["token_type_ids"][b]
        assert types.nonzero().view(-1).tolist() == list(span.positions)
        start, end = inputs.prompt_spans[b]
        assert start == pad + 21 and inputs.prompt_tokens[b] == tuple(PROMPTS[b].split())
        assert tok.convert_ids_to_tokens(ids[start:end].tolist()) == PROMPTS[b].split()
    assert inputs.image_spans[1][0].crop == (0.0, 0.0, 64.0, 40.0)
    assert inputs.extend_fill == {}


def test_prepare_matches_the_processors_own_chat_path(vlm, images):
    content = [{"type": "image", "image": images[0]}, {"type": "text", "text": PROMPTS[0]}]
    native = vlm.processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    ours = vlm.prepare(images[0], PROMPTS[0])
    for key in ("input_ids", "pixel_values", "token_type_ids"):
        assert torch.equal(native[key], ours.tensors[key]), key


def test_two_images_and_text_only(vlm, images):
    both = vlm.prepare(images, PROMPTS[0])
    first, second = both.image_spans[0]
    assert (first.start, first.end) == (4, 20) and (second.start, second.end) == (22, 38)
    assert both.prompt_spans[0] == (39, 45)
    text = vlm.prepare(None, "describe the image")
    assert text.image_spans == ((),) and text.prompt_tokens[0] == ("describe", "the", "image")
    with torch.no_grad():
        assert vlm.forward(text).logits.shape[:2] == text.input_ids.shape


def test_a_masked_pooled_cell_reaches_exactly_its_soft_token(vlm, inputs):
    one = vlm.prepare(inputs.images[0][0], PROMPTS[0])
    keep = torch.ones(1, 4, 4)
    keep[0, 1, 2] = 0  # pixels rows 8-15, columns 16-23: patches rows 2-3, columns 4-5
    masked = vlm.mask_pixels(one.pixel_values, one, keep)
    changed = (masked != one.pixel_values).any(1)[0]
    assert changed[8:16, 16:24].all() and int(changed.sum()) == 64
    embeds = []
    for pixels in (one.pixel_values, masked):
        with torch.no_grad(), capture(vlm, ["vision.embed"]) as cap:
            vlm.model.model.vision_tower(pixels)
        embeds.append(cap["vision.embed"])
    patches = (embeds[0] != embeds[1]).any(-1)[0].nonzero().view(-1).tolist()
    assert patches == [2 * 8 + 4, 2 * 8 + 5, 3 * 8 + 4, 3 * 8 + 5]
    with torch.no_grad():  # the model's own pooling and projection of those patches
        tokens = [vlm.resolve("projector")(e) for e in embeds]
    assert (tokens[0] != tokens[1]).any(-1)[0].nonzero().view(-1).tolist() == [1 * 4 + 2]
    pixel = torch.zeros_like(one.pixel_values)
    pixel[0, 2, 13, 30] = 1.0
    (grid,) = vlm.pixel_grid(pixel, one)
    assert grid.shape == (4, 4) and grid[1, 3] == 1 and grid.sum() == 1


def test_vision_grid_is_the_finer_patch_grid(vlm, inputs):
    value = torch.randn(2, 64, 32)
    grids = vlm.vision_grid(value, inputs)
    assert [g.shape for g in grids] == [(8, 8, 32)] * 2
    assert torch.equal(grids[1][3, 5], value[1, 3 * 8 + 5])
    with capture(vlm, ["vision.layer[-1]"]) as cap:
        vlm.forward(inputs)
    assert cap["vision.layer[-1]"].shape == (2, 64, 32)


def test_embeddings_are_scaled_and_soft_tokens_are_the_projector_output(vlm, inputs):
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
    scale = math.sqrt(vlm.model.config.text_config.hidden_size)
    weight = vlm.resolve("lm.embed").weight
    assert torch.allclose(cap["lm.embed"], weight[inputs.input_ids] * scale, atol=1e-6)
    (hidden,) = seen
    assert cap["projector"].shape == (2, 16, 32)
    assert torch.allclose(hidden[0, IMAGE_START:IMAGE_END], cap["projector"][0])
    assert torch.allclose(hidden[0, IMAGE_END:], cap["lm.embed"][0, IMAGE_END:])
    assert vlm.image_tokens(cap["projector"], inputs).shape == (32, 32)
    assert cap["projector"].abs().min() > 0  # the image reaches the LM (no zero projection)
    with torch.no_grad():
        other = vlm.forward(vlm.prepare(Image.new("RGB", (32, 32), "green"), PROMPTS[0]))
        same = vlm.forward(vlm.prepare(inputs.images[0][0], PROMPTS[0]))
    assert (other.logits[0, -1] - same.logits[0, -1]).abs().max() > 1e-4


def test_one_images_tokens_attend_to_each_other_the_text_causally(vlm, images):
    inputs = vlm.prepare(images, PROMPTS[0])  # two images: soft tokens 4-19 and 22-37
    forced = inputs.extend(torch.tensor([[10, 11]]))
    assert forced.tensors["token_type_ids"][0, -2:].eq(0).all()
    sites = ["lm.layer[0].attn.probs", "lm.layer[1].attn.probs"]
    with capture(vlm, sites) as cap:
        vlm.forward(forced)
    length = forced.input_ids.shape[1]
    for site in sites:
        p = cap[site][0]  # (heads, T, T)
        assert (p[:, 4, 5:20] > 0).all() and (p[:, 10, 19] > 0).all()  # j reads k > j
        assert (p[:, 4:20, 20:] == 0).all()  # not the eoi, the text or the second image
        assert (p[:, 22, 23:38] > 0).all() and (p[:, 22:38, 38:] == 0).all()
        assert (p[:, 3, 4:] == 0).all()  # <start_of_image> is text: causal
        for q in range(38, length):  # text after the images: causal
            assert (p[:, q, q + 1 :] == 0).all() and (p[:, q, q] > 0).all()
        assert torch.allclose(p.sum(-1), torch.ones(2, length), atol=1e-5)
    last = length - 1
    sliding, full = cap[sites[0]][0], cap[sites[1]][0]
    assert (sliding[:, last, : last - SLIDING_WINDOW + 1] == 0).all()
    assert (sliding[:, last, last - SLIDING_WINDOW + 1 :] > 0).all()
    assert (full[:, last] > 0).all()


def test_teacher_forcing_scores_what_generation_produces(vlm, images):
    inputs = vlm.prepare(images[0], PROMPTS[0])
    assert_teacher_forcing(vlm, inputs, 29)


def test_logit_lens_reads_the_models_own_logits(vlm, inputs):
    assert vlm.final_logit_softcap is None
    with torch.no_grad():
        logits = vlm.forward(inputs).logits[:, -1].float()
    token = int(logits[0].argmax())
    lens = LogitLens(k=3)(vlm, inputs, TokenId(token))
    expected = torch.softmax(logits, -1)[:, token].numpy()
    np.testing.assert_allclose(lens.target_probs[-1, :, -1], expected, rtol=1e-4)
    assert lens.target_ranks[-1, 0, -1] == 0


def test_saved_folder_loads_through_mmscope_load(tmp_path, vlm, images):
    loaded = saved_and_loaded(vlm, tmp_path)
    assert type(loaded) is Gemma3VLM
    assert type(loaded.processor).__name__ == "Gemma3Processor"
    assert type(loaded.processor.image_processor).__name__ == "Gemma3ImageProcessorPil"
    a_in = assert_same_run(loaded, vlm, images[1], PROMPTS[0])
    assert len(loaded.generate(a_in, max_new_tokens=2)) == 1
