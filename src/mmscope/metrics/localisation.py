"""Localisation: does the map point at the evidence? (scored against the world's masks)

The map is taken in the original image's pixels (``Explanation.heatmap``: bilinear over the
processor's crop box) and compared with the item's evidence mask (Arras et al. 2022,
"CLEVR-XAI"; Zhang et al. 2018 for the pointing game). Items without a mask score NaN; the
leaderboard passes masks only for correctly answered questions.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import binary_dilation

from mmscope.core.registry import register
from mmscope.core.validate import number
from mmscope.metrics.base import LEVEL, Case, Metric

FAMILY = "metric/localisation"


class MaskMetric(Metric):
    """Scores the heatmap of each item's first image against its evidence mask."""

    category = "localisation"

    def score(self, heat: np.ndarray, mask: np.ndarray) -> float:
        raise NotImplementedError

    def __call__(self, case: Case) -> np.ndarray:
        out = np.full(case.inputs.batch_size, np.nan)
        for b, mask in enumerate(case.masks):
            if mask is None or not mask.any():
                continue
            h, w = mask.shape
            heat = case.explanation.heatmap(0, item=b, size=(w, h))
            out[b] = self.score(heat, mask.astype(bool))
        return out


@register("pointing_game", kind="metric", family=FAMILY, paper="Zhang et al. 2018", level=LEVEL)
class PointingGame(MaskMetric):
    """1 if the map's maximum falls in the mask grown by ``tolerance`` (a fraction of the
    image's longer side; 15 px of 224 in the paper), else 0. Ties: any maximum counts."""

    def __init__(self, tolerance: float = 15 / 224) -> None:
        self.tolerance = number("tolerance", tolerance)

    def score(self, heat: np.ndarray, mask: np.ndarray) -> float:
        grow = round(self.tolerance * max(mask.shape))
        if grow > 0:
            disk = np.hypot(*np.ogrid[-grow : grow + 1, -grow : grow + 1]) <= grow
            mask = binary_dilation(mask, structure=disk)
        return float(mask[heat >= heat.max()].any())


@register("relevance_mass", kind="metric", family=FAMILY, paper="Arras et al. 2022", level=LEVEL)
class RelevanceMass(MaskMetric):
    """Share of the positive relevance that falls inside the mask (0 when none is positive)."""

    def score(self, heat: np.ndarray, mask: np.ndarray) -> float:
        positive = np.clip(heat, 0, None)
        total = positive.sum()
        return float(positive[mask].sum() / total) if total > 0 else 0.0


@register("relevance_rank", kind="metric", family=FAMILY, paper="Arras et al. 2022", level=LEVEL)
class RelevanceRank(MaskMetric):
    """Share of the top-|mask| pixels (by relevance) that fall inside the mask."""

    def score(self, heat: np.ndarray, mask: np.ndarray) -> float:
        k = int(mask.sum())
        top = np.argsort(-heat.reshape(-1), kind="stable")[:k]
        return float(mask.reshape(-1)[top].mean())
