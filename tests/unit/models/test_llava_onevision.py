"""The LLaVA-OneVision adapter (Li et al. 2024) on a tiny random-weight model built offline: the
any-res views with a SigLIP tower, the model's pooling of many tiles, base views alone for the
images of a multi-image prompt, video refused, and the image-only processor saved and loaded."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    assert_roles_resolve,
    assert_sites_refused,
    embedding_x_gradient,
    lm_input,
    noise,
    saved_and_loaded,
)
from torch import nn
from transformers.models.llava_onevision import modeling_llava_onevision as hf
from transformers.models.qwen2 import modeling_qwen2 as qwen2
from transformers.models.siglip import modeling_siglip as siglip

import mmscope
from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.hooks import capture
from mmscope.core.registry import REGISTRY
from mmscope.core.targets import TokenId
from mmscope.methods.token.sets import object_cells, positions
from mmscope.models import anyres
from mmscope.models.llava_next import LlavaNextVLM
from mmscope.models.llava_onevision import ImageOnlyLlavaOnevisionProcessor, LlavaOnevisionVLM
from mmscope.toys.tiny.llava_onevision import tiny_llava_onevision

PROMPT = "what color is the circle ?"
EXPECTED = {
    "vision.embed": siglip.SiglipVisionEmbeddings,
    "vision.layer": siglip.SiglipEncoderLayer,
    "vision.layer.attn": siglip.SiglipAttention,
    "vision.layer.attn.heads": nn.Linear,
    "vision.layer.mlp": siglip.SiglipMLP,
    "vision.layer.mlp.act": nn.Module,
    "projector": hf.LlavaOnevisionMultiModalProjector,
    "lm.embed": nn.Embedding,
    "lm.layer": qwen2.Qwen2DecoderLayer,
    "lm.layer.attn": qwen2.Qwen2Attention,
    "lm.layer.attn.heads": nn.Linear,
    "lm.layer.mlp": qwen2.Qwen2MLP,
    "lm.layer.mlp.act": nn.Module,
    "lm.norm": qwen2.Qwen2RMSNorm,
    "lm_head": nn.Linear,
}


@pytest.fixture(scope="module")
def vlm() -> LlavaOnevisionVLM:
    return tiny_llava_onevision(seed=0)


@pytest.fixture(scope="module")
def pooled() -> LlavaOnevisionVLM:
    return tiny_llava_onevision(seed=0, max_tiles=1)


def test_registered_and_every_role_resolves(vlm):
    entry = REGISTRY.get("llava_onevision", kind="adapter")
    assert entry.obj is LlavaOnevisionVLM and issubclass(LlavaOnevisionVLM, LlavaNextVLM)
    assert "LlavaOnevisionForConditionalGeneration" in entry.extra["hf_classes"]
    classes = mmscope.models.supported_classes()
    assert classes["LlavaOnevisionForConditionalGeneration"] is LlavaOnevisionVLM
    assert set(EXPECTED) == set(LlavaOnevisionVLM.ROLES)
    assert_roles_resolve(vlm, EXPECTED)
    assert not vlm.CLASS_TOKEN and vlm.CAM_SITE == "vision.layer[-1]" and vlm.max_tiles == 9
    assert not vlm.capabilities.video
    assert_sites_refused(vlm, ("vision.norm", "lm.layer[2]", "projector[0]"))


def test_views_for_one_and_two_tiles(vlm):
    """No class token: 16 base patches. 48x48: one tile, 16 + 4 * 5 = 36 tokens; 64x32: two,
    16 + 4 * 9 = 52. Sequence: <s> [image] prompt answer :"""
    inputs = vlm.prepare([noise(48, 48), noise(64, 32)], [PROMPT, PROMPT])
    assert inputs.tensors["batch_num_images"].tolist() == [1, 1]
    assert tuple(inputs.pixel_values.shape) == (2 + 3, 3, 32, 32)
    (b0, t0), (b1, t1) = inputs.image_spans
    assert (b1.start, b1.end, t1.start, t1.end, t1.grid) == (1, 17, 17, 53, (4, 8))
    assert (b0.start, t0.end, t0.grid) == (17, 53, (4, 4))  # left-padded by 16
    assert t1.positions[7:9] == (24, 26) and b1.crop == t1.crop == (0.0, 0.0, 64.0, 32.0)
    for b in range(2):
        assert int((inputs.input_ids[b] == vlm.image_token_id).sum()) == (36, 52)[b]


def test_the_lm_gets_each_cells_projected_patch(vlm):
    inputs = vlm.prepare(noise(64, 32), PROMPT)
    with torch.no_grad(), capture(vlm, "projector") as cap:
        vlm.forward(inputs)
    proj = cap["projector"]
    assert tuple(proj.shape) == (3, 16, 32)  # no class token
    h = lm_input(vlm, inputs)[0]
    base, tiles = inputs.image_spans[0]
    for r, c in ((0, 0), (1, 6), (3, 3), (3, 7)):
        torch.testing.assert_close(h[tiles.positions[r * 8 + c]], proj[1 + c // 4, r * 4 + c % 4])
    torch.testing.assert_close(h[tiles.start + 8], vlm.model.model.image_newline)
    cells = [p for s in (base, tiles) for p in s.positions]
    torch.testing.assert_close(vlm.image_tokens(proj, inputs), h[cells])


def test_many_tiles_are_pooled_as_the_model_pools_them(pooled):
    """anyres_max_1: 64x32's 4x8 kept patches are sqrt(2) tiles' worth, so the model shrinks
    them bilinearly to (4 // 1.414, 8 // 1.414) = 2x5 cells: 16 + 2 * 6 = 28 tokens. The cells'
    tokens are the resampled projector rows; an edit of one cell's token reaches the LM as
    exactly that token, and nothing else moves."""
    inputs = pooled.prepare(noise(64, 32), PROMPT)
    base, tiles = inputs.image_spans[0]
    assert tiles.grid == (2, 5) and tiles.end - base.start == 28
    with torch.no_grad(), capture(pooled, "projector") as cap:
        pooled.forward(inputs)
    proj = cap["projector"]
    h = lm_input(pooled, inputs)[0]
    cells = [p for s in (base, tiles) for p in s.positions]
    tokens = pooled.image_tokens(proj, inputs)
    torch.testing.assert_close(tokens, h[cells])
    my, mx = anyres.bilinear(4, 2), anyres.bilinear(8, 5)
    # bilinear, half-pixel centres: row i reads source (i + 0.5) * 2 - 0.5 = 0.5, 2.5; column j
    # reads (j + 0.5) * 1.6 - 0.5 = 0.3, ..., 3.5, ...
    assert my.tolist() == [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]
    torch.testing.assert_close(mx[0, :2], torch.tensor([0.7, 0.3], dtype=torch.float64))
    torch.testing.assert_close(mx[2, 3:5], torch.tensor([0.5, 0.5], dtype=torch.float64))

    def edit(value: torch.Tensor) -> torch.Tensor:
        t = pooled.image_tokens(value, inputs).clone()
        t[16 + 7] = 1.0  # tiles cell (1, 2)
        return pooled.with_image_tokens(value, t, inputs)

    edited = lm_input(pooled, inputs, {"projector": edit})
    assert torch.nonzero((edited - h).abs().amax(-1) > 1e-5).tolist() == [[0, tiles.positions[7]]]
    torch.testing.assert_close(edited[0, tiles.positions[7]], torch.ones(32), atol=1e-5, rtol=0)
    keep = [torch.ones(4, 4), torch.ones(2, 5)]
    # cell (1, 2) spans kept rows 2..4 and columns 3.2..4.8: it owns the patches whose centres
    # it holds, rows 2, 3 and columns 3 (tile 0's last) and 4 (tile 1's first)
    keep[1][1, 2] = 0
    masked = pooled.mask_pixels(inputs.pixel_values, inputs, keep, 0.0)  # type: ignore[arg-type]
    changed = torch.nonzero((masked != inputs.pixel_values).any(1)).tolist()
    owned = {(1, 2, 3), (1, 3, 3), (2, 2, 0), (2, 3, 0)}  # (row of pixel_values, patch y, x)
    assert {(t, y // 8, x // 8) for t, y, x in changed} == owned
    diff = pooled.pixel_grid((masked - inputs.pixel_values).abs(), inputs)
    assert torch.nonzero(diff[1]).tolist() == [[1, 2]] and diff[0].sum() == 0


def test_token_space_gradients_land_on_pooled_cells(pooled):
    """``with_image_tokens`` passes each pooled cell's token to the LM unchanged (the least
    change of the projector's output), so input x gradient on the image tokens is (embedding x
    gradient) at the cells' positions, for the pooled 32x64 (5x2 cells) and the unpooled 64x16."""
    inputs = pooled.prepare([noise(32, 64), noise(64, 16)], [PROMPT, "describe the image ."])
    assert inputs.image_spans[0][1].grid == (5, 2)
    exp = mmscope.explain(pooled, inputs, TokenId(5), method="input_x_gradient", space="tokens")
    per_position = embedding_x_gradient(pooled, inputs, TokenId(5))
    for item in range(2):
        for k, span in enumerate(inputs.image_spans[item]):
            expected = per_position[item, list(span.positions)].reshape(span.grid)
            got = torch.as_tensor(np.asarray(exp.image_scores[item][k][0]))
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)


