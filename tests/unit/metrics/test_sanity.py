"""Cascading randomisation (Adebayo et al. 2018): maps that ignore the model keep correlation 1,
saliency loses it, and the model comes back bit for bit, also when the method raises."""

from dataclasses import replace

import numpy as np
import pytest

from mmscope.core.errors import InputError
from mmscope.core.state import model_state
from mmscope.methods.explain import make_method
from mmscope.metrics.base import make_metric
from mmscope.metrics.sanity import (
    Randomisation,
    cascade_correlations,
    cascade_sites,
    rank_correlation,
    stage_ends,
)


class Fixed:
    """A method whose maps never depend on the model: copies of one explanation."""

    def __init__(self, explanation):
        self.explanation = explanation

    def __call__(self, vlm, inputs, target):
        scores = tuple(tuple(m.copy() for m in item) for item in self.explanation.image_scores)
        return replace(self.explanation, image_scores=scores)


def test_cascade_runs_from_the_output_to_the_input(tiny_llava, tiny_clip):
    sites = cascade_sites(tiny_llava)
    n_lm, n_vision = tiny_llava.num_layers("lm.layer"), tiny_llava.num_layers("vision.layer")
    assert sites[0] == "lm_head" and sites[1] == f"lm.layer[{n_lm - 1}]"
    assert sites[n_lm + 1] == "projector" and sites[-1] == "vision.layer[0]"
    assert len(sites) == n_lm + n_vision + 2
    clip = cascade_sites(tiny_clip)
    assert clip[0] == "vision.proj" and clip[-1] == "vision.layer[0]"
    assert not any(s.startswith(("lm", "text")) for s in clip)
    assert stage_ends(10, 3) == [3, 7, 10] and stage_ends(4, 1) == [4]


def test_rank_correlation_by_hand():
    a = np.array([1.0, 2.0, 3.0, 4.0])
    assert rank_correlation(a, a**3) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert np.isnan(rank_correlation(a, np.ones(4)))


def test_a_method_that_ignores_the_model_keeps_correlation_one(tiny_llava, image, make_case):
    vlm = tiny_llava
    saliency = make_method("saliency")
    case = make_case(vlm, image, saliency)
    case = replace(case, method=Fixed(case.explanation))
    before = model_state(vlm.model)
    curve = cascade_correlations(case, stages=3)
    assert curve.shape == (3, 1)
    np.testing.assert_allclose(curve, 1.0)
    assert model_state(vlm.model) == before


def test_saliency_decorrelates_and_the_model_is_restored(tiny_llava, image, make_case):
    vlm = tiny_llava
    case = make_case(vlm, image, make_method("saliency"))
    before = model_state(vlm.model)
    score = Randomisation(stages=3)(case)
    assert model_state(vlm.model) == before
    assert score.shape == (1,) and score[0] < 0.8
    # restored exactly: the method explains as before
    np.testing.assert_array_equal(
        case.method(vlm, case.inputs, case.target).image_map(), case.explanation.image_map()
    )


def test_the_model_is_restored_when_the_method_raises(tiny_llava, image, make_case):
    vlm = tiny_llava
    saliency = make_method("saliency")
    case = make_case(vlm, image, saliency)
    before = model_state(vlm.model)
    seen = []

    def flaky(vlm, inputs, target):
        seen.append(model_state(vlm.model))
        if len(seen) == 2:
            raise RuntimeError("boom")
        return saliency(vlm, inputs, target)

    with pytest.raises(RuntimeError, match="boom"):
        cascade_correlations(replace(case, method=flaky), stages=3)
    assert len(seen) == 2 and seen[0] != before and seen[1] != seen[0]  # it did randomise
    assert model_state(vlm.model) == before


def test_every_architecture(any_vlm, image, make_case):
    vlm = any_vlm
    case = make_case(vlm, image, make_method("saliency"))
    before = model_state(vlm.model)
    curve = cascade_correlations(case, stages=2, seed=1)
    assert model_state(vlm.model) == before
    assert curve.shape == (2, 1)
    assert np.all((curve >= -1) & (curve <= 1) | np.isnan(curve))
    assert not np.isnan(curve[-1, 0]) and curve[-1, 0] < 0.95


def test_registry_and_bad_settings(tiny_llava, image, make_case):
    metric = make_metric("randomisation", stages=2)
    assert isinstance(metric, Randomisation) and metric.settings == {"stages": 2, "seed": 0}
    assert metric.category == "randomisation" and not metric.higher_is_better
    with pytest.raises(InputError):
        Randomisation(stages=0)
    with pytest.raises(InputError):
        Randomisation(seed=-1)
    case = make_case(tiny_llava, image, make_method("saliency"))
    with pytest.raises(InputError):
        Randomisation()(replace(case, method=None))
