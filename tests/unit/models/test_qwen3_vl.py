"""The Qwen3-VL adapter on a tiny random-weight model built offline: spans, DeepStack roles and
where the DeepStack features enter the language model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_roles_resolve, assert_sites_refused, noise, saved_and_loaded
from PIL import Image
from torch import nn
from transformers.models.qwen3_vl import modeling_qwen3_vl as hf

import mmscope
from mmscope.core.hooks import capture, patch
from mmscope.core.registry import REGISTRY
from mmscope.core.targets import TokenId
from mmscope.models.qwen2_vl import Qwen2VLVLM
from mmscope.models.qwen3_vl import ImageOnlyQwen3VLProcessor, Qwen3VLVLM
from mmscope.toys.tiny.qwen3_vl import tiny_qwen3_vl

PROMPTS = ["what colour is the circle ?", "how many objects are there"]


@pytest.fixture(scope="module")
def vlm() -> Qwen3VLVLM:
    return tiny_qwen3_vl(seed=0)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    # 64x96 (w x h) keeps its size (merged 3 rows x 2 cols); 128x64 too (2 rows x 4 cols).
    return [noise(64, 96, 0), noise(128, 64, 1)]


@pytest.fixture(scope="module")
def inputs(vlm, images):
    return vlm.prepare(images, PROMPTS)


EXPECTED = {
    "vision.embed": hf.Qwen3VLVisionPatchEmbed,
    "vision.layer": hf.Qwen3VLVisionBlock,
    "vision.layer.attn": hf.Qwen3VLVisionAttention,
    "vision.layer.attn.heads": nn.Linear,
    "vision.layer.mlp": hf.Qwen3VLVisionMLP,
    "vision.layer.mlp.act": nn.Module,  # GELU (tanh) from ACT2FN
    "projector": hf.Qwen3VLVisionPatchMerger,
    "deepstack.layer": hf.Qwen3VLVisionPatchMerger,
    "lm.embed": nn.Embedding,
    "lm.layer": hf.Qwen3VLTextDecoderLayer,
    "lm.layer.attn": hf.Qwen3VLTextAttention,
    "lm.layer.attn.heads": nn.Linear,
    "lm.layer.mlp": hf.Qwen3VLTextMLP,
    "lm.layer.mlp.act": nn.Module,
    "lm.norm": hf.Qwen3VLTextRMSNorm,
    "lm_head": nn.Linear,
}


def test_registered_under_hf_class():
    entry = REGISTRY.get("qwen3_vl", kind="adapter")
    assert entry.obj is Qwen3VLVLM and issubclass(Qwen3VLVLM, Qwen2VLVLM)
    assert "Qwen3VLForConditionalGeneration" in entry.extra["hf_classes"]
    assert mmscope.models.supported_classes()["Qwen3VLForConditionalGeneration"] is Qwen3VLVLM


def test_every_role_resolves_to_its_module_type(vlm):
    assert set(EXPECTED) == set(Qwen3VLVLM.ROLES)
    assert_roles_resolve(vlm, EXPECTED)
    visual = vlm.model.model.visual
    assert vlm.resolve("vision.layer[0].mlp.act") is visual.blocks[0].mlp.act_fn
    assert type(vlm.resolve("vision.layer[0].mlp.act")).__name__ == "GELUTanh"
    assert vlm.resolve("projector") is visual.merger
    assert not visual.merger.use_postshuffle_norm
    assert vlm.resolve("deepstack.layer[0]").use_postshuffle_norm
    attn = vlm.resolve("lm.layer[0].attn")
    assert isinstance(attn.q_norm, hf.Qwen3VLTextRMSNorm)  # Qwen3's per-head q/k norms
    assert "lm.layer.attn.probs" in vlm.roles and "vision.layer.attn.probs" not in vlm.roles


def test_deepstack_levels_and_bad_sites(vlm):
    assert vlm.num_layers("deepstack.layer") == 2 and vlm.deepstack_layers == (0, 1)
    assert vlm.num_layers("vision.layer") == 3 and vlm.num_layers("lm.layer") == 2
    assert vlm.resolve("deepstack.layer[-1]") is vlm.model.model.visual.deepstack_merger_list[1]
    assert_sites_refused(
        vlm, ("deepstack.layer[2]", "deepstack.layer", "projector[0]", "lm.layer[2]")
    )


def test_image_spans_for_two_sizes(vlm, inputs):
    thw = inputs.tensors["image_grid_thw"].tolist()
    assert thw == [[1, 6, 4], [1, 4, 8]]  # 16-pixel patches
    assert inputs.pixel_values.shape == (24 + 32, 3 * 2 * 16 * 16)
    (a,), (b,) = inputs.image_spans
    assert (a.grid, a.end - a.start) == ((3, 2), 6)
    assert (b.grid, b.end - b.start) == ((2, 4), 8)
    for item, span in ((0, a), (1, b)):
        ids = inputs.input_ids[item]
        assert bool((ids[span.start : span.end] == vlm.image_token_id).all())
        assert int((ids == vlm.image_token_id).sum()) == span.end - span.start
        mm = inputs.tensors["mm_token_type_ids"][item]
        assert int(mm.sum()) == span.end - span.start
    assert vlm.prepare(noise(48, 48, 2), "describe the image").image_spans[0][0].grid == (2, 2)
    for item, prompt in enumerate(PROMPTS):
        assert inputs.prompt_tokens[item] == tuple(prompt.split())


def test_one_hot_patch_and_one_merged_cell(vlm, inputs):
    """No window order here: patch (row 1, col 5) of image 2 is row 24 + 4 * cell 2 + 3; masking
    its cell changes exactly that cell's 4 rows; zeroing its token, one LM position."""
    value = torch.zeros(56, 2)
    value[24 + 2 * 4 + 3, 0] = 1.0
    grids = vlm.vision_grid(value, inputs)
    assert [tuple(g.shape) for g in grids] == [(6, 4, 2), (4, 8, 2)]
    assert torch.nonzero(grids[1]).tolist() == [[1, 5, 0]] and grids[0].sum() == 0
    keep = [torch.ones(3, 2), torch.ones(2, 4)]
    keep[1][0, 2] = 0
    masked = vlm.mask_pixels(inputs.pixel_values, inputs, keep, 0.0)  # type: ignore[arg-type]
    changed = torch.nonzero((masked != inputs.pixel_values).any(-1)).flatten().tolist()
    assert changed == [24 + 2 * 4 + k for k in range(4)]

    def zero_token(value: torch.Tensor) -> torch.Tensor:
        tokens = vlm.image_tokens(value, inputs).clone()
        tokens[6 + 2] = 0.0
        return vlm.with_image_tokens(value, tokens, inputs)

    clean = _layer_inputs(vlm, inputs, {})
    edited = _layer_inputs(vlm, inputs, {"projector": zero_token})
    start = inputs.image_spans[1][0].start
    assert torch.nonzero((clean[0] != edited[0]).any(-1)).tolist() == [[1, start + 2]]


