"""The LLaVA-NeXT adapter (Liu et al. 2024) on a tiny random-weight model built offline: any-res
views (a base view and the unpadded stitched tiles, rows ended by newlines) checked by hand and
against the model's own packing."""

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
from transformers.models.clip import modeling_clip as clip
from transformers.models.llama import modeling_llama as llama
from transformers.models.llava_next import modeling_llava_next as hf

import mmscope
from mmscope.core.errors import InputError
from mmscope.core.explanation import Explanation
from mmscope.core.hooks import capture
from mmscope.core.registry import REGISTRY
from mmscope.core.targets import TokenId
from mmscope.methods.token.sets import object_cells, positions
from mmscope.models.llava_next import LlavaNextVLM
from mmscope.toys.tiny.llava_next import tiny_llava_next, tiny_processor

PROMPT = "what color is the circle ?"
EXPECTED = {
    "vision.embed": clip.CLIPVisionEmbeddings,
    "vision.layer": clip.CLIPEncoderLayer,
    "vision.layer.attn": clip.CLIPAttention,
    "vision.layer.attn.heads": nn.Linear,
    "vision.layer.mlp": clip.CLIPMLP,
    "vision.layer.mlp.act": nn.Module,
    "projector": hf.LlavaNextMultiModalProjector,
    "lm.embed": nn.Embedding,
    "lm.layer": llama.LlamaDecoderLayer,
    "lm.layer.attn": llama.LlamaAttention,
    "lm.layer.attn.heads": nn.Linear,
    "lm.layer.mlp": llama.LlamaMLP,
    "lm.layer.mlp.act": nn.Module,
    "lm.norm": llama.LlamaRMSNorm,
    "lm_head": nn.Linear,
}


@pytest.fixture(scope="module")
def vlm() -> LlavaNextVLM:
    return tiny_llava_next(seed=0)


def test_registered_and_every_role_resolves(vlm):
    entry = REGISTRY.get("llava_next", kind="adapter")
    assert (
        entry.obj is LlavaNextVLM
        and "LlavaNextForConditionalGeneration" in entry.extra["hf_classes"]
    )
    assert mmscope.models.supported_classes()["LlavaNextForConditionalGeneration"] is LlavaNextVLM
    assert set(EXPECTED) == set(LlavaNextVLM.ROLES)
    assert_roles_resolve(vlm, EXPECTED)
    assert vlm.family == "llava_next" and vlm.CAM_SITE == "vision.layer[-1]"
    assert_sites_refused(vlm, ("lm.layer[2]", "vision.layer[-3]", "projector[0]", "image_newline"))


def test_one_tile_and_two_tiles_by_hand(vlm):
    """48x48: one 32 px tile; base 16 + 4 rows of (4 cells + newline) = 36 tokens. 64x32 (w x
    h): two tiles side by side, 16 + 4 * (8 + 1) = 52. Sequence: <s> [image] prompt answer :"""
    inputs = vlm.prepare([noise(48, 48), noise(64, 32)], [PROMPT, "describe the image ."])
    # the rows the model uses: 1 + 1 and 1 + 2 (the processor pads both to 3)
    assert tuple(inputs.pixel_values.shape) == (5, 3, 32, 32) and vlm.pixel_rows(inputs) == [2, 3]
    assert inputs.tensors["image_sizes"].tolist() == [[48, 48], [32, 64]]
    (b0, t0), (b1, t1) = inputs.image_spans
    assert (b1.view, b1.start, b1.end, b1.grid, b1.image) == ("base", 1, 17, (4, 4), 0)
    assert (t1.view, t1.start, t1.end, t1.grid) == ("tiles", 17, 53, (4, 8))
    assert list(t1.positions)[:9] == [17, 18, 19, 20, 21, 22, 23, 24, 26]  # 25: newline
    assert b1.crop == t1.crop == (0.0, 0.0, 64.0, 32.0)
    pad = 14  # the first item: 16 image tokens fewer, 2 prompt words more; left-padded
    assert (b0.start, b0.end, t0.end, t0.grid) == (1 + pad, 17 + pad, 37 + pad, (4, 4))
    cells = (17, 18, 19, 20, 22, 23, 24, 25, 27, 28, 29, 30, 32, 33, 34, 35)  # 21, 26, ...: \n
    assert list(t0.positions) == [p + pad for p in cells]
    ids = inputs.input_ids
    assert int((ids[1] == vlm.image_token_id).sum()) == 52 and bool(
        (ids[1, 1:53] == vlm.image_token_id).all()
    )
    assert int((ids[0] == vlm.image_token_id).sum()) == 36
    for b, prompt in enumerate([PROMPT, "describe the image ."]):
        start, end = inputs.prompt_spans[b]
        assert vlm.tokenizer.convert_ids_to_tokens(ids[b, start:end]) == prompt.split()
    tall = vlm.prepare(noise(32, 64), PROMPT).image_spans[0]
    assert [s.grid for s in tall] == [(4, 4), (8, 4)] and tall[1].end - tall[1].start == 40


