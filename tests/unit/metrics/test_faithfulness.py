"""Deletion, insertion, ROAD and the completeness gap: hand-checked curves, the imputation's
defining equations, and the world's truth (the true mask beats its own reverse)."""

import numpy as np
import pytest
import torch
from scipy.integrate import trapezoid

from mmscope.bench.baselines import OracleMap
from mmscope.core.targets import Predicted
from mmscope.methods.attribution.perturbation import Features, masked_forwards
from mmscope.methods.explain import make_method
from mmscope.metrics import Case, make_metric
from mmscope.metrics.faithfulness import Deletion, Insertion, RoadLeRF, RoadMoRF, cell_orders
from mmscope.metrics.road import impute
from mmscope.world import render, sample_scenes
from mmscope.world.items import world_items

STENCIL = [(-1, 0, 1 / 6), (1, 0, 1 / 6), (0, -1, 1 / 6), (0, 1, 1 / 6)] + [
    (dy, dx, 1 / 12) for dy in (-1, 1) for dx in (-1, 1)
]


def test_imputation_keeps_known_pixels_and_solves_the_neighbour_equations():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(2, 3, 10, 12, generator=g)
    removed = torch.zeros(2, 10, 12, dtype=torch.bool)
    removed[0, 3:7, 4:9] = True
    removed[1, 0:4, 0:3] = True  # touches the border: fewer neighbours
    out = impute(images, removed)
    assert torch.equal(
        out[~removed.unsqueeze(1).expand_as(out)], images[~removed.unsqueeze(1).expand_as(out)]
    )
    for n, y, x in removed.nonzero().tolist():
        total = weight = 0.0
        for dy, dx, w in STENCIL:
            if 0 <= y + dy < 10 and 0 <= x + dx < 12:
                total = total + w * out[n, :, y + dy, x + dx]
                weight += w
        assert torch.allclose(out[n, :, y, x], total / weight, atol=1e-5)


def test_imputation_reproduces_a_linear_ramp_and_blanks_a_fully_removed_image():
    ramp = torch.arange(16.0).view(1, 1, 1, 16).expand(1, 2, 8, 16).clone()
    removed = torch.zeros(1, 8, 16, dtype=torch.bool)
    removed[0, 2:6, 5:11] = True
    assert torch.allclose(impute(ramp, removed), ramp, atol=1e-4)
    assert torch.equal(impute(ramp, torch.ones(1, 8, 16, dtype=torch.bool)), torch.zeros_like(ramp))
    noisy = impute(ramp, removed, noise=0.5, seed=1)
    assert not torch.allclose(noisy, ramp) and torch.equal(noisy[0, :, 0], ramp[0, :, 0])


@pytest.fixture(scope="module")
def case(tiny_llava):
    images = [render(s, 48).image for s in sample_scenes(2, 5)]
    inputs = tiny_llava.prepare(
        images, ["what color is the circle ?", "how many objects are there ?"]
    )
    target = Predicted()
    explanation = make_method("saliency")(tiny_llava, inputs, target)
    return Case(tiny_llava, inputs, target, explanation, None, ())


def test_masks_remove_each_items_own_cells_in_its_order(case):
    features = Features.of(case.vlm, case.inputs)
    orders = cell_orders(case, features)
    masks = Deletion(steps=2).masks(features, orders)
    assert masks.shape == (3, features.size)
    half = len(orders[0]) // 2
    assert torch.all(masks[0] == 1)
    assert torch.all(masks[1, orders[0][:half]] == 0) and torch.all(masks[1, orders[0][half:]] == 1)
    assert torch.all(masks[1, orders[1][:half]] == 0)
    text = [i for s in features.text_slices for i in range(s.start, s.stop)]
    assert torch.all(masks[:, text] == 1)  # prompts are never touched
    inserted = Insertion(steps=2).masks(features, orders)
    assert torch.all(inserted[0, orders[0]] == 0) and torch.all(inserted[2] == 1)
    first = features.image_slices[0]
    scores = case.explanation.image_map(0, item=0).reshape(-1)
    assert int(orders[0][0]) == first.start + int(np.argmax(scores))


def test_curve_ends_are_the_clean_and_the_blank_probability_and_auc_is_the_trapezoid(case):
    metric = Deletion(steps=4)
    curve = metric.curve(case)
    bound = case.target.bind(case.vlm, case.inputs)
    features = Features.of(case.vlm, bound.inputs)
    ends = torch.ones(2, features.size)
    for s in features.image_slices:
        ends[1, s] = 0
    expected = masked_forwards(case.vlm, bound, ends)[:, :, 0].exp().numpy()
    np.testing.assert_allclose(curve[[0, -1]], expected, rtol=1e-5)
    auc = metric(case)
    np.testing.assert_allclose(auc, trapezoid(curve, np.linspace(0, 1, 5), axis=0), rtol=1e-6)
    assert np.all((auc >= 0) & (auc <= 1))


def test_road_orders_are_opposite_and_only_rows_four_d_pixels(case):
    morf, lerf = RoadMoRF(steps=3), RoadLeRF(steps=3)
    assert not morf.higher_is_better and lerf.higher_is_better
    features = Features.of(case.vlm, case.inputs)
    orders = cell_orders(case, features)
    a, b = morf.masks(features, orders), lerf.masks(features, orders)
    assert torch.equal(a[1, orders[0][0]], torch.tensor(0.0))
    assert torch.equal(b[1, orders[0][-1]], torch.tensor(0.0))
    assert np.all(np.isfinite(morf(case)))


def test_completeness_gap_reads_integrated_gradients_and_is_nan_for_others(case):
    ig = make_method("integrated_gradients", steps=8)(case.vlm, case.inputs, case.target)
    ig_case = Case(case.vlm, case.inputs, case.target, ig, None, ())
    gap = make_metric("completeness_gap")(ig_case)
    np.testing.assert_allclose(gap, np.abs(np.asarray(ig.extras["completeness_gap"])[:, 0]))
    assert np.all(np.isnan(make_metric("completeness_gap")(case)))


@pytest.mark.slow
def test_on_toy_llava_the_true_mask_beats_its_reverse():
    """Removing the evidence first hurts the answer more than removing it last."""
    from mmscope.models import load

    vlm = load("toy-llava")
    items = [it for it in world_items(30) if it.mask is not None][:16]
    inputs = vlm.prepare([it.image for it in items], [it.prompt for it in items])
    oracle = OracleMap([it.mask for it in items])
    exp = oracle(vlm, inputs, Predicted())
    reverse = oracle(vlm, inputs, Predicted())
    reverse = type(exp)(
        **{
            **exp.__dict__,
            "image_scores": tuple(tuple(-m for m in item) for item in exp.image_scores),
        }
    )
    score = {}
    for name, e in (("oracle", exp), ("reverse", reverse)):
        c = Case(vlm, inputs, Predicted(), e, None, tuple(it.mask for it in items))
        score[name] = (Deletion(steps=6)(c).mean(), Insertion(steps=6)(c).mean())
    assert score["oracle"][0] < score["reverse"][0] - 0.05
    assert score["oracle"][1] > score["reverse"][1] + 0.05
