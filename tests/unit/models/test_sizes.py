"""What methods ask the adapter instead of reading module attributes or config fields: head
width, residual and MLP widths, vocabulary size, a dual encoder's logit scale and image
features, and the roles a per-token decomposition reads."""

from __future__ import annotations

import pytest
import torch

from mmscope.core.errors import NotApplicableError, SiteError
from mmscope.core.sites import site


def test_widths_match_the_modules_and_the_config(any_vlm):
    vlm = any_vlm
    stacks = [s for s in vlm.LAYER_LISTS if f"{s}.attn.heads" in vlm.ROLES]
    assert stacks
    for stack in stacks:
        first = (vlm.softmax_layers(stack) or [0])[0]
        proj = vlm.resolve(site(stack, first, "attn.heads"))
        assert vlm.head_dim(stack) * vlm.num_heads(stack) == proj.in_features
        assert vlm.hidden_size(stack) == proj.out_features
    config = vlm.model.config
    text = getattr(config, "text_config", None) or config
    if "lm.layer" in vlm.LAYER_LISTS:  # what FastV's FLOPs read from the config before
        assert vlm.hidden_size("lm.layer") == text.hidden_size
        assert vlm.mlp_size("lm.layer") == text.intermediate_size
    with pytest.raises(SiteError):
        vlm.mlp_size("no.layer")


def test_vocab_size_and_logit_scale(any_vlm):
    vlm = any_vlm
    if vlm.contrastive:
        with pytest.raises(SiteError):
            vlm.vocab_size  # noqa: B018  (a property that raises)
        assert torch.equal(vlm.logit_scale, vlm.model.logit_scale.exp().float())
        assert vlm.logit_scale.dtype == torch.float32 and vlm.logit_scale.numel() == 1
    else:
        assert vlm.vocab_size == vlm.model.get_output_embeddings().weight.shape[0]
        with pytest.raises(NotApplicableError, match="no logit scale"):
            vlm.logit_scale  # noqa: B018


def test_clip_image_features_and_decomposition_roles(tiny_clip, scene_image):
    vlm = tiny_clip
    inputs = vlm.prepare(scene_image, ["a red circle", "a blue square"])
    with torch.no_grad():
        features = vlm.image_features(inputs.tensors["pixel_values"])
        embeds = vlm.forward(inputs).image_embeds
    features = getattr(features, "pooler_output", features)
    assert torch.allclose(torch.nn.functional.normalize(features, dim=-1), embeds, atol=1e-5)
    for i in range(vlm.num_layers("vision.layer")):
        assert isinstance(vlm.resolve(site("vision.layer", i, "attn.norm")), torch.nn.LayerNorm)
        values = vlm.resolve(site("vision.layer", i, "attn.values"))
        assert values is vlm.resolve(site("vision.layer", i, "attn")).v_proj
