"""Metrics that score explanations against the model and the world's truth, and measure
hallucination (registered under kind ``"metric"``; see ``metrics.base``)."""

from mmscope.metrics import (  # noqa: F401  (registers them)
    faithfulness,
    hallucination,
    localisation,
    robustness,
    sanity,
)
from mmscope.metrics.base import (
    CATEGORIES,
    Case,
    Metric,
    MetricResult,
    bootstrap_ci,
    make_metric,
    metric_keys,
)

__all__ = [
    "CATEGORIES",
    "Case",
    "Metric",
    "MetricResult",
    "bootstrap_ci",
    "make_metric",
    "metric_keys",
]
