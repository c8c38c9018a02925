"""The Qwen2.5-VL adapter on a tiny random-weight model built offline: its window order undone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_roles_resolve, assert_sites_refused, noise, saved_and_loaded
from PIL import Image
from torch import nn
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as hf

import mmscope
from mmscope.core.errors import InputError
from mmscope.core.hooks import capture, patch
from mmscope.core.registry import REGISTRY
from mmscope.core.targets import TokenId
from mmscope.models.qwen2_5_vl import ImageOnlyQwen2_5_VLProcessor, Qwen2_5_VLVLM
from mmscope.models.qwen2_vl import Qwen2VLVLM
from mmscope.toys.tiny.qwen2_5_vl import tiny_qwen2_5_vl

PROMPTS = ["what colour is the circle ?", "how many objects are there"]
#: Window index of a 3x3 merged grid in 2x2-cell windows: window (rows 0-1, cols 0-1) holds
#: cells 0 1 3 4, window (rows 0-1, col 2) 2 5, window (row 2, cols 0-1) 6 7, then 8.
WINDOWS_3x3 = [0, 1, 3, 4, 2, 5, 6, 7, 8]
#: A 3x5 grid: windows cols 0-1, 2-3, 4 over rows 0-1 (0 1 5 6 | 2 3 7 8 | 4 9), then row 2.
WINDOWS_3x5 = [0, 1, 5, 6, 2, 3, 7, 8, 4, 9, 10, 11, 12, 13, 14]


@pytest.fixture(scope="module")
def vlm() -> Qwen2_5_VLVLM:
    return tiny_qwen2_5_vl(seed=0)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    # 84x84 keeps its size (merged 3x3); 140x84 (w x h) too (merged 3 rows x 5 cols).
    return [noise(84, 84, 0), noise(140, 84, 1)]


@pytest.fixture(scope="module")
def inputs(vlm, images):
    return vlm.prepare(images, PROMPTS)


EXPECTED = {
    "vision.embed": hf.Qwen2_5_VisionPatchEmbed,
    "vision.layer": hf.Qwen2_5_VLVisionBlock,
    "vision.layer.attn": hf.Qwen2_5_VLVisionAttention,
    "vision.layer.attn.heads": nn.Linear,
    "vision.layer.mlp": hf.Qwen2_5_VLMLP,  # SwiGLU
    "vision.layer.mlp.act": nn.Module,  # SiLU from ACT2FN
    "projector": hf.Qwen2_5_VLPatchMerger,
    "lm.embed": nn.Embedding,
    "lm.layer": hf.Qwen2_5_VLDecoderLayer,
    "lm.layer.attn": hf.Qwen2_5_VLAttention,
    "lm.layer.attn.heads": nn.Linear,
    "lm.layer.mlp": hf.Qwen2MLP,
    "lm.layer.mlp.act": nn.Module,
    "lm.norm": hf.Qwen2_5_VLRMSNorm,
    "lm_head": nn.Linear,
}


def test_registered_under_hf_class():
    entry = REGISTRY.get("qwen2_5_vl", kind="adapter")
    assert entry.obj is Qwen2_5_VLVLM and issubclass(Qwen2_5_VLVLM, Qwen2VLVLM)
    assert "Qwen2_5_VLForConditionalGeneration" in entry.extra["hf_classes"]
    assert mmscope.models.supported_classes()["Qwen2_5_VLForConditionalGeneration"] is Qwen2_5_VLVLM


def test_every_role_resolves_to_its_module_type(vlm):
    assert set(EXPECTED) == set(Qwen2_5_VLVLM.ROLES)
    assert_roles_resolve(vlm, EXPECTED)
    assert vlm.resolve("vision.layer[0].mlp.act") is vlm.resolve("vision.layer[0].mlp").act_fn
    assert type(vlm.resolve("vision.layer[0].mlp.act")).__name__ == "SiLUActivation"
    assert vlm.resolve("projector") is vlm.model.model.visual.merger
    assert vlm.num_layers("vision.layer") == 2 and vlm.model.config.vision_config.window_size == 56
    assert "lm.layer.attn.probs" in vlm.roles and "vision.layer.attn.probs" not in vlm.roles
    assert_sites_refused(
        vlm, ("lm.layer[2]", "vision.layer[-3]", "projector[0]", "deepstack.layer[0]")
    )


def test_image_spans_for_two_sizes(vlm, inputs):
    thw = inputs.tensors["image_grid_thw"].tolist()
    assert thw == [[1, 6, 6], [1, 6, 10]]
    assert inputs.pixel_values.shape[0] == 36 + 60
    (a,), (b,) = inputs.image_spans
    assert (a.grid, a.end - a.start) == ((3, 3), 9)
    assert (b.grid, b.end - b.start) == ((3, 5), 15)
    for item, span in ((0, a), (1, b)):
        ids = inputs.input_ids[item]
        assert bool((ids[span.start : span.end] == vlm.image_token_id).all())
        assert int((ids == vlm.image_token_id).sum()) == span.end - span.start
    assert b.crop == (0.0, 0.0, 140.0, 84.0)
    small = vlm.prepare(noise(48, 48, 2), "describe the image")  # below the 3x3 budget: grows
    assert small.tensors["image_grid_thw"].tolist() == [[1, 6, 6]]
    assert small.image_spans[0][0].grid == (3, 3)
    for item, prompt in enumerate(PROMPTS):
        start, end = inputs.prompt_spans[item]
        assert inputs.prompt_tokens[item] == tuple(prompt.split())
        assert vlm.tokenizer.convert_ids_to_tokens(inputs.input_ids[item, start:end]) == (
            prompt.split()
        )


def test_window_index_by_hand(vlm, inputs):
    index = vlm.window_index(inputs.tensors["image_grid_thw"])
    assert index.tolist() == WINDOWS_3x3 + [9 + i for i in WINDOWS_3x5]


def test_vision_grid_puts_a_one_hot_patch_back_on_its_patch(vlm, inputs):
    # Patch (row 1, col 5) of image 2: merged cell (0, 2) = cell 2, corner (1, 1) of its block.
    # Cell 2 sits 5th (q = 4) in image 2's window order, after image 1's 9 cells x 4 patches.
    value = torch.zeros(96, 3)
    value[36 + 4 * 4 + 3, 1] = 1.0
    grids = vlm.vision_grid(value, inputs)
    assert [tuple(g.shape) for g in grids] == [(6, 6, 3), (6, 10, 3)]
    assert grids[0].sum() == 0 and grids[1][1, 5, 1] == 1 and grids[1].sum() == 1
    # Image 1, patch (row 2, col 4): cell (1, 2) = 5 at q = 5, block corner (0, 0).
    value = torch.zeros(96, 1)
    value[5 * 4 + 0] = 1.0
    assert torch.nonzero(vlm.vision_grid(value, inputs)[0][..., 0]).tolist() == [[2, 4]]


def test_vision_grid_undoes_the_models_own_permutation(vlm, inputs):
    """The first block's input is ``patch_embed``'s output (processor order) permuted by the
    model into window order: mapped by each order's rule, both give the same grid."""
    seen = []
    block = vlm.model.model.visual.blocks[0]
    handle = block.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        with torch.no_grad(), capture(vlm, "vision.embed") as cap:
            vlm.forward(inputs)
    finally:
        handle.remove()
    assert not torch.equal(seen[0], cap["vision.embed"])  # the order really differs
    ours = vlm.vision_grid(seen[0], inputs)
    processor_order = Qwen2VLVLM.vision_grid(vlm, cap["vision.embed"], inputs)
    for a, b in zip(ours, processor_order, strict=True):
        assert torch.equal(a, b)