def test_images_of_a_multi_image_prompt_are_base_views_alone(vlm):
    """Two images in one prompt: no tiles; each is padded to a square (mean colour), 16 patches
    and one newline. The 64x32 image's square is y -16..48, so its box passes the image."""
    inputs = vlm.prepare([noise(48, 48), noise(64, 32)], PROMPT)
    assert inputs.tensors["batch_num_images"].tolist() == [2]
    assert tuple(inputs.pixel_values.shape) == (2, 3, 32, 32) and vlm.pixel_rows(inputs) == [1, 1]
    a, b = inputs.image_spans[0]
    assert [(s.image, s.view, s.start, s.end, s.grid) for s in (a, b)] == [
        (0, "base", 1, 17, (4, 4)),
        (1, "base", 18, 34, (4, 4)),
    ]
    assert b.crop == (0.0, -16.0, 64.0, 48.0)
    ids = inputs.input_ids[0]
    assert int((ids[1:35] == vlm.image_token_id).sum()) == 34  # newlines 17 and 34 included
    mask = np.zeros((32, 64), bool)
    mask[0:16, 48:64] = True  # square cells are 16x16 px: row 1 (y 0..16), column 3
    assert positions(b, object_cells(mask, b, min_cover=0.5)) == [18 + 4 + 3]
    h = lm_input(vlm, inputs)[0]
    torch.testing.assert_close(h[17], vlm.model.model.image_newline)
    with torch.no_grad(), capture(vlm, "projector") as cap:
        vlm.forward(inputs)
    torch.testing.assert_close(
        vlm.image_tokens(cap["projector"], inputs), h[[*range(1, 17), *range(18, 34)]]
    )