def test_unpadding_and_the_box_it_leaves(vlm):
    """64x16 lies on a 64x32 best fit with 8 px of padding above and below: the 4x8 stitched
    grid loses its first and last row, and the tiles view covers the image exactly. 64x28 is
    padded by 2 px, which unpadding keeps: the box passes the image by 2 px."""
    (base, tiles) = vlm.prepare(noise(64, 16), PROMPT).image_spans[0]
    assert tiles.grid == (2, 8) and tiles.end - tiles.start == 18 and tiles.crop == (0, 0, 64, 16)
    assert base.crop == (0.0, 0.0, 64.0, 16.0)
    (_, tiles) = vlm.prepare(noise(64, 28), PROMPT).image_spans[0]
    assert tiles.grid == (4, 8) and tiles.crop == (0.0, -2.0, 64.0, 30.0)


def test_the_lm_gets_each_cells_projected_patch(vlm):
    """Cell (r, c) of the 64x16 tiles view is stitched row r + 1 (row 0 is padding), column c:
    tile c // 4, patch ((r + 1) % 4) * 4 + c % 4 of the projector's rows; newlines are the
    learned ``image_newline``; ``image_tokens`` gives exactly what the LM reads at the cells."""
    inputs = vlm.prepare(noise(64, 16), PROMPT)
    with torch.no_grad(), capture(vlm, "projector") as cap:
        vlm.forward(inputs)
    proj = cap["projector"]
    assert tuple(proj.shape) == (3, 16, 32)
    h = lm_input(vlm, inputs)[0]
    base, tiles = inputs.image_spans[0]
    for r in range(2):
        for c in range(8):
            expected = proj[1 + c // 4, ((r + 1) % 4) * 4 + c % 4]
            torch.testing.assert_close(h[tiles.positions[r * 8 + c]], expected)
    torch.testing.assert_close(h[base.start : base.end], proj[0])
    newline = vlm.model.model.image_newline
    for pos in (tiles.start + 8, tiles.start + 17):
        torch.testing.assert_close(h[pos], newline)
    cells = [p for s in (base, tiles) for p in s.positions]
    torch.testing.assert_close(vlm.image_tokens(proj, inputs), h[cells])
    with pytest.raises(InputError, match="tower rows"):
        vlm.image_tokens(proj[:-1], inputs)


def test_with_image_tokens_edits_exactly_its_cell(vlm):
    inputs = vlm.prepare([noise(64, 16), noise(48, 48)], [PROMPT, PROMPT])
    with torch.no_grad(), capture(vlm, "projector") as cap:
        vlm.forward(inputs)
    proj = cap["projector"]
    assert torch.equal(vlm.with_image_tokens(proj, vlm.image_tokens(proj, inputs), inputs), proj)

    def zero(value: torch.Tensor) -> torch.Tensor:
        tokens = vlm.image_tokens(value, inputs).clone()
        tokens[16 + 9] = 0.0  # image 1, tiles view, cell (1, 1)
        return vlm.with_image_tokens(value, tokens, inputs)

    clean, edited = lm_input(vlm, inputs), lm_input(vlm, inputs, {"projector": zero})
    tiles = inputs.image_spans[0][1]
    assert torch.nonzero((clean != edited).any(-1)).tolist() == [[0, tiles.positions[9]]]
    # cell (1, 1) is stitched row 2, column 1: the first tile's patch 2 * 4 + 1
    assert torch.nonzero((zero(proj) != proj).any(-1)).tolist() == [[1, 2 * 4 + 1]]


def test_token_space_gradients_land_on_their_cells(vlm):
    """Input x gradient on the image tokens equals (embedding x gradient) read at each view's
    cells of the LM's input, which knows nothing of tiles, unpadding or newlines."""
    inputs = vlm.prepare([noise(64, 16), noise(32, 64)], [PROMPT, "describe the image ."])
    exp = mmscope.explain(vlm, inputs, TokenId(5), method="input_x_gradient", space="tokens")
    per_position = embedding_x_gradient(vlm, inputs, TokenId(5))
    for item in range(2):
        for k, span in enumerate(inputs.image_spans[item]):
            expected = per_position[item, list(span.positions)].reshape(span.grid)
            got = torch.as_tensor(np.asarray(exp.image_scores[item][k][0]))
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)


