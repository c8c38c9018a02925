"""Faithfulness: does removing what a map calls important change the answer?

Deletion and insertion (Petsiuk et al. 2018, RISE) remove (insert) image cells in the map's
order and take the area under the curve of the target's probability; ROAD (Rong et al. 2022)
does the same with removed pixels filled by noisy linear imputation, most relevant first
(MoRF) and least relevant first (LeRF). All items of a batch and several steps run in one
forward (``masked_forwards``): each step's keep mask removes every item's own cells at once.
The curve is the target's probability where the target is a log-probability, its raw score
otherwise (CLIP similarities).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import torch
from scipy.integrate import trapezoid

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.registry import register
from mmscope.core.validate import number, positive_int
from mmscope.methods.attribution.perturbation import Features, Fill, masked_forwards
from mmscope.metrics.base import LEVEL, Case, Metric
from mmscope.metrics.road import impute

FAMILY = "metric/faithfulness"


def cell_orders(case: Case, features: Features) -> list[np.ndarray]:
    """Per item, the flat feature indices of its image cells, most relevant first (ties in
    raster order)."""
    orders: list[list[np.ndarray]] = [[] for _ in range(case.inputs.batch_size)]
    scores: list[list[np.ndarray]] = [[] for _ in range(case.inputs.batch_size)]
    counters = [0] * case.inputs.batch_size
    for b, cells in zip(features.image_items, features.image_slices):
        m = case.explanation.image_map(counters[b], item=b).reshape(-1)
        counters[b] += 1
        orders[b].append(np.arange(cells.start, cells.stop))
        scores[b].append(m)
    out = []
    for idx, sc in zip(orders, scores):
        flat_idx, flat_sc = np.concatenate(idx), np.concatenate(sc)
        out.append(flat_idx[np.argsort(-flat_sc, kind="stable")])
    return out


class RemovalCurve(Metric):
    """Area under the target's curve as cells are removed (or inserted) in the map's order.

    Args:
        steps: the curve has ``steps + 1`` points, removing ``0, 1/steps, ..., 1`` of the cells.
        batch_size: masked copies of the batch per forward.
        fill: pixel value removed cells are blended to (0: the processor's mean colour).
    """

    category = "faithfulness"
    most_relevant_first: ClassVar[bool] = True
    insert: ClassVar[bool] = False

    def __init__(self, steps: int = 10, batch_size: int = 8, fill: float = 0.0) -> None:
        self.steps = positive_int("steps", steps)
        self.batch_size = positive_int("batch_size", batch_size)
        self.fill = number("fill", fill)

    def filler(self, case: Case) -> Fill:
        """What removed cells become."""
        return self.fill

    @property
    def blank_fill(self) -> float:
        """The fill equal to removing every cell (shared by the curves of a case)."""
        return self.fill

    def masks(self, features: Features, orders: list[np.ndarray]) -> torch.Tensor:
        """``(steps + 1, features)`` keep masks: step ``s`` removes (or keeps only) the first
        ``s / steps`` of every item's order."""
        masks = torch.ones(self.steps + 1, features.size)
        for ranked in orders:
            order = torch.as_tensor(ranked if self.most_relevant_first else ranked[::-1].copy())
            for s in range(self.steps + 1):
                k = round(s * len(order) / self.steps)
                if self.insert:
                    masks[s, order[k:]] = 0
                else:
                    masks[s, order[:k]] = 0
        return masks

    def curve(self, case: Case) -> np.ndarray:
        """``(steps + 1, batch)``: the target's probability (or score) at each step. The two
        ends (the clean image, every cell removed) are shared by all curves of a case."""
        if "bound" not in case.memo:
            case.memo["bound"] = case.target.bind(case.vlm, case.inputs)
        bound = case.memo["bound"]
        features = Features.of(case.vlm, bound.inputs)
        masks = self.masks(features, cell_orders(case, features))
        inner = masked_forwards(case.vlm, bound, masks[1:-1], self.batch_size, self.filler(case))
        clean, blank = self._ends(case, bound, features)
        first, last = (blank, clean) if self.insert else (clean, blank)
        scores = torch.cat([first[None], inner[:, :, 0], last[None]])
        return (scores.exp() if bound.log_prob else scores).numpy()

    def _ends(self, case: Case, bound: Any, features: Features) -> torch.Tensor:
        """Scores ``(2, batch)`` of the clean image and of every cell removed."""
        fill = self.blank_fill
        key = ("ends", fill)
        if key not in case.memo:
            ends = torch.ones(2, features.size)
            for cells in features.image_slices:
                ends[1, cells] = 0
            case.memo[key] = masked_forwards(case.vlm, bound, ends, self.batch_size, fill)[:, :, 0]
        return case.memo[key]  # type: ignore[no-any-return]

    def __call__(self, case: Case) -> np.ndarray:
        curve = self.curve(case)
        x = np.linspace(0.0, 1.0, self.steps + 1)
        return np.asarray(trapezoid(curve, x, axis=0))


@register("deletion", kind="metric", family=FAMILY, paper="Petsiuk et al. 2018", level=LEVEL)
class Deletion(RemovalCurve):
    """Remove the most relevant cells first: a faithful map makes the target fall fast."""

    higher_is_better = False


@register("insertion", kind="metric", family=FAMILY, paper="Petsiuk et al. 2018", level=LEVEL)
class Insertion(RemovalCurve):
    """Start from the removed image and insert the most relevant cells first."""

    insert = True


class Road(RemovalCurve):
    """ROAD: removed pixels imputed from their neighbours, with ``noise`` (a fraction of the
    pixel range) on them."""

    def __init__(
        self, steps: int = 10, batch_size: int = 8, noise: float = 0.01, seed: int = 0
    ) -> None:
        super().__init__(steps, batch_size)
        self.noise = number("noise", noise)
        if self.noise < 0:
            raise InputError(f"noise must be at least 0, not {noise}")
        self.seed = int(seed)

    @property
    def blank_fill(self) -> float:
        return 0.0  # imputing a fully removed image gives the mean colour

    def filler(self, case: Case) -> Fill:
        sigma = self.noise * case.vlm.pixel_range

        def imputed(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
            if values.dim() != 4 or not isinstance(keep, torch.Tensor):
                raise NotApplicableError(
                    f"ROAD imputes images laid out (N, C, H, W); {case.vlm.name} is not"
                )
            h, w = values.shape[-2] // keep.shape[-2], values.shape[-1] // keep.shape[-1]
            removed = keep.repeat_interleave(h, 1).repeat_interleave(w, 2) < 0.5
            full = torch.zeros(values.shape[0], *values.shape[-2:], dtype=torch.bool)
            full[:, : removed.shape[1], : removed.shape[2]] = removed
            return impute(values, full, sigma, self.seed)

        return imputed


@register("road_morf", kind="metric", family=FAMILY, paper="Rong et al. 2022", level=LEVEL)
class RoadMoRF(Road):
    """ROAD, most relevant first: the target should fall fast."""

    higher_is_better = False


@register("road_lerf", kind="metric", family=FAMILY, paper="Rong et al. 2022", level=LEVEL)
class RoadLeRF(Road):
    """ROAD, least relevant first: the target should hold up."""

    most_relevant_first = False


@register(
    "completeness_gap", kind="metric", family=FAMILY, paper="Sundararajan et al. 2017", level=LEVEL
)
class CompletenessGap(Metric):
    """|sum of attributions - (f(x) - f(baseline))| of methods that report it (integrated
    gradients); NaN for the others."""

    category = "faithfulness"
    higher_is_better = False

    def __call__(self, case: Case) -> np.ndarray:
        gap = case.explanation.extras.get("completeness_gap")
        if gap is None:
            return np.full(case.inputs.batch_size, np.nan)
        return np.abs(np.asarray(gap, dtype=float).reshape(case.inputs.batch_size, -1)[:, 0])
