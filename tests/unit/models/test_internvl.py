"""The InternVL adapter (Chen et al. 2024, InternVL 2.5/3) on a tiny random-weight model: tiles
of 32 px, patch 8, 2x2 tokens per tile after the pixel shuffle, up to 4 tiles + a thumbnail."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import (
    assert_rebuilt_alike,
    assert_roles_resolve,
    assert_same_run,
    assert_sites_refused,
    saved_and_loaded,
)
from PIL import Image, ImageDraw
from torch import nn
from transformers.models.internvl import modeling_internvl as hf
from transformers.models.qwen2 import modeling_qwen2 as qwen2

from mmscope.core.errors import ImageError, InputError
from mmscope.core.explanation import Explanation
from mmscope.core.hooks import capture
from mmscope.core.registry import REGISTRY
from mmscope.methods.token.sets import object_cells, positions
from mmscope.models.internvl import InternVLVLM
from mmscope.toys.tiny.internvl import tiny_internvl, tiny_processor

PROMPTS = ["what color is the circle ?", "how many objects are there"]
EXPECTED = {
    "vision.embed": hf.InternVLVisionEmbeddings,
    "vision.layer": hf.InternVLVisionLayer,
    "vision.layer.attn": hf.InternVLVisionAttention,
    "vision.layer.attn.heads": nn.Linear,
    "vision.layer.mlp": hf.InternVLVisionMLP,
    "vision.layer.mlp.act": nn.Module,
    "projector": hf.InternVLMultiModalProjector,
    "lm.embed": nn.Embedding,
    "lm.layer": qwen2.Qwen2DecoderLayer,
    "lm.layer.attn": qwen2.Qwen2Attention,
    "lm.layer.attn.heads": nn.Linear,
    "lm.layer.mlp": qwen2.Qwen2MLP,
    "lm.layer.mlp.act": nn.Module,
    "lm.norm": qwen2.Qwen2RMSNorm,
    "lm_head": nn.Linear,
}
#: The 64x32 image alone: <|im_start|> user <img> [tile 0,0] [tile 0,1] [thumbnail] </img> ...
WIDE = {"tile 0,0": (3, 7), "tile 0,1": (7, 11), "thumbnail": (11, 15)}


@pytest.fixture(scope="module")
def vlm() -> InternVLVLM:
    return tiny_internvl(seed=0)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    # 32x32: one tile, no thumbnail (4 tokens); 64x32: 2 tiles side by side + thumbnail (12)
    return [Image.new("RGB", (32, 32), "red"), Image.new("RGB", (64, 32), "blue")]


@pytest.fixture(scope="module")
def inputs(vlm, images):
    return vlm.prepare(images, PROMPTS)


def _lm_input(vlm: InternVLVLM, inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The LM's input embeddings and the projector's output, from one forward."""
    seen = []
    hook = vlm.resolve("lm.layer[0]").register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("hidden_states", a[0] if a else None)), with_kwargs=True
    )
    try:
        with torch.no_grad(), capture(vlm, "projector") as cap:
            vlm.forward(inputs)
    finally:
        hook.remove()
    return seen[0], cap["projector"]


