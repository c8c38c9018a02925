"""The Idefics3 / SmolVLM adapter (Laurençon et al. 2024) on a tiny random-weight model built
offline: sub-image and global views, their runs of image tokens, pixels and patch grids."""

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
from transformers.models.idefics3 import modeling_idefics3 as hf
from transformers.models.llama import modeling_llama as llama

from mmscope.core.errors import ImageError, InputError
from mmscope.core.explanation import Explanation
from mmscope.core.hooks import capture
from mmscope.core.registry import REGISTRY
from mmscope.methods.token.sets import object_cells, positions
from mmscope.models.idefics3 import Idefics3VLM, ImageTooSmallError, TooManyTilesError
from mmscope.toys.tiny.idefics3 import TILE, tiny_idefics3, tiny_processor

PROMPTS = ["what color is the circle ?", "how many objects are there ?"]
EXPECTED = {
    "vision.embed": hf.Idefics3VisionEmbeddings,
    "vision.layer": hf.Idefics3EncoderLayer,
    "vision.layer.attn": hf.Idefics3VisionAttention,
    "vision.layer.attn.heads": nn.Linear,
    "vision.layer.mlp": hf.Idefics3VisionMLP,
    "vision.layer.mlp.act": nn.Module,
    "vision.norm": nn.LayerNorm,
    "projector": hf.Idefics3Connector,
    "lm.embed": nn.Embedding,
    "lm.layer": llama.LlamaDecoderLayer,
    "lm.layer.attn": llama.LlamaAttention,
    "lm.layer.attn.heads": nn.Linear,
    "lm.layer.mlp": llama.LlamaMLP,
    "lm.layer.mlp.act": nn.Module,
    "lm.norm": llama.LlamaRMSNorm,
    "lm_head": nn.Linear,
}
#: A 64x32 image: longest edge 64 -> 1 row x 2 columns of 32 px sub-images and the global view.
#: <bos> User: <fake> <row_1_col_1> [4] <fake> <row_1_col_2> [4] \n \n <fake> <global-img> [4]
#: <fake> what color is the circle ? <end_of_utterance> \n Assistant:
WIDE_RUNS = [(4, 8), (10, 14), (18, 22)]


@pytest.fixture(scope="module")
def vlm() -> Idefics3VLM:
    return tiny_idefics3(seed=0)


