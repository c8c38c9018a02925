"""The logit lens equals a hand computation on every generating family: each layer's output
(captured at ``lm.layer[i]``) through the final norm, the output head and the family's logit
soft-cap; and the last layer at the last position is the model's own next-token distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmscope.core.hooks import capture
from mmscope.core.targets import TokenId
from mmscope.methods.token.lens import LogitLens

PROMPT = "what color is the circle ?"


def _by_hand(vlm, hidden: torch.Tensor) -> torch.Tensor:
    norm, head = vlm.resolve("lm.norm"), vlm.resolve("lm_head")
    logits = head(norm(hidden)).float()
    cap = vlm.final_logit_softcap
    if cap is not None:
        logits = cap * torch.tanh(logits / cap)
    return torch.softmax(logits, -1)


def test_every_layer_is_the_final_readout_of_its_residual(any_vlm, scene_image):
    vlm = any_vlm
    if not vlm.capabilities.generates:
        pytest.skip("dual encoders have no vocabulary: their lens is checked in test_lens")
    inputs = vlm.prepare(scene_image, PROMPT)
    n = vlm.num_layers("lm.layer")
    sites = [f"lm.layer[{i}]" for i in range(n)]
    with torch.no_grad(), capture(vlm, sites) as cap:
        out = vlm.forward(inputs)
    target = int(out.logits[0, -1].argmax())
    result = LogitLens(k=2)(vlm, inputs, TokenId(target))
    for layer, site in enumerate(sites):
        with torch.no_grad():
            probs = _by_hand(vlm, cap[site])[0]
        np.testing.assert_allclose(
            result.target_probs[layer, 0], probs[:, target].numpy(), rtol=1e-4, atol=1e-6
        )
    final = torch.softmax(out.logits[0, -1].float(), -1)[target]
    assert result.target_probs[-1, 0, -1] == pytest.approx(float(final), rel=1e-4, abs=1e-6)