def _patch_embed_diff(vlm: InternVLVLM, inputs, a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """LM positions of the tokens whose patch embeddings differ between pixels ``a`` and
    ``b`` (before attention mixes a tile's patches), through the model's own pixel shuffle."""
    embeds = []
    for pixels in (a, b):
        with torch.no_grad(), capture(vlm, "vision.embed") as cap:
            vlm.model.model.vision_tower(pixels)
        patches = cap["vision.embed"][:, 1:].reshape(-1, 4, 4, 32)
        embeds.append(vlm.model.model.pixel_shuffle(patches, scale_factor=0.5).reshape(-1, 4, 128))
    moved = (embeds[0] != embeds[1]).any(-1).nonzero().tolist()
    spans = vlm.flat_spans(inputs)
    return [spans[t].positions[c] for t, c in moved]


def _spans(inputs) -> tuple:
    return inputs.image_spans, inputs.images


def test_registered_roles_and_bad_sites(vlm):
    entry = REGISTRY.get("internvl", kind="adapter")
    assert entry.obj is InternVLVLM
    assert entry.extra["hf_classes"] == ("InternVLForConditionalGeneration",)
    assert set(EXPECTED) == set(InternVLVLM.ROLES)
    assert_roles_resolve(vlm, EXPECTED)
    attn = vlm.resolve("vision.layer[0].attn")
    assert vlm.resolve("vision.layer[0].attn.heads") is attn.projection_layer
    assert {"lm.layer.attn.probs", "vision.layer.attn.probs"} <= set(vlm.roles)
    assert vlm.CAM_SITE == "vision.layer[0]"  # the block before the one the projector reads
    assert_sites_refused(vlm, ("lm.layer[2]", "vision.layer[-3]", "projector[0]", "lm.layer"))
    assert_rebuilt_alike(vlm, lambda: tiny_internvl(seed=0))


def test_tiles_views_and_positions_for_two_sizes(vlm, inputs):
    # item 0: 17 tokens, 7 pads; item 1: 24. One tile (4 tokens) vs 2x1 tiles + thumbnail (12)
    assert inputs.input_ids.shape == (2, 24) and inputs.pixel_values.shape == (4, 3, 32, 32)
    assert vlm.pixel_rows(inputs) == [1, 3]
    (one,) = inputs.image_spans[0]
    assert (one.start, one.end, one.grid, one.view) == (10, 14, (2, 2), "tile 0,0")
    assert one.crop == (0.0, 0.0, 32.0, 32.0)
    wide = inputs.image_spans[1]
    assert {s.view: (s.start, s.end) for s in wide} == WIDE
    assert [s.crop for s in wide] == [(0, 0, 32, 32), (32, 0, 64, 32), (0, 0, 64, 32)]
    assert all(s.grid == (2, 2) and s.image == 0 for s in wide) and inputs.views(1, 0) == [0, 1, 2]
    tok = vlm.tokenizer
    for b, spans in enumerate(inputs.image_spans):
        ids = inputs.input_ids[b]
        start, end = spans[0].start, spans[-1].end
        assert int((ids == vlm.image_token_id).sum()) == end - start  # one contiguous run
        around = tok.convert_ids_to_tokens([int(ids[start - 1]), int(ids[end])])
        assert around == ["<img>", "</img>"]
    assert inputs.prompt_spans == ((15, 21), (16, 21))
    assert inputs.prompt_tokens == tuple(tuple(p.split()) for p in PROMPTS)
    square = vlm.prepare(Image.new("RGB", (48, 48)), PROMPTS[0])  # a tie: 2x2 tiles beat 1
    views = [s.view for s in square.image_spans[0]]
    assert views == ["tile 0,0", "tile 0,1", "tile 1,0", "tile 1,1", "thumbnail"]
    assert square.image_spans[0][3].crop == (24.0, 24.0, 48.0, 48.0)


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
    for key in ("input_ids", "attention_mask", "pixel_values"):
        assert torch.equal(native[key], ours.tensors[key]), key
    assert torch.equal(vlm.pixel_values_of([images[1]]), ours.pixel_values)
    text = vlm.prepare(None, "describe the image")
    assert text.image_spans == ((),) and "pixel_values" not in text.tensors


def test_pixel_shuffle_order_and_the_finer_vision_grid(vlm, images):
    """Token (i, j) of a tile is the channels of patches (2i + m, 2j + n), m major."""
    one = vlm.prepare(images[1], PROMPTS[0])
    seen = []
    hook = vlm.resolve("projector").register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad(), capture(vlm, "vision.layer[-1]") as cap:
            vlm.forward(one)
    finally:
        hook.remove()
    (shuffled,), last = seen, cap["vision.layer[-1]"]
    assert shuffled.shape == (3, 4, 128) and last.shape == (3, 17, 32)
    grids = vlm.vision_grid(last, one)
    assert [tuple(g.shape) for g in grids] == [(4, 4, 32)] * 3
    for t in range(3):
        for i, j, m, n in np.ndindex(2, 2, 2, 2):
            part = shuffled[t, i * 2 + j, (m * 2 + n) * 32 : (m * 2 + n + 1) * 32]
            assert torch.equal(part, last[t, 1 + (2 * i + m) * 4 + 2 * j + n])
            assert torch.equal(part, grids[t][2 * i + m, 2 * j + n])


def test_each_view_cell_holds_its_tiles_projected_token(vlm, inputs):
    hidden, tokens = _lm_input(vlm, inputs)
    assert tokens.shape == (4, 4, 32)  # tiles of the batch x tokens per tile
    flat = vlm.image_tokens(tokens, inputs)
    k = 0
    for b, spans in enumerate(inputs.image_spans):
        for span in spans:
            for c, pos in enumerate(span.positions):
                assert torch.allclose(hidden[b, pos], tokens[k, c])
                assert torch.allclose(flat[4 * k + c], tokens[k, c])
            k += 1
    assert torch.equal(vlm.with_image_tokens(tokens, flat, inputs), tokens)


def test_a_masked_cell_reaches_exactly_its_token(vlm, inputs):
    keep = torch.ones(4, 2, 2)
    keep[2, 1, 0] = 0  # item 1's tile 0,1 (pixel row 2): rows 16-31, columns 0-15
    masked = vlm.mask_pixels(inputs.pixel_values, inputs, [k for k in keep])
    changed = (masked != inputs.pixel_values).any(1)
    assert changed[2, 16:, :16].all() and int(changed.sum()) == 256
    one = vlm.prepare(inputs.images[1][0], PROMPTS[1])  # item 1 alone: the same positions
    assert {s.view: (s.start, s.end) for s in one.image_spans[0]} == WIDE
    diff = _patch_embed_diff(vlm, one, inputs.pixel_values[1:], masked[1:])
    assert diff == [7 + 2]  # tile 0,1 starts at 7; cell (1, 0) is its third
    pixel = torch.zeros_like(inputs.pixel_values)
    pixel[3, 1, 20, 5] = 1.0  # item 1's thumbnail, cell (1, 0)
    grids = vlm.pixel_grid(pixel, inputs)
    assert len(grids) == 4 and grids[3][1, 0] == 1 and sum(float(g.sum()) for g in grids) == 1


def test_an_original_mask_maps_to_the_patches_under_it_in_every_view(vlm, images):
    """A red 8x8 square at x 36-43, y 4-11 of the 64x32 image: tile 0,1 (x 32-63, no resize)
    cell (0, 0), and the thumbnail (64 -> 32 wide: x 18-21) cell (0, 1); not tile 0,0."""
    mask = np.zeros((32, 64), bool)
    mask[4:12, 36:44] = True
    one = vlm.prepare(images[1], PROMPTS[0])
    found = {s.view: positions(s, object_cells(mask, s)) for s in one.image_spans[0]}
    assert found == {"tile 0,0": [], "tile 0,1": [7], "thumbnail": [11 + 1]}
    painted = images[1].copy()
    ImageDraw.Draw(painted).rectangle((36, 4, 43, 11), fill="red")
    other = vlm.prepare(painted, PROMPTS[0])
    assert _patch_embed_diff(vlm, one, one.pixel_values, other.pixel_values) == [7, 12]
    before, _ = _lm_input(vlm, one)  # attention mixes a tile's tokens, never two tiles'
    after, _ = _lm_input(vlm, other)
    assert (before != after).any(-1)[0].nonzero().view(-1).tolist() == list(range(7, 15))


def test_a_one_hot_cell_heatmap_lands_on_its_pixels(vlm, images):
    one = vlm.prepare(images[1], PROMPTS[0])
    maps = [np.zeros((1, 2, 2), np.float32) for _ in range(3)]
    maps[1][0, 1, 0] = 1.0  # tile 0,1 cell (1, 0): x 32-47, y 16-31 of the original
    no_text = (np.zeros((1, 0), np.float32),)
    exp = Explanation("m", {}, "t", (("x",),), (tuple(maps),), no_text, ((),), *_spans(one))
    heat = exp.heatmap(0)
    assert heat.shape == (32, 64) and heat[:, :32].sum() == 0  # nothing on tile 0,0
    peak = np.argwhere(heat >= heat.max() - 1e-6)
    assert (peak[:, 0] >= 16).all() and (peak[:, 1] >= 32).all() and (peak[:, 1] < 48).all()
    assert heat.sum() == pytest.approx(16 * 16, rel=1e-3)  # one cell's pixels
    ys, xs = np.indices(heat.shape)
    assert 16 <= (heat * ys).sum() / heat.sum() < 32 and 32 <= (heat * xs).sum() / heat.sum() < 48


def test_typed_refusals(vlm, images):
    for size in ((1, 1), (40, 1)):  # token cells of under a pixel
        with pytest.raises(ImageError, match="too small"):
            vlm.prepare(Image.new("RGB", size), PROMPTS[0])
    assert len(vlm.prepare(Image.new("RGB", (40, 3)), PROMPTS[0]).image_spans[0]) == 5  # 4x1
    bad = tiny_processor()
    bad.image_processor.min_patches = 6  # more than max_patches: no grid fits
    with pytest.raises(InputError, match="outside its limit of 6 to 4 tiles"):
        InternVLVLM(vlm.model, bad).prepare(images[1], PROMPTS[0])
    other = tiny_processor()
    other.image_seq_length = 9
    with pytest.raises(InputError, match="9 tokens per tile"):
        InternVLVLM(vlm.model, other).prepare(images[1], PROMPTS[0])


def test_saved_folder_loads_through_mmscope_load(tmp_path, vlm, images):
    loaded = saved_and_loaded(vlm, tmp_path)
    assert type(loaded) is InternVLVLM and loaded.processor.image_seq_length == 4
    assert type(loaded.processor.image_processor).__name__ == "GotOcr2ImageProcessorPil"
    saved = (tmp_path / "processor_config.json").read_text()
    assert '"processor_class": "InternVLProcessor"' in saved  # the stock class, for users
    a_in = assert_same_run(loaded, vlm, images, PROMPTS)
    assert len(loaded.generate(a_in, max_new_tokens=2)) == 2