def test_image_tokens_are_in_span_order(vlm, inputs):
    with torch.no_grad(), capture(vlm, "projector") as cap:
        vlm.forward(inputs)
        features = vlm.model.model.get_image_features(
            inputs.pixel_values, inputs.tensors["image_grid_thw"]
        ).pooler_output
    merger = cap["projector"]
    tokens = vlm.image_tokens(merger, inputs)
    assert torch.equal(tokens, torch.cat(features))
    assert not torch.equal(tokens, merger)
    assert torch.equal(vlm.with_image_tokens(merger, tokens, inputs), merger)
    with pytest.raises(InputError, match="merged cells"):
        vlm.image_tokens(merger[:-1], inputs)


def test_one_merged_cell_maps_to_exactly_its_token(vlm, inputs):
    """Masking a cell in pixels changes exactly its 4 patch rows; zeroing its token (in span
    order) changes exactly its position in the LM's input."""
    keep = [torch.ones(3, 3), torch.ones(3, 5)]
    keep[1][0, 2] = 0  # image 2, merged cell (0, 2)
    values = inputs.pixel_values
    masked = vlm.mask_pixels(values, inputs, keep, 0.0)  # type: ignore[arg-type]
    changed = torch.nonzero((masked != values).any(-1)).flatten().tolist()
    assert changed == [36 + 2 * 4 + k for k in range(4)]
    cells = vlm.pixel_grid((masked - values).abs(), inputs)
    assert torch.nonzero(cells[1]).tolist() == [[0, 2]] and cells[0].sum() == 0

    def embeds(patches: dict) -> torch.Tensor:
        seen = []
        layer = vlm.model.model.language_model.layers[0]
        handle = layer.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
        try:
            with torch.no_grad(), patch(vlm, patches):
                vlm.forward(inputs)
        finally:
            handle.remove()
        return seen[0]

    def zero_cell(value: torch.Tensor) -> torch.Tensor:
        tokens = vlm.image_tokens(value, inputs).clone()
        tokens[9 + 2] = 0.0  # image 2's third token: cell (0, 2)
        return vlm.with_image_tokens(value, tokens, inputs)

    clean, edited = embeds({}), embeds({"projector": zero_cell})
    diff = (clean != edited).any(-1)
    span = inputs.image_spans[1][0]
    assert torch.nonzero(diff).tolist() == [[1, span.start + 2]]
    assert edited[1, span.start + 2].abs().sum() == 0