def test_a_mask_in_the_image_maps_to_the_patches_under_it_in_every_view(vlm):
    """64x32: base cells are 16x8 px, tile cells 8x8 px. The box x 16..32, y 8..16 is base cell
    (1, 1) and tiles cells (1, 2), (1, 3), each in its place in the sequence."""
    inputs = vlm.prepare(noise(64, 32), PROMPT)
    base, tiles = inputs.image_spans[0]
    mask = np.zeros((32, 64), bool)
    mask[8:16, 16:32] = True
    assert positions(base, object_cells(mask, base, min_cover=0.5)) == [1 + 4 + 1]
    assert positions(tiles, object_cells(mask, tiles, min_cover=0.5)) == [17 + 9 + 2, 17 + 9 + 3]
    # 64x28: the tiles box starts 2 px above the image; a mask on its top 6 rows of pixels
    # covers the first row of 8 px cells
    (_, tiles) = vlm.prepare(noise(64, 28), PROMPT).image_spans[0]
    top = np.zeros((28, 64), bool)
    top[:6, :8] = True
    assert positions(tiles, object_cells(top, tiles, min_cover=0.5)) == [tiles.start]


def test_mask_pixels_and_pixel_grid_follow_the_views(vlm):
    inputs = vlm.prepare(noise(64, 16), PROMPT)
    values = inputs.pixel_values
    keep = [torch.ones(4, 4), torch.ones(2, 8)]
    keep[1][0, 5] = 0.0  # tiles cell (0, 5): stitched row 1, col 5: tile 1, patch row 1, col 1
    masked = vlm.mask_pixels(values, inputs, keep, 0.0)  # type: ignore[arg-type]
    changed = torch.nonzero((masked != values).any(1)).tolist()  # rows: base, tile 0, tile 1
    assert {(t, y // 8, x // 8) for t, y, x in changed} == {(2, 1, 1)} and len(changed) == 64
    grids = vlm.pixel_grid((masked - values).abs(), inputs)
    assert [tuple(g.shape) for g in grids] == [(4, 4), (2, 8)]
    assert grids[0].sum() == 0 and torch.nonzero(grids[1]).tolist() == [[0, 5]]
    keep = [torch.ones(4, 4), torch.ones(2, 8)]
    keep[0][3, 0] = 0.5
    masked = vlm.mask_pixels(values, inputs, keep, 0.0)  # type: ignore[arg-type]
    torch.testing.assert_close(masked[0, :, 24:, :8], values[0, :, 24:, :8] * 0.5)
    assert torch.equal(masked[0, :, :24], values[0, :, :24]) and torch.equal(masked[1:], values[1:])


def test_vision_grid_stitches_and_unpads_the_towers_patches(vlm):
    inputs = vlm.prepare(noise(64, 16), PROMPT)
    value = torch.zeros(3, 17, 2)  # class token first
    value[2, 1 + 1 * 4 + 1, 1] = 1.0  # tile 1, patch (1, 1) -> stitched (1, 5) -> cell (0, 5)
    value[0, 1 + 6, 0] = 1.0  # base patch (1, 2)
    base, tiles = vlm.vision_grid(value, inputs)
    assert tuple(base.shape) == (4, 4, 2) and tuple(tiles.shape) == (2, 8, 2)
    assert torch.nonzero(base).tolist() == [[1, 2, 0]]
    assert torch.nonzero(tiles).tolist() == [[0, 5, 1]]


def test_a_one_hot_score_lands_on_its_patch_in_the_original_image(vlm):
    """64x32, tiles view: cell (2, 5) is x 40..48, y 16..24 of the original image; base cell
    (0, 3) is x 48..64, y 0..8."""
    inputs = vlm.prepare(noise(64, 32), PROMPT)
    spans = inputs.image_spans[0]
    tiles_map, base_map = np.zeros((1, 4, 8), np.float32), np.zeros((1, 4, 4), np.float32)
    tiles_map[0, 2, 5] = 1.0
    base_map[0, 0, 3] = 1.0
    exp = Explanation(
        method="m",
        settings={},
        target="t",
        labels=(("x",),),
        image_scores=((base_map, tiles_map),),
        text_scores=(np.zeros((1, 0), np.float32),),
        prompt_tokens=((),),
        spans=(spans,),
        images=inputs.images,
    )
    heat = exp.heatmap(0, view=1)
    y, x = np.unravel_index(heat.argmax(), heat.shape)
    assert 16 <= y < 24 and 40 <= x < 48
    ys, xs = np.nonzero(heat > 0.5 * heat.max())
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (16, 23, 40, 47)
    base = exp.heatmap(0, view=0)
    ys, xs = np.nonzero(base > 0.5 * base.max())
    assert ys.max() < 8 and xs.min() >= 48
    both = exp.heatmap(0)  # base cells are 2 tile cells: counted at half their score
    np.testing.assert_allclose(both, heat + 0.5 * base, rtol=1e-6)


def test_two_images_in_one_prompt_are_split_into_their_views(vlm):
    inputs = vlm.prepare([noise(48, 48), noise(64, 32)], PROMPT)
    spans = inputs.image_spans[0]
    assert [(s.image, s.view, s.start, s.end) for s in spans] == [
        (0, "base", 1, 17),
        (0, "tiles", 17, 37),
        (1, "base", 37, 53),
        (1, "tiles", 53, 89),
    ]
    assert inputs.views(0, 1) == [2, 3] and inputs.prompt_tokens[0] == tuple(PROMPT.split())
    assert vlm.pixel_rows(inputs) == [2, 3]
    assert torch.isfinite(vlm.forward(inputs).logits).all()


def test_a_processor_cutting_more_tiles_than_the_model_packs_is_refused(vlm):
    other = LlavaNextVLM(vlm.model, tiny_processor([[32, 96], [96, 32]]), "other")
    with pytest.raises(InputError, match=r"cut into 3 tiles by the processor, over the 2") as err:
        other.prepare(noise(96, 32), PROMPT)
    assert "\n" not in str(err.value)
    fewer = LlavaNextVLM(vlm.model, tiny_processor([[32, 32]]), "fewer")
    with pytest.raises(InputError, match=r"cut into 1 tiles by the processor, where fewer packs 2"):
        fewer.prepare(noise(64, 32), PROMPT)


def test_saved_folder_loads_through_mmscope_load(tmp_path, vlm):
    loaded = saved_and_loaded(vlm, tmp_path)
    assert type(loaded) is LlavaNextVLM
    assert type(loaded.processor.image_processor).__name__ == "LlavaNextImageProcessorPil"
    image = noise(64, 32)
    a_in, b_in = loaded.prepare(image, PROMPT), vlm.prepare(image, PROMPT)
    assert a_in.image_spans == b_in.image_spans
    with torch.no_grad():
        a, b = loaded.forward(a_in).logits, vlm.forward(b_in).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
