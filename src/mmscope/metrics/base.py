"""What every metric shares: the ``Case`` it scores, the ``Metric`` base class, and the
``MetricResult`` with its bootstrap confidence interval.

Like Quantus, every metric declares its ``category`` and whether higher is better. Explanation
metrics score a ``Case`` (the model, the inputs, the target, one method's explanation of them,
the method itself for metrics that re-run it, and the evidence masks where known) and return
one number per batch item, NaN where the metric does not apply to that item.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mmscope.core.errors import InputError
from mmscope.core.explanation import Explanation
from mmscope.core.inputs import Inputs
from mmscope.core.registry import REGISTRY
from mmscope.core.result import Result, new_figure
from mmscope.core.targets import Target

if TYPE_CHECKING:
    from mmscope.models.base import VLM

#: The categories of metrics, as Quantus groups them, plus hallucination.
CATEGORIES: tuple[str, ...] = (
    "faithfulness",
    "localisation",
    "randomisation",
    "robustness",
    "hallucination",
)
LEVEL = "data/benchmark"


@dataclass(frozen=True, eq=False)
class Case:
    """One batch explained by one method, with what the metrics need to score it.

    Attributes:
        vlm: the model.
        inputs: the batch the method explained.
        target: the explained target (one output per item).
        explanation: the method's explanation of ``target`` on ``inputs``.
        method: the method, for metrics that run it again (randomisation, robustness);
            any callable ``(vlm, inputs, target) -> Explanation``.
        masks: per item, the evidence mask ``(height, width)`` in the original image's
            pixels, or ``None`` where there is none (or the answer was wrong).
        memo: scratch space the metrics of one case share (the bound target, the scores of
            the clean and the blank image), so each is computed once.
    """

    vlm: VLM
    inputs: Inputs
    target: Target
    explanation: Explanation
    method: Any = None
    masks: tuple[np.ndarray | None, ...] = field(default=(), repr=False)
    memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        if any(len(labels) != 1 for labels in self.explanation.labels):
            raise InputError("metrics score one explained output per item; explain one token")


class Metric:
    """Base class of explanation metrics: settings in ``__init__``, a ``Case`` in
    ``__call__``, one score per item back (NaN where it does not apply)."""

    category: ClassVar[str] = ""
    higher_is_better: ClassVar[bool] = True

    def __call__(self, case: Case) -> np.ndarray:
        raise NotImplementedError

    @property
    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def metric_keys(category: str | None = None) -> list[str]:
    """Keys of the registered explanation metrics (of one category), in registry order."""
    import mmscope.metrics  # noqa: F401  (registers them)

    return [
        e.key
        for e in REGISTRY.entries("metric")
        if issubclass(e.obj, Metric) and category in (None, e.obj.category)
    ]


def make_metric(key: str, **settings: Any) -> Metric:
    """A registered metric from its key and settings (bad settings raise InputError)."""
    import mmscope.metrics  # noqa: F401  (registers them)

    return REGISTRY.make(key, "metric", **settings)  # type: ignore[no-any-return]


def bootstrap_ci(
    values: Sequence[float] | np.ndarray, level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean (NaNs dropped). One value gives
    ``(v, v)``, none gives ``(nan, nan)``."""
    x = np.asarray(values, dtype=np.float64)
    return bootstrap_interval((x[~np.isnan(x)],), np.mean, level, resamples, seed)


def bootstrap_interval(
    samples: tuple[np.ndarray, ...],
    statistic: Callable[..., float],
    level: float = 0.95,
    resamples: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(*samples)``, the samples resampled as
    paired items (scipy's ``bootstrap``), e.g. F1 of (predicted, true) answers."""
    n = len(samples[0])
    if n == 0:
        return (float("nan"), float("nan"))
    if n == 1 or all(np.all(s == s[0]) for s in samples):
        value = float(statistic(*samples))
        return (value, value)
    from scipy.stats import bootstrap

    res = bootstrap(
        samples,
        statistic,
        paired=True,
        vectorized=False,
        confidence_level=level,
        n_resamples=resamples,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return (float(res.confidence_interval.low), float(res.confidence_interval.high))


@dataclass(frozen=True)
class MetricResult(Result):
    """One metric's scores of one method over a set of items.

    Attributes:
        metric: the metric's key.
        method: the explained method's key (or a baseline's name).
        values: one score per item (NaN where the metric does not apply).
        category: the metric's category.
        higher_is_better: whether a higher score is better.
    """

    metric: str
    method: str
    values: tuple[float, ...]
    category: str
    higher_is_better: bool

    @property
    def n(self) -> int:
        """Items the metric applied to (NaNs left out)."""
        return int(np.sum(~np.isnan(np.asarray(self.values, dtype=float))))

    @property
    def mean(self) -> float:
        x = np.asarray(self.values, dtype=float)
        return float(np.nanmean(x)) if self.n else float("nan")

    @property
    def ci(self) -> tuple[float, float]:
        """Bootstrap 95% confidence interval of the mean."""
        return bootstrap_ci(self.values)

    def to_dict(self) -> dict[str, Any]:
        lo, hi = self.ci
        return {
            "method": self.method,
            "metric": self.metric,
            "mean": _finite(self.mean),
            "ci": [_finite(lo), _finite(hi)],
            "n": self.n,
            "category": self.category,
            "higher_is_better": self.higher_is_better,
        }

    def record(self) -> dict[str, Any]:
        """``to_dict`` with the per-item values (what ``save`` writes)."""
        return {**self.to_dict(), "values": [_finite(v) for v in self.values]}

    def plot(self, ax: Any = None) -> Any:
        """Histogram of the per-item scores with the mean and its interval."""
        fig, ax = new_figure(4, 3, ax)
        x = np.asarray(self.values, dtype=float)
        ax.hist(x[~np.isnan(x)], bins=20, color="#4c72b0")
        lo, hi = self.ci
        ax.axvline(self.mean, color="k")
        ax.axvspan(lo, hi, color="k", alpha=0.15)
        arrow = "higher is better" if self.higher_is_better else "lower is better"
        ax.set_title(f"{self.method}: {self.metric} ({arrow})", fontsize=9)
        return fig


def _finite(v: float) -> float | None:
    return None if v is None or np.isnan(v) else float(v)
