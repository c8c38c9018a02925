"""Max-sensitivity (Yeh et al. 2019): zero for maps that ignore the input or for no noise,
positive for saliency, and hand-checked ratios for methods whose maps we can compute."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from mmscope.core.errors import InputError
from mmscope.core.state import model_state
from mmscope.core.targets import Predicted
from mmscope.methods.explain import make_method
from mmscope.metrics.base import Case, make_metric
from mmscope.metrics.robustness import MaxSensitivity
from mmscope.world import render, sample_scenes


def _with_maps(explanation, maps):
    return replace(explanation, image_scores=((maps[None].astype(np.float64),),))


class Fixed:
    """Ignores the input: the same maps every call, scaled by ``factors[call]`` if given."""

    def __init__(self, explanation, factors=None):
        self.explanation, self.factors, self.calls = explanation, factors, 0

    def __call__(self, vlm, inputs, target):
        f = 1.0 if self.factors is None else self.factors[self.calls]
        self.calls += 1
        return _with_maps(self.explanation, f * self.explanation.image_map())


class PatchMean:
    """A linear, deterministic 'method': the mean normalised pixel value of each patch."""

    def __init__(self, explanation):
        self.explanation = explanation

    def __call__(self, vlm, inputs, target):
        return _with_maps(self.explanation, _patch_mean(vlm, inputs.pixel_values, inputs))


def _patch_mean(vlm, values, inputs):
    grid = vlm.pixel_grid(values.float(), inputs)[0]
    return (grid / (values[0].numel() / grid.numel())).numpy().astype(np.float64)


def test_zero_for_maps_that_ignore_the_input(tiny_llava, image, make_case):
    case = make_case(tiny_llava, image, make_method("saliency"))
    fixed = Fixed(case.explanation)
    assert MaxSensitivity(samples=3)(replace(case, method=fixed))[0] == 0.0
    assert fixed.calls == 3


def test_the_largest_relative_change_by_hand(tiny_llava, image, make_case):
    case = make_case(tiny_llava, image, make_method("saliency"))
    fixed = Fixed(case.explanation, factors=[1.1, 0.8, 1.25, 1.0])
    score = MaxSensitivity(samples=4)(replace(case, method=fixed))
    assert score[0] == pytest.approx(0.25, rel=1e-6)
    zero = _with_maps(case.explanation, np.zeros((4, 4)))
    case = replace(case, explanation=zero, method=Fixed(zero))
    assert np.isnan(MaxSensitivity(samples=1)(case)[0])


def test_patch_means_move_by_the_mean_of_the_noise(tiny_llava, image, make_case):
    """For map = mean pixel per patch, map_j - map is the mean noise per patch: reproduce the
    documented draw (uniform in [-r * range, r * range], float32 on the CPU, element-wise)."""
    vlm = tiny_llava
    case = make_case(vlm, image, make_method("saliency"))
    inputs = case.inputs
    method = PatchMean(case.explanation)
    case = replace(case, explanation=method(vlm, inputs, case.target), method=method)
    metric = MaxSensitivity(samples=3, radius=0.1, seed=7)
    pixels = inputs.pixel_values
    generator = torch.Generator().manual_seed(7)
    scale = 0.1 * vlm.pixel_range
    original = case.explanation.image_map()
    changes = []
    for _ in range(3):
        noise = (2 * torch.rand(pixels.shape, generator=generator) - 1) * scale
        changes.append(np.linalg.norm(_patch_mean(vlm, pixels + noise, inputs) - original))
    expected = max(changes) / np.linalg.norm(original)
    assert expected > 0
    score = metric(case)[0]
    assert score == pytest.approx(expected, rel=1e-5)
    # linear in the radius, and exactly zero without noise
    assert MaxSensitivity(samples=3, radius=0.2, seed=7)(case)[0] == pytest.approx(2 * score, 1e-4)
    assert MaxSensitivity(samples=3, radius=0.0)(case)[0] == 0.0


def test_saliency_is_sensitive_and_the_model_is_untouched(tiny_llava, image, make_case):
    vlm = tiny_llava
    case = make_case(vlm, image, make_method("saliency"))
    before = model_state(vlm.model)
    score = MaxSensitivity(samples=3)(case)
    assert model_state(vlm.model) == before
    assert score.shape == (1,) and 0 < score[0] < 1
    assert MaxSensitivity(samples=2, radius=0.0)(case)[0] == 0.0


def test_every_architecture(any_vlm, image, make_case):
    vlm = any_vlm
    case = make_case(vlm, image, make_method("saliency"))
    before = model_state(vlm.model)
    score = MaxSensitivity(samples=2, radius=0.05)(case)
    assert model_state(vlm.model) == before
    assert score.shape == (1,) and np.isfinite(score[0]) and score[0] > 0
    assert MaxSensitivity(samples=1, radius=0.0)(case)[0] == 0.0


def test_a_batch_scores_each_item(tiny_llava, image):
    vlm = tiny_llava
    other = render(sample_scenes(2, 9)[1], 48).image
    inputs = vlm.prepare([image, other], ["what color is the circle ?", "how many objects ?"])
    method = make_method("saliency")
    case = Case(vlm, inputs, Predicted(), method(vlm, inputs, Predicted()), method)
    score = MaxSensitivity(samples=2)(case)
    assert score.shape == (2,) and np.all(score > 0)


def test_registry_and_bad_settings(tiny_llava, image, make_case):
    metric = make_metric("max_sensitivity", samples=2)
    assert isinstance(metric, MaxSensitivity)
    assert metric.settings == {"samples": 2, "radius": 0.05, "seed": 0}
    assert metric.category == "robustness" and not metric.higher_is_better
    for bad in (
        {"samples": 0},
        {"samples": 1.5},
        {"radius": "big"},
        {"radius": -0.1},
        {"radius": float("nan")},
        {"seed": -1},
    ):
        with pytest.raises(InputError):
            MaxSensitivity(**bad)
    case = make_case(tiny_llava, image, make_method("saliency"))
    with pytest.raises(InputError):
        MaxSensitivity()(replace(case, method=None))
