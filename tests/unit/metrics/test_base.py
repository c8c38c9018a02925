"""The metric registry and the bootstrap interval."""

import numpy as np
import pytest

from mmscope.core.errors import InputError
from mmscope.core.registry import REGISTRY
from mmscope.metrics import CATEGORIES, MetricResult, bootstrap_ci, make_metric, metric_keys


def test_every_metric_declares_category_and_direction():
    keys = metric_keys()
    assert {
        "deletion",
        "insertion",
        "road_morf",
        "road_lerf",
        "pointing_game",
        "relevance_mass",
        "relevance_rank",
        "randomisation",
        "max_sensitivity",
    } <= set(keys)
    for entry in REGISTRY.entries("metric"):
        assert entry.obj.category in CATEGORIES
        assert isinstance(entry.obj.higher_is_better, bool)
    assert (
        not make_metric("deletion").higher_is_better and make_metric("insertion").higher_is_better
    )


def test_bad_metric_settings_raise_input_error():
    with pytest.raises(InputError):
        make_metric("deletion", steps=0)
    with pytest.raises(InputError):
        make_metric("deletion", colour="red")


def test_bootstrap_interval_covers_the_mean_and_shrinks_like_one_over_root_n():
    rng = np.random.default_rng(0)
    x = rng.normal(1.0, 2.0, 400)
    lo, hi = bootstrap_ci(x)
    assert lo < x.mean() < hi
    assert hi - lo == pytest.approx(2 * 1.96 * x.std() / np.sqrt(len(x)), rel=0.15)
    assert bootstrap_ci(x) == (lo, hi)  # seeded
    assert bootstrap_ci([3.0, np.nan, 3.0]) == (3.0, 3.0)
    assert all(np.isnan(bootstrap_ci([np.nan])))


def test_metric_result_ignores_nan_and_serialises():
    r = MetricResult("deletion", "saliency", (0.2, float("nan"), 0.4), "faithfulness", False)
    d = r.to_dict()
    assert r.n == 2 and d["mean"] == pytest.approx(0.3) and d["higher_is_better"] is False
    assert d["ci"][0] <= 0.3 <= d["ci"][1]