def _layer_inputs(vlm, inputs, patches) -> list[torch.Tensor]:
    """The hidden state entering each LM layer and the final norm."""
    lm = vlm.model.model.language_model
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_pre_hook(lambda m, a: seen.append(a[0])) for m in lm.layers]
    handles.append(lm.norm.register_forward_pre_hook(lambda m, a: seen.append(a[0])))
    try:
        with torch.no_grad(), patch(vlm, patches):
            vlm.forward(inputs)
    finally:
        for h in handles:
            h.remove()
    return seen


def test_deepstack_features_are_added_after_the_first_lm_layers(vlm, inputs):
    sites = ["lm.layer[0]", "lm.layer[1]", "deepstack.layer[0]", "deepstack.layer[1]"]
    sites += ["vision.layer[0]", "vision.layer[1]"]
    with torch.no_grad(), capture(vlm, sites) as cap:
        vlm.forward(inputs)
    entering = _layer_inputs(vlm, inputs, {})  # lm.layer[0], lm.layer[1], lm.norm
    image = inputs.input_ids == vlm.image_token_id
    for level in (0, 1):
        after = cap[f"lm.layer[{level}]"].clone()
        after[image] += cap[f"deepstack.layer[{level}]"]  # span order, like the projector's
        torch.testing.assert_close(entering[level + 1], after)
        assert not torch.allclose(entering[level + 1][image], cap[f"lm.layer[{level}]"][image])
        assert torch.equal(entering[level + 1][~image], cap[f"lm.layer[{level}]"][~image])
    seen = []
    merger = vlm.resolve("deepstack.layer[1]")
    handle = merger.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        with torch.no_grad():
            vlm.forward(inputs)
    finally:
        handle.remove()
    assert torch.equal(seen[0], cap[f"vision.layer[{vlm.deepstack_layers[1]}]"])


def test_token_space_gradients_cover_the_input_path_only(vlm, inputs):
    """As the adapter documents: token-space input x gradient is the LM input's
    (embedding x gradient) at the image positions; the DeepStack path's share is left out."""
    target = TokenId(5)
    exp = mmscope.explain(vlm, inputs, target, method="input_x_gradient", space="tokens")
    lm = vlm.model.model.language_model
    seen = []

    def keep(module, args):
        args[0].retain_grad()
        seen.append(args[0])

    handle = lm.layers[0].register_forward_pre_hook(keep)
    try:
        with torch.enable_grad(), capture(vlm, "deepstack.layer[0]", grads=True) as cap:
            target.bind(vlm, inputs)(vlm.forward(inputs)).sum().backward()
            deepstack = (cap["deepstack.layer[0]"] * cap.grad("deepstack.layer[0]")).sum(-1)
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
    assert deepstack.abs().sum() > 0  # what token-space maps miss on this model


def test_saved_folder_loads_through_mmscope_load(tmp_path, vlm, images):
    loaded = saved_and_loaded(vlm, tmp_path)
    assert type(loaded) is Qwen3VLVLM
    assert isinstance(loaded.processor, ImageOnlyQwen3VLProcessor)
    assert loaded.processor.to_dict()["processor_class"] == "Qwen3VLProcessor"
    assert loaded.processor.image_processor.patch_size == 16
    with torch.no_grad():
        a = loaded.forward(loaded.prepare(images[1], "what color is it ?")).logits
        b = vlm.forward(vlm.prepare(images[1], "what color is it ?")).logits
    assert torch.allclose(a, b, atol=1e-6)
    assert len(loaded.generate(loaded.prepare(images[0], "what color is it ?"), 2)) == 1