@pytest.fixture(scope="module")
def wide() -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (32, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def square() -> Image.Image:
    return Image.new("RGB", (48, 48), "red")


def test_registered_roles_and_seeding(vlm):
    entry = REGISTRY.get("idefics3", kind="adapter")
    assert entry.obj is Idefics3VLM
    assert entry.extra["hf_classes"] == ("Idefics3ForConditionalGeneration",)
    assert set(EXPECTED) == set(Idefics3VLM.ROLES)
    assert_roles_resolve(vlm, EXPECTED)
    assert vlm.resolve("projector") is vlm.model.model.connector
    assert_sites_refused(
        vlm, ("lm.layer[2]", "vision.layer[-3]", "projector[0]", "vision.layer.attn")
    )
    caps = vlm.capabilities
    assert caps.generates and caps.images_in == "sequence" and not caps.class_token
    assert caps.attention == ("lm.layer", "vision.layer")
    assert_rebuilt_alike(vlm, lambda: tiny_idefics3(seed=0))


def test_a_wide_image_is_two_sub_images_and_a_global_view(vlm, wide):
    inputs = vlm.prepare(wide, PROMPTS[0])
    tok = vlm.tokenizer
    ids = inputs.input_ids[0]
    assert inputs.input_ids.shape == (1, 32) and int((ids == vlm.image_token_id).sum()) == 12
    spans = inputs.image_spans[0]
    assert [(s.start, s.end) for s in spans] == WIDE_RUNS
    assert [s.view for s in spans] == ["sub 0,0", "sub 0,1", "global"]
    assert [s.crop for s in spans] == [(0, 0, 32, 32), (32, 0, 64, 32), (0, 0, 64, 32)]
    assert all(s.grid == (2, 2) and s.image == 0 and not s.cells for s in spans)
    markers = ["<row_1_col_1>", "<row_1_col_2>", "<global-img>"]
    assert tok.convert_ids_to_tokens([int(ids[s.start - 1]) for s in spans]) == markers
    assert tok.convert_ids_to_tokens(ids[14:18].tolist())[:2] == ["\n", "\n"]
    assert inputs.prompt_spans == ((23, 29),) and inputs.prompt_tokens[0] == tuple(
        PROMPTS[0].split()
    )
    assert inputs.pixel_values.shape == (3, 1, 3, TILE, TILE)
    assert "pixel_attention_mask" not in inputs.tensors  # every view is a full tile
    assert vlm.pixel_rows(inputs) == [3]


def test_views_for_other_sizes_and_without_splitting(vlm, square):
    tall = vlm.prepare(Image.new("RGB", (20, 40)), PROMPTS[0]).image_spans[0]
    assert [s.view for s in tall] == ["sub 0,0", "sub 1,0", "global"]
    assert [s.crop for s in tall] == [(0, 0, 20, 20), (0, 20, 20, 40), (0, 0, 20, 40)]
    # 48x48 -> 64x64: 2x2 sub-images (rows end in a newline, two before the global view)
    spans = vlm.prepare(square, PROMPTS[0]).image_spans[0]
    assert [(s.start, s.end) for s in spans] == [(4, 8), (10, 14), (17, 21), (23, 27), (31, 35)]
    assert spans[3].crop == (24, 24, 48, 48) and spans[4].view == "global"
    fits = Idefics3VLM(vlm.model, tiny_processor(longest_edge=TILE))  # fits one tile
    one = fits.prepare(square, PROMPTS[0])
    (span,) = one.image_spans[0]
    assert (span.start, span.end, span.view, span.crop) == (4, 8, "global", (0, 0, 48, 48))
    plain = Idefics3VLM(vlm.model, tiny_processor(splitting=False))
    for inputs in (one, plain.prepare(Image.new("RGB", (64, 32)), PROMPTS[0])):
        assert len(inputs.image_spans[0]) == 1 and inputs.pixel_values.shape[0] == 1
        with torch.no_grad():
            assert torch.isfinite(plain.forward(inputs).logits).all()


def test_prepare_matches_the_processors_own_chat_path(vlm, square):
    content = [{"type": "image", "image": square}, {"type": "text", "text": PROMPTS[0]}]
    native = vlm.processor.apply_chat_template(
        [{"role": "user", "content": content}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    ours = vlm.prepare(square, PROMPTS[0])
    assert torch.equal(native["input_ids"], ours.input_ids)
    assert torch.equal(native["pixel_values"][0][:, None], ours.pixel_values)  # one row a view
    with torch.no_grad():
        a, b = vlm.model(**native).logits, vlm.forward(ours).logits
    assert torch.equal(a, b)
    assert torch.equal(vlm.pixel_values_of([square]), ours.pixel_values)


def test_a_batch_is_its_items_one_after_another(vlm, wide, square):
    both = vlm.prepare([square, wide], PROMPTS)
    assert both.pixel_values.shape == (8, 1, 3, TILE, TILE) and vlm.pixel_rows(both) == [5, 3]
    pad = 13  # the wide item's sequence is 13 tokens shorter: left padding
    assert [(s.start, s.end) for s in both.image_spans[1]] == [
        (a + pad, b + pad) for a, b in WIDE_RUNS
    ]
    mixed = vlm.prepare([[], [wide]], PROMPTS)
    assert mixed.image_spans[0] == () and mixed.pixel_values.shape[0] == 3
    two = vlm.prepare([wide, square], PROMPTS[0]).image_spans[0]
    assert [s.image for s in two] == [0] * 3 + [1] * 5 and two[3].start == WIDE_RUNS[-1][1] + 3
    with torch.no_grad():
        batch = vlm.forward(both).logits[:, -1]
        alone = [
            vlm.forward(vlm.prepare(im, p)).logits[0, -1] for im, p in zip([square, wide], PROMPTS)
        ]
        text = vlm.forward(vlm.prepare(None, PROMPTS[0])).logits[0, -1]
    torch.testing.assert_close(batch, torch.stack(alone), atol=1e-5, rtol=1e-4)
    assert torch.isfinite(text).all()


def test_projector_rows_are_the_image_positions_in_span_order(vlm, wide, square):
    inputs = vlm.prepare([square, wide], PROMPTS)
    seen = []
    handle = vlm.resolve("lm.layer[0]").register_forward_pre_hook(
        lambda m, a, k: seen.append(k.get("hidden_states", a[0] if a else None)),
        with_kwargs=True,
    )
    try:
        with torch.no_grad(), capture(vlm, ["projector"]) as cap:
            vlm.forward(inputs)
    finally:
        handle.remove()
    assert cap["projector"].shape == (8, 4, 32)  # (views, tokens per view, hidden)
    tokens = vlm.image_tokens(cap["projector"], inputs)
    rows = [p for item in inputs.image_spans for s in item for p in s.positions]
    items = [b for b, item in enumerate(inputs.image_spans) for s in item for _ in s.positions]
    torch.testing.assert_close(seen[0][items, rows], tokens)
    back = vlm.with_image_tokens(cap["projector"], tokens, inputs)
    assert torch.equal(back, cap["projector"])


def test_a_masked_cell_reaches_its_patches_and_its_token(vlm, wide):
    inputs = vlm.prepare(wide, PROMPTS[0])
    keep = [torch.ones(2, 2) for _ in range(3)]
    keep[1][1, 0] = 0  # sub 0,1: frame pixels rows 16-31, columns 0-15
    masked = vlm.mask_pixels(inputs.pixel_values, inputs, keep)
    changed = (masked != inputs.pixel_values).any(2)[:, 0]
    assert changed[1, 16:, :16].all() and int(changed.sum()) == 256
    embeds = []
    for pixels in (inputs.pixel_values, masked):
        with torch.no_grad(), capture(vlm, ["vision.embed"]) as cap:
            vlm.model.model.vision_model(pixels[:, 0])
        embeds.append(cap["vision.embed"])
    patches = (embeds[0] != embeds[1]).any(-1).nonzero().tolist()
    assert patches == [[1, 2 * 4 + 0], [1, 2 * 4 + 1], [1, 3 * 4 + 0], [1, 3 * 4 + 1]]
    with torch.no_grad():  # the connector's own pixel shuffle of those patches
        tokens = [vlm.resolve("projector")(e.contiguous()) for e in embeds]
    assert (tokens[0] != tokens[1]).any(-1).nonzero().tolist() == [[1, 1 * 2 + 0]]
    pixel = torch.zeros_like(inputs.pixel_values)
    pixel[2, 0, 1, 5, 20] = 1.0
    grids = vlm.pixel_grid(pixel, inputs)
    assert [g.shape for g in grids] == [(2, 2)] * 3 and grids[2][0, 1] == 1
    assert sum(float(g.sum()) for g in grids) == 1


def test_vision_grid_is_the_patch_grid_the_shuffle_folds_into_cells(vlm, wide):
    inputs = vlm.prepare(wide, PROMPTS[0])
    value = torch.randn(3, 16, 32)
    grids = vlm.vision_grid(value, inputs)
    assert [g.shape for g in grids] == [(4, 4, 32)] * 3
    assert torch.equal(grids[1][3, 2], value[1, 3 * 4 + 2])
    connector = vlm.resolve("projector")
    with torch.no_grad():
        base = connector(value)
        for i, j in [(0, 0), (1, 3), (3, 2), (2, 1)]:
            bumped = value.clone()
            bumped[1, i * 4 + j] += 1.0
            diff = (connector(bumped) != base).any(-1).nonzero().tolist()
            assert diff == [[1, (i // 2) * 2 + j // 2]]  # patch (i, j) is in cell (i//2, j//2)


def test_an_original_image_mask_maps_to_its_cells_in_every_view(vlm, wide):
    inputs = vlm.prepare(wide, PROMPTS[0])
    mask = np.zeros((32, 64), bool)
    mask[20:28, 40:48] = True  # x 40-47: sub 0,1 column 0 (32-47); global column 1 (32-63)
    found = [positions(s, object_cells(mask, s)) for s in inputs.image_spans[0]]
    assert found == [[], [10 + 2], [18 + 3]]


def test_a_one_hot_cell_lands_on_its_pixels_in_the_original_image(vlm, wide):
    inputs = vlm.prepare(wide, PROMPTS[0])
    maps = [np.zeros((1, 2, 2), np.float32) for _ in range(3)]
    maps[1][0, 1, 0] = 1.0  # sub 0,1, cell (1, 0): original pixels x 32-47, y 16-31
    exp = Explanation(
        method="m",
        settings={},
        target="t",
        labels=(("x",),),
        image_scores=(tuple(maps),),
        text_scores=(np.zeros((1, 6), np.float32),),
        prompt_tokens=inputs.prompt_tokens,
        spans=inputs.image_spans,
        images=inputs.images,
    )
    heat = exp.heatmap(0)
    assert heat.shape == (32, 64) and heat[:, :32].max() == 0  # nothing in sub 0,0
    assert heat[16:32, 32:48].max() == heat.max() == 1.0
    assert heat[16:32, 32:48].sum() > 3 * (heat.sum() - heat[16:32, 32:48].sum())
    maps = [np.zeros((1, 2, 2), np.float32) for _ in range(3)]
    maps[2][0, 0, 1] = 1.0  # the global view's cell (0, 1): x 32-63, y 0-15
    heat = replace(exp, image_scores=(tuple(maps),)).heatmap(0)
    assert heat[:16, 32:].min() > 0 and heat[:16, 32:].max() == heat.max()
    assert heat[:16, 32:].mean() > 2 * max(heat[16:].mean(), heat[:, :32].mean())


def test_a_view_masked_to_zero_is_still_seen(vlm, wide):
    inputs = vlm.prepare(wide, PROMPTS[0])
    keep = [torch.zeros(2, 2), torch.ones(2, 2), torch.ones(2, 2)]
    masked = vlm.mask_pixels(inputs.pixel_values, inputs, keep)
    assert (masked[0] == 0).all()  # the model would take this view for padding
    tensors = {**inputs.tensors, "pixel_values": masked}
    with pytest.raises(ValueError, match="do not match"):
        vlm.model(**tensors)
    pixels = masked.clone().requires_grad_(True)
    out = vlm.forward(replace(inputs, tensors={**tensors, "pixel_values": pixels}))
    out.logits[0, -1, 5].backward()
    assert pixels.grad is not None and pixels.grad[0].abs().sum() > 0


def test_typed_refusals(vlm):
    big = Idefics3VLM(vlm.model, tiny_processor(longest_edge=7 * TILE))
    with pytest.raises(TooManyTilesError, match="7x7 sub-images"):
        big.prepare(Image.new("RGB", (70, 70)), PROMPTS[0])
    limit = Idefics3VLM(vlm.model, tiny_processor(longest_edge=6 * TILE))
    spans = limit.prepare(Image.new("RGB", (60, 60)), PROMPTS[0]).image_spans[0]
    assert len(spans) == 37 and spans[-2].view == "sub 5,5" and spans[-2].crop == (50, 50, 60, 60)
    with pytest.raises(ImageTooSmallError, match="at least 4x4 pixels"):
        vlm.prepare(Image.new("RGB", (3, 3)), PROMPTS[0])
    assert issubclass(ImageTooSmallError, ImageError) and issubclass(TooManyTilesError, InputError)
    assert len(vlm.prepare(Image.new("RGB", (4, 4)), PROMPTS[0]).image_spans[0]) == 5


def test_teacher_forcing_scores_what_generation_produces(vlm, wide):
    inputs = vlm.prepare(wide, PROMPTS[0])
    assert_teacher_forcing(vlm, inputs, 31)


def test_saved_folder_loads_through_mmscope_load(tmp_path, vlm, wide):
    loaded = saved_and_loaded(vlm, tmp_path)
    assert type(loaded) is Idefics3VLM
    assert type(loaded.processor).__name__ == "Idefics3Processor"
    assert type(loaded.processor.image_processor).__name__ == "Idefics3ImageProcessorPil"
    a_in = assert_same_run(loaded, vlm, wide, PROMPTS[0])
    assert len(loaded.generate(a_in, max_new_tokens=2)) == 1
