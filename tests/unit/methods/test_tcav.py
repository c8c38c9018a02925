"""TCAV (Kim et al. 2018): the directional derivative against a finite difference, a planted
concept direction (score ~1, significant) against a random one (~0.5, not significant), and
the concept "red" for the caption "a red circle" on toy-clip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.hooks import patch
from mmscope.core.state import model_state
from mmscope.core.targets import token_id
from mmscope.methods.embedding.tcav import (
    TCAV,
    TCAVResult,
    concept_activation_vector,
    image_gradients,
    significance,
    tcav_runs,
)
from mmscope.methods.study import study
from mmscope.world.items import BenchItem, world_items


def _shifted_scores(vlm, items, site, v, h, word):
    """Independent reference: add ``h * v`` at every image token (and a tower's class token)
    with a patch, and read the target straight from the model's output."""
    inputs = vlm.prepare([it.image for it in items], [it.prompt for it in items])
    if site.startswith("vision."):
        positions = [list(range(1 + len(s[0].positions))) for s in inputs.image_spans]
    else:
        positions = [list(s[0].positions) for s in inputs.image_spans]

    def add(out):
        out = out.clone()
        for b, pos in enumerate(positions):
            out[b, pos] += h * v.to(out)
        return out

    with torch.no_grad(), patch(vlm, {site: add}):
        out = vlm.forward(inputs)
    if vlm.contrastive:
        return torch.diagonal(out.logits_per_image).double().numpy()
    return out.logits[:, -1, token_id(vlm, word)].double().numpy()


@pytest.mark.parametrize(
    ("model", "site"), [("tiny_llava", "lm.layer[0]"), ("tiny_clip", "vision.layer[0]")]
)
def test_directional_derivative_equals_a_finite_difference(model, site, request):
    vlm = request.getfixturevalue(model)
    items = world_items(3, seed=4, contrastive=vlm.contrastive)
    targets = [None if vlm.contrastive else token_id(vlm, "yes")] * len(items)
    before = model_state(vlm.model)
    grads = image_gradients(vlm, items, site, targets, batch_size=2)
    assert model_state(vlm.model) == before
    v = torch.as_tensor(np.random.default_rng(0).normal(size=grads.shape[1]), dtype=torch.float32)
    v = v / v.norm()
    h = 1e-2
    up = _shifted_scores(vlm, items, site, v, h, "yes")
    down = _shifted_scores(vlm, items, site, v, -h, "yes")
    finite = (up - down) / (2 * h)
    assert np.allclose(grads @ v.numpy(), finite, rtol=2e-2, atol=2e-3)
    assert np.abs(finite).max() > 1e-3  # the derivative is not trivially zero


def _planted(concept_shift: float, seed: int = 0):
    """Pooled activations of 80 images: 40 hold the concept, whose images move along a planted
    unit direction ``u``; the target's gradient of every input points along ``u``."""
    rng = np.random.default_rng(seed)
    d = 16
    u = np.eye(d)[0]
    pooled = rng.normal(size=(80, d))
    holds = np.arange(80) < 40
    pooled[holds] += concept_shift * u
    grads = u + 0.3 * rng.normal(size=(30, d))
    return pooled, holds, grads


def test_planted_concept_scores_one_and_a_random_concept_is_not_significant():
    pooled, holds, grads = _planted(3.0)
    cav = concept_activation_vector(pooled[holds], pooled[~holds])
    assert cav[0] > 0.9 and np.linalg.norm(cav) == pytest.approx(1.0)
    scores, random_scores = tcav_runs(pooled, holds, grads, runs=10, k=15, seed=1)
    t, p = significance(scores, random_scores)
    assert scores.mean() > 0.95 and p < 0.01  # measured 0.99 vs random 0.45, p = 3e-5
    # random-vs-random CAVs point anywhere: each run scores near 0 or 1, ~0.5 on average
    assert 0.2 < random_scores.mean() < 0.8
    # no planted direction: the "concept" is as random as the random sets
    pooled, holds, grads = _planted(0.0)
    scores, random_scores = tcav_runs(pooled, holds, grads, runs=10, k=15, seed=1)
    t, p = significance(scores, random_scores)
    assert 0.2 < scores.mean() < 0.8 and p > 0.05  # measured 0.56 vs 0.45, p = 0.40


@pytest.mark.parametrize("model", ["tiny_llava", "tiny_clip", "tiny_qwen2_vl"])
def test_runs_on_every_architecture_and_leaves_the_model(model, request):
    vlm = request.getfixturevalue(model)
    items = world_items(12, seed=5, contrastive=vlm.contrastive)
    before = model_state(vlm.model)
    res = TCAV(concept="red", layer=0, runs=3, examples=3)(vlm, items)
    assert model_state(vlm.model) == before
    assert isinstance(res, TCAVResult) and res.scores.shape == res.random_scores.shape == (3,)
    assert np.all((res.scores >= 0) & (res.scores <= 1)) and res.inputs == 12
    json.dumps(res.to_dict(), allow_nan=False)
    assert res.plot() is not None
    if model == "tiny_qwen2_vl":
        with pytest.raises(NotApplicableError):
            TCAV(layer=0, stack="vision.layer", runs=2, examples=2)(vlm, items)


def test_refuses_user_items_and_impossible_settings(tiny_llava):
    with pytest.raises(InputError, match="known scenes"):
        TCAV()(tiny_llava, [BenchItem(it.image, it.prompt, it.answer) for it in world_items(6)])
    items = world_items(12, seed=5)
    with pytest.raises(InputError, match="hold it"):
        TCAV(concept="no such concept")(tiny_llava, items)
    with pytest.raises(InputError, match="target"):
        TCAV(target="zebra", layer=0, runs=2, examples=2)(tiny_llava, items)
    for bad in ({"runs": 1}, {"alpha": 1.5}, {"concept": " "}, {"stack": "text.layer"}):
        with pytest.raises(InputError):
            TCAV(**bad)


def test_red_raises_the_similarity_to_a_red_circle_on_toy_clip(toy_clip):
    items = world_items(200, contrastive=True)
    kw = {"layer": -1, "target": "a red circle", "runs": 10}
    red = study("tcav", toy_clip, items, concept="red", **kw)
    # measured (BENCH_SEED items, 13 "a red circle" images): score 1.0 in every run,
    # random CAVs 0.45 on average, p = 0.001
    assert red.score > 0.9 and red.significant
    blue = study("tcav", toy_clip, items, concept="blue", **kw)
    # measured: 0.67 against random 0.60, p = 0.69
    assert not blue.significant


def test_blue_raises_the_logit_of_blue_on_toy_llava(toy_llava):
    items = world_items(300)
    kw = {"layer": 1, "target": "blue"}
    blue = study("tcav", toy_llava, items, concept="blue", **kw)
    # measured (BENCH_SEED items, 15 answered "blue"): 0.99 against random 0.33, p = 2e-6
    assert blue.site == "lm.layer[1]" and blue.score > 0.9 and blue.significant
    green = study("tcav", toy_llava, items, concept="green", layer=0, target="blue")
    # measured: 0.73 against random 0.67, p = 0.59
    assert not green.significant