def test_a_processor_packing_otherwise_than_the_model_is_refused(vlm, pooled):
    """The processor pools at anyres_max_1 (28 tokens for 64x32), the model at anyres_max_9 (52)."""
    other = LlavaOnevisionVLM(vlm.model, pooled.processor, "other")
    with pytest.raises(InputError, match="wrote 28 image tokens where the model packs 52") as err:
        other.prepare(noise(64, 32), PROMPT)
    assert "\n" not in str(err.value)


def test_video_is_refused_with_a_reason(vlm):
    for video, prompt in (
        (np.zeros((4, 8, 8, 3), np.uint8), PROMPT),
        ("clip.mp4", PROMPT),
        (noise(32, 32), "<video> what happens ?"),
    ):
        with pytest.raises(NotApplicableError, match="video"):
            vlm.prepare(video, prompt)


def test_saved_folder_loads_the_image_only_processor(tmp_path, vlm):
    loaded = saved_and_loaded(vlm, tmp_path)
    assert type(loaded) is LlavaOnevisionVLM
    assert isinstance(loaded.processor, ImageOnlyLlavaOnevisionProcessor)
    assert loaded.processor.to_dict()["processor_class"] == "LlavaOnevisionProcessor"
    assert (loaded.processor.num_image_tokens, loaded.processor.vision_aspect_ratio) == (
        16,
        "anyres_max_9",
    )
    image = noise(64, 32)
    a_in, b_in = loaded.prepare(image, PROMPT), vlm.prepare(image, PROMPT)
    assert a_in.image_spans == b_in.image_spans
    with torch.no_grad():
        a, b = loaded.forward(a_in).logits, vlm.forward(b_in).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