def test_token_space_gradients_land_on_their_tokens(vlm, inputs):
    """Input x gradient on image tokens equals (embedding x gradient) read at the image
    positions of the LM's input, which knows nothing of window order."""
    target = TokenId(5)
    exp = mmscope.explain(vlm, inputs, target, method="input_x_gradient", space="tokens")
    seen = []
    layer = vlm.model.model.language_model.layers[0]

    def keep(module, args):
        args[0].retain_grad()
        seen.append(args[0])

    handle = layer.register_forward_pre_hook(keep)
    try:
        with torch.enable_grad():
            bound = target.bind(vlm, inputs)
            bound(vlm.forward(inputs)).sum().backward()
    finally:
        handle.remove()
        vlm.model.zero_grad(set_to_none=True)
    h = seen[0]
    per_position = (h * h.grad).sum(-1).detach()
    for item in range(2):
        span = inputs.image_spans[item][0]
        expected = per_position[item, span.start : span.end].reshape(span.grid)
        got = torch.as_tensor(np.asarray(exp.image_scores[item][0][0]))
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)


def test_saved_folder_loads_through_mmscope_load(tmp_path, vlm, images):
    loaded = saved_and_loaded(vlm, tmp_path)
    assert type(loaded) is Qwen2_5_VLVLM
    assert isinstance(loaded.processor, ImageOnlyQwen2_5_VLProcessor)
    assert loaded.processor.to_dict()["processor_class"] == "Qwen2_5_VLProcessor"
    with torch.no_grad():
        a = loaded.forward(loaded.prepare(images[1], "what color is it ?")).logits
        b = vlm.forward(vlm.prepare(images[1], "what color is it ?")).logits
    assert torch.allclose(a, b, atol=1e-6)
