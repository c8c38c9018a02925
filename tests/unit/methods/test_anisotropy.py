"""Anisotropy (Ethayarajh 2019; Wolfe & Caliskan 2022): the mean cosine of random pairs by
hand on three vectors, ~0 for isotropic vectors and large for a shared offset, and the study
per layer on every architecture against a by-hand computation over all pairs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmscope.core.errors import InputError
from mmscope.core.hooks import capture
from mmscope.core.state import model_state
from mmscope.methods.activations import collect
from mmscope.methods.embedding.anisotropy import (
    Anisotropy,
    AnisotropyResult,
    mean_cosine,
    random_pairs,
)
from mmscope.methods.study import study
from mmscope.world.items import world_items


def test_mean_cosine_by_hand_on_three_vectors():
    x = np.array([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    # cos(a, b) = 0, cos(a, c) = cos(b, c) = 1 / sqrt(2): mean sqrt(2) / 3
    assert mean_cosine(x, np.array([0, 1, 2])) == pytest.approx(np.sqrt(2) / 3)
    # a and b from one item: only the pairs across items count
    assert mean_cosine(x, np.array([0, 0, 1])) == pytest.approx(1 / np.sqrt(2))
    assert np.isnan(mean_cosine(x, np.zeros(3, dtype=int)))


def test_isotropic_vectors_have_near_zero_anisotropy_and_a_shared_offset_does_not():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 64))
    item = np.arange(600) // 3
    assert abs(mean_cosine(x, item, pairs=5000, seed=1)) < 0.02  # measured ~0.00
    assert mean_cosine(x + 2.0, item, pairs=5000, seed=1) > 0.7  # cone: 4 / (4 + 1) = 0.8
    i, j = random_pairs(item, 5000, seed=1)
    assert len(i) == 5000 and np.all(item[i] != item[j])


@pytest.mark.parametrize("model", ["tiny_llava", "tiny_clip", "tiny_qwen2_vl"])
def test_study_matches_all_pairs_by_hand(model, request):
    vlm = request.getfixturevalue(model)
    items = world_items(4, contrastive=vlm.contrastive)
    before = model_state(vlm.model)
    res = study("anisotropy", vlm, items, pairs=100_000)  # more than there are: every pair
    assert model_state(vlm.model) == before
    assert isinstance(res, AnisotropyResult) and set(res.values) == {"image", "text"}
    image_stack = "vision.layer" if vlm.contrastive else "lm.layer"
    assert res.sites["image"][0] == f"{image_stack}[0]"
    if vlm.contrastive:
        assert res.sites["text"][0] == "text.layer[0]"
    acts = collect(vlm, items, res.sites["image"][-1], ("image",))[res.sites["image"][-1]]
    unit = acts.values / np.linalg.norm(acts.values, axis=1, keepdims=True)
    cos = [
        float(unit[a] @ unit[b])
        for a in range(len(unit))
        for b in range(a + 1, len(unit))
        if acts.item[a] != acts.item[b]
    ]
    assert res.values["image"][-1] == pytest.approx(np.mean(cos), abs=1e-5)
    if vlm.contrastive:  # the text tower, read at the text's tokens by hand
        inputs = vlm.prepare([it.image for it in items], [it.prompt for it in items])
        with torch.no_grad(), capture(vlm, res.sites["text"][-1]) as cap:
            vlm.forward(inputs)
        rows = [cap[res.sites["text"][-1]][b, s:e] for b, (s, e) in enumerate(inputs.prompt_spans)]
        item = np.concatenate([np.full(len(r), b) for b, r in enumerate(rows)])
        x = torch.cat(rows).numpy()
        assert res.values["text"][-1] == pytest.approx(mean_cosine(x, item, 100_000), abs=1e-5)
    for values in res.values.values():
        assert np.all(np.abs(values) <= 1.0)
    json.dumps(res.to_dict(), allow_nan=False)
    assert res.plot() is not None and len(res.tables()["anisotropy"]["layer"]) == sum(
        len(s) for s in res.sites.values()
    )


def test_refuses_bad_settings_and_a_single_item(tiny_clip):
    with pytest.raises(InputError):
        Anisotropy(pairs=0)
    with pytest.raises(InputError):
        Anisotropy()(tiny_clip, world_items(1, contrastive=True))
