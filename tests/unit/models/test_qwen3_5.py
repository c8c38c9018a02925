"""The Qwen3.5 adapter on a tiny random-weight model built offline: its hybrid language model
(gated delta-net layers between softmax-attention ones), what the attention methods read and
skip there, spans as in Qwen3-VL, and the round trip through a saved folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import assert_sites_refused, noise, saved_and_loaded
from PIL import Image
from torch import nn
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

import mmscope
from mmscope.core.errors import NotApplicableError, SiteError
from mmscope.core.hooks import capture, mask_attention
from mmscope.core.registry import REGISTRY
from mmscope.core.targets import TokenId
from mmscope.decoding.opera_search import SITE, repeat_rows, select_rows, site
from mmscope.methods.layer.heads import HeadImportance
from mmscope.methods.layer.tracing import CausalTrace, _mixer
from mmscope.methods.study import study
from mmscope.methods.token.knockout import AttentionKnockout
from mmscope.methods.token.pruning import FastV, flops_saved, layer_flops
from mmscope.methods.token.sets import block_matrix
from mmscope.models.qwen3_5 import Qwen3_5VLM
from mmscope.models.qwen3_vl import ImageOnlyQwen3VLProcessor, Qwen3VLVLM
from mmscope.toys.tiny.qwen3_5 import tiny_qwen3_5
from mmscope.world.items import world_items

PROMPTS = ["what colour is the circle ?", "how many objects are there"]
#: Why lm.layer[1] (the tiny model's one gated delta net) is skipped.
WHY = "linear attention (Qwen3_5GatedDeltaNet, a gated delta net): no attention probabilities"
SKIPPED = {"lm.layer[1]": WHY}


@pytest.fixture(scope="module")
def vlm() -> Qwen3_5VLM:
    return tiny_qwen3_5(seed=0)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    # 64x96 (w x h) keeps its size (merged 3 rows x 2 cols); 128x64 too (2 rows x 4 cols).
    return [noise(64, 96, 0), noise(128, 64, 1)]


@pytest.fixture(scope="module")
def inputs(vlm, images):
    return vlm.prepare(images, PROMPTS)


@pytest.fixture(scope="module")
def one(vlm, images):
    return vlm.prepare(images[0], PROMPTS[0])


#: Each role, at a layer of the type that has it (linear_attn at layer 1, the rest at 0).
EXPECTED = {
    "vision.embed": hf.Qwen3_5VisionPatchEmbed,
    "vision.layer": hf.Qwen3_5VisionBlock,
    "vision.layer.attn": hf.Qwen3_5VisionAttention,
    "vision.layer.attn.heads": nn.Linear,
    "vision.layer.mlp": hf.Qwen3_5VisionMLP,
    "vision.layer.mlp.act": nn.Module,
    "projector": hf.Qwen3_5VisionPatchMerger,
    "lm.embed": nn.Embedding,
    "lm.layer": hf.Qwen3_5DecoderLayer,
    "lm.layer.attn": hf.Qwen3_5Attention,
    "lm.layer.attn.heads": nn.Linear,
    "lm.layer.linear_attn": hf.Qwen3_5GatedDeltaNet,
    "lm.layer.mlp": hf.Qwen3_5MLP,
    "lm.layer.mlp.act": nn.Module,
    "lm.norm": hf.Qwen3_5RMSNorm,
    "lm_head": nn.Linear,
}


def test_registered_under_hf_class():
    entry = REGISTRY.get("qwen3_5", kind="adapter")
    assert entry.obj is Qwen3_5VLM and issubclass(Qwen3_5VLM, Qwen3VLVLM)
    assert "Qwen3_5ForConditionalGeneration" in entry.extra["hf_classes"]
    assert mmscope.models.supported_classes()["Qwen3_5ForConditionalGeneration"] is Qwen3_5VLM


def test_every_role_resolves_to_its_module_type(vlm):
    assert set(EXPECTED) == set(Qwen3_5VLM.ROLES)  # no deepstack.layer: Qwen3.5 has none
    for role, cls in EXPECTED.items():
        at = "[1]" if role == "lm.layer.linear_attn" else "[0]"
        site_ = role.replace(".layer", ".layer" + at) if ".layer" in role else role
        assert isinstance(vlm.resolve(site_), cls), role
    layers = vlm.model.model.language_model.layers
    assert vlm.resolve("lm.layer[2].attn") is layers[2].self_attn
    assert vlm.resolve("lm.layer[-2].linear_attn") is layers[1].linear_attn
    assert vlm.resolve("lm.layer[0].attn.heads") is layers[0].self_attn.o_proj
    assert vlm.deepstack_layers == ()
    assert not hasattr(vlm.model.model.visual, "deepstack_merger_list")
    assert vlm.resolve("projector") is vlm.model.model.visual.merger


def test_layer_types_of_the_tiny_model(vlm):
    """softmax, gated delta net, softmax: what every attention method reads or skips."""
    assert vlm.layer_types == ("full_attention", "linear_attention", "full_attention")
    assert vlm.softmax_layers("lm.layer") == [0, 2]
    assert vlm.non_softmax_layers("lm.layer") == {1: WHY}
    assert vlm.softmax_layers("vision.layer") == [0, 1]
    assert vlm.non_softmax_layers("vision.layer") == {}
    assert vlm.num_heads("lm.layer") == 2 and vlm.num_layers("lm.layer") == 3
    assert vlm.capabilities.attention == ("lm.layer",)


def test_linear_layers_have_no_attention_role(vlm):
    assert_sites_refused(
        vlm,
        ("lm.layer[1].attn", "lm.layer[1].attn.probs", "lm.layer[-2].attn.heads"),
        match=r"linear_attention layer \(Qwen3_5GatedDeltaNet",
    )
    with pytest.raises(SiteError, match=r"full_attention layer \(Qwen3_5Attention\)"):
        vlm.resolve("lm.layer[0].linear_attn")
    assert_sites_refused(vlm, ("deepstack.layer[0]", "lm.layer[3].attn", "lm.layer.linear_attn"))


def test_image_spans_as_in_qwen3_vl(vlm, inputs):
    assert inputs.tensors["image_grid_thw"].tolist() == [[1, 6, 4], [1, 4, 8]]  # 16-px patches
    assert inputs.pixel_values.shape == (24 + 32, 3 * 2 * 16 * 16)
    (a,), (b,) = inputs.image_spans
    assert (a.grid, a.end - a.start) == ((3, 2), 6)  # one token per 32x32 pixels
    assert (b.grid, b.end - b.start) == ((2, 4), 8)
    for item, span in ((0, a), (1, b)):
        ids = inputs.input_ids[item]
        assert bool((ids[span.start : span.end] == vlm.image_token_id).all())
        assert int((ids == vlm.image_token_id).sum()) == span.end - span.start
        assert int(inputs.tensors["mm_token_type_ids"][item].sum()) == span.end - span.start
    with torch.no_grad(), capture(vlm, "projector") as cap:
        vlm.forward(inputs)
    assert cap["projector"].shape == (6 + 8, 32)


def _mean_probs(vlm, inputs, layers) -> list[np.ndarray]:
    sites = [f"lm.layer[{i}].attn.probs" for i in layers]
    with torch.no_grad(), capture(vlm, sites) as cap:
        vlm.forward(inputs)
    return [cap[s][0].float().mean(0).numpy().astype(np.float64) for s in sites]


def _maps(exp, inputs) -> tuple[np.ndarray, np.ndarray]:
    return np.asarray(exp.image_scores[0][0][0]), np.asarray(exp.text_scores[0][0])


def _split(row: np.ndarray, inputs) -> tuple[np.ndarray, np.ndarray]:
    span, (start, end) = inputs.image_spans[0][0], inputs.prompt_spans[0]
    return row[span.start : span.end].reshape(span.grid), row[start:end]


def test_rollout_is_a_numpy_rollout_over_the_softmax_layers(vlm, one):
    """M_l = (A_l + I) / 2, rows renormalised, for l = 0 and 2 only: R = M_2 M_0 (the gated
    delta net at layer 1 passes the residual path alone); the query row is the last position."""
    with pytest.warns(UserWarning, match=r"skips lm.layer\[1\]"):
        exp = mmscope.explain(vlm, one, TokenId(5), method="attention_rollout")
    assert exp.extras["skipped_layers"] == SKIPPED
    a0, a2 = _mean_probs(vlm, one, [0, 2])
    eye = np.eye(a0.shape[0])
    m0, m2 = ((a + eye) / 2 for a in (a0, a2))
    m0, m2 = m0 / m0.sum(-1, keepdims=True), m2 / m2.sum(-1, keepdims=True)
    row = (m2 @ m0)[-1]
    image, text = _split(row, one)
    got_image, got_text = _maps(exp, one)
    np.testing.assert_allclose(got_image, image, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got_text, text, rtol=1e-4, atol=1e-6)
    assert abs(row.sum() - 1) < 1e-6


def test_raw_attention_mean_and_a_named_linear_layer(vlm, one):
    with pytest.warns(UserWarning, match="gated delta net"):
        exp = mmscope.explain(vlm, one, TokenId(5), method="raw_attention", layer="mean")
    assert exp.extras["skipped_layers"] == SKIPPED
    a0, a2 = _mean_probs(vlm, one, [0, 2])
    image, text = _split(((a0 + a2) / 2)[-1], one)
    np.testing.assert_allclose(_maps(exp, one)[0], image, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(_maps(exp, one)[1], text, rtol=1e-4, atol=1e-6)
    last = mmscope.explain(vlm, one, TokenId(5), method="raw_attention")  # layer -1: softmax
    assert "skipped_layers" not in last.extras
    for layer in (1, -2):
        with pytest.raises(NotApplicableError, match=rf"lm.layer\[{layer}\].*Qwen3_5GatedDeltaNet"):
            mmscope.explain(vlm, one, TokenId(5), method="raw_attention", layer=layer)
    with pytest.warns(UserWarning):
        chefer = mmscope.explain(vlm, one, TokenId(5), method="chefer_relevance")
    assert chefer.extras["skipped_layers"] == SKIPPED


def test_knockout_windows_slide_over_the_softmax_layers(vlm, one):
    """Windows of one softmax layer start at layers 0 and 2; the one at 2 is the same run as
    masking last position -> image tokens at lm.layer[2].attn by hand."""
    with pytest.warns(UserWarning, match="attention_knockout skips"):
        result = AttentionKnockout(window=1, flows=("image",))(vlm, one, TokenId(5))
    assert result.starts == (0, 2) and result.window == 1
    assert result.skipped_layers == SKIPPED and result.to_dict()["skipped_layers"] == SKIPPED
    length = one.input_ids.shape[1]
    block = block_matrix(length, [length - 1], list(one.image_spans[0][0].positions))
    with torch.no_grad(), mask_attention(vlm, {"lm.layer[2].attn": block}):
        p = vlm.forward(one).logits[0, -1].float().log_softmax(-1)[5].exp()
    assert result.knocked[0, 0, 1] == pytest.approx(float(p), rel=1e-4)


def test_fastv_ranks_at_softmax_layers_and_records_the_rest(vlm, one):
    with pytest.raises(NotApplicableError, match=r"K=2.*lm.layer\[1\].*gated delta net"):
        FastV(layers=(2,), ratios=(0.5,))(vlm, one)
    with pytest.warns(UserWarning, match="fastv skips"):
        result = FastV(layers=(1,), ratios=(0.5,), rules=("last",))(vlm, one)
    assert result.skipped_layers == SKIPPED
    n, hidden, inter = int(one.attention_mask.sum()), 32, 64
    full, kept = layer_flops(n, hidden, inter), layer_flops(n - 3, hidden, inter)  # 3 of 6
    expected = 1 - (2 * full + kept) / (3 * full)  # only lm.layer[2] runs on the kept tokens
    assert result.flops_saved[0, 0] == pytest.approx(expected)
    every = 1 - (full + 2 * kept) / (3 * full)  # FastV's formula: layers 1 and 2 pruned
    assert flops_saved(n, 6, hidden, inter, 3, 1, 0.5) == pytest.approx(every)


def test_head_importance_is_nan_at_the_linear_layer(vlm, one):
    with pytest.warns(UserWarning, match="head_importance skips"):
        result = HeadImportance(stacks=["lm.layer"], top=2)(vlm, one, TokenId(5))
    imp = result.importance["lm.layer"]
    assert imp.shape == (1, 3, 2) and np.isnan(imp[:, 1]).all()
    assert np.isfinite(imp[:, [0, 2]]).all() and result.skipped_layers == SKIPPED
    assert {layer for _, layer, _, _ in result.top_heads(6)} == {0, 2}


def test_tracing_restores_each_layers_token_mixer(vlm, one):
    assert [_mixer(vlm, "lm.layer", k) for k in range(3)] == [
        "lm.layer[0].attn",
        "lm.layer[1].linear_attn",
        "lm.layer[2].attn",
    ]
    attn = CausalTrace(preset="attn", window=1, positions="image")(vlm, one, TokenId(5))
    assert attn.effect.shape == (1, 3, 6) and "skipped_layers" not in attn.settings
    with pytest.warns(UserWarning, match="causal_trace"):
        heads = CausalTrace(preset="head", positions="image")(vlm, one, TokenId(5))
    assert heads.effect.shape == (1, 3, 2) and np.isnan(heads.effect[:, 1]).all()
    assert heads.settings["skipped_layers"] == SKIPPED


def test_miner_leaves_out_the_linear_layers_only_for_its_attention_scores(vlm):
    with pytest.warns(UserWarning, match="miner's attention scores skips"):
        found = study("miner", vlm, world_items(2), progress=False)
    settings = found.neurons.settings
    assert settings["sites"] == ["lm.layer[0].mlp.act", "lm.layer[2].mlp.act"]
    assert settings["skipped_layers"] == SKIPPED
    plain = study("miner", vlm, world_items(2), weights=(0, 0.5, 0.5, 0, 0), progress=False)
    assert len(plain.neurons.settings["sites"]) == 3
    with pytest.raises(NotApplicableError, match=r"lm.layer\[1\]"):
        study("miner", vlm, world_items(2), sites=("lm.layer[1].mlp.act",), progress=False)


def test_opera_reads_the_last_layer_and_repeats_the_linear_states(vlm, one):
    assert site(vlm) == SITE  # the tiny model's last layer has softmax attention
    with torch.no_grad():
        cache = vlm.model(**one.tensors, use_cache=True).past_key_values
    linear = cache.layers[1]
    state = linear.recurrent_states[0].clone()
    keys = cache.layers[0].keys.clone()
    repeat_rows(cache, 3)
    assert linear.recurrent_states[0].shape[0] == 3 and cache.layers[0].keys.shape[0] == 3
    select_rows(cache, torch.tensor([2]))
    assert torch.equal(linear.recurrent_states[0], state)
    assert torch.equal(cache.layers[0].keys, keys)


def test_saved_folder_loads_through_mmscope_load(tmp_path, vlm, images):
    loaded = saved_and_loaded(vlm, tmp_path)
    assert type(loaded) is Qwen3_5VLM
    assert isinstance(loaded.processor, ImageOnlyQwen3VLProcessor)
    assert loaded.processor.to_dict()["processor_class"] == "Qwen3VLProcessor"
    assert loaded.layer_types == vlm.layer_types and loaded.softmax_layers("lm.layer") == [0, 2]
    with torch.no_grad():
        a = loaded.forward(loaded.prepare(images[1], "what color is it ?")).logits
        b = vlm.forward(vlm.prepare(images[1], "what color is it ?")).logits
    assert torch.allclose(a, b, atol=1e-6)
    assert len(loaded.generate(loaded.prepare(images[0], "what color is it ?"), 2)) == 1
