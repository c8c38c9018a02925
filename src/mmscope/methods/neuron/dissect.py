"""Network dissection (Bau et al. 2017, "Network Dissection: Quantifying Interpretability of
Deep Visual Representations"), adapted to patch tokens.

A unit's activation map over an image is its activation at each image patch (no upsampling:
the world's concepts are labelled per patch, ``world.patch_concepts``). Each unit is
thresholded at its top ``quantile`` over every patch of the dataset; its IoU with a concept is
|fires AND concept| / |fires OR concept| summed over the dataset; its label is the concept of
highest IoU, kept when the IoU exceeds ``min_iou`` (0.04 in the paper).

Bau et al. threshold at the 0.995 quantile of upsampled pixel maps. A world image has only
36 patches and a colour covers a few percent of them, so at 0.995 no unit could reach an IoU
above ~0.1; the default here is 0.95 (top 5% of patches), of the order of one colour's share.

Concepts need the scenes behind the items: the items' own (``bench.world_items`` keep
theirs) or the call keyword ``scenes``. A user's JSONL has no scenes: ``InputError``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy.stats import hypergeom

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.registry import register
from mmscope.core.sites import site
from mmscope.core.validate import number, positive_int
from mmscope.methods.activations import Activations, collect
from mmscope.methods.analysis import new_figure
from mmscope.methods.neuron.base import NeuronSet
from mmscope.methods.neuron.concept_truth import kinds_summary, patch_concept_matrix
from mmscope.methods.study import KIND, Study
from mmscope.world.items import item_scenes

if TYPE_CHECKING:
    from mmscope.models.base import VLM
    from mmscope.world import Scene
    from mmscope.world.items import BenchItem

#: Significance of "IoU above chance" (hypergeometric test, Bonferroni over the concepts).
ALPHA = 0.01


def thresholds(values: np.ndarray, quantile: float) -> np.ndarray:
    """Each unit's (column's) ``quantile`` over the rows."""
    return np.quantile(values, quantile, axis=0).astype(np.float32)


def iou(fires: np.ndarray, concepts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """IoU ``(units, concepts)`` of bool ``fires (rows, units)`` with bool ``concepts (rows,
    concepts)`` summed over all rows, and the intersections."""
    inter = fires.T.astype(np.float32) @ concepts.astype(np.float32)
    union = fires.sum(0)[:, None] + concepts.sum(0)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1), 0.0), inter


def label_units(
    values: np.ndarray, concepts: np.ndarray, quantile: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per unit: best concept index, its IoU, the threshold and the hypergeometric p-value of
    the best concept's overlap (chance: the unit's top patches drawn at random)."""
    cut = thresholds(values, quantile)
    fires = values > cut  # strict: ties at a ReLU's zero do not fire
    table, inter = iou(fires, concepts)
    best = table.argmax(1)
    units = np.arange(len(best))
    p = hypergeom.sf(
        inter[units, best] - 1, len(values), concepts.sum(0)[best], fires.sum(0)
    ).astype(float)
    return best, table[units, best], cut, p


@dataclass(frozen=True)
class DissectionResult(NeuronSet):
    """A ``NeuronSet`` of concept-labelled units plus every unit's row (``tables()``) and a
    ``summary`` of how well the labels hold against the world's truth."""

    table: dict[str, Any] = field(default_factory=dict, repr=False)
    summary: dict[str, Any] = field(default_factory=dict)

    def tables(self) -> dict[str, dict[str, Any]]:
        return {"units": self.table}

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "summary": self.summary}

    def plot(self, ax: Any = None) -> Any:
        """Labelled units per concept (the 15 most frequent labels)."""
        fig, ax = new_figure(6, 3, ax)
        names, counts = np.unique(np.asarray(self.labels, dtype=str), return_counts=True)
        order = np.argsort(-counts, kind="stable")[:15]
        ax.bar(range(len(order)), counts[order])
        ax.set_xticks(range(len(order)), names[order].tolist(), rotation=30, ha="right")
        ax.set_ylabel("units")
        ax.set_title(f"{self.method}: {len(self)} labelled units")
        return fig


def default_sites(vlm: VLM, sites: Sequence[str]) -> list[str]:
    """``sites``, or every vision MLP activation."""
    if sites:
        return list(sites)
    return [site("vision.layer", i, "mlp.act") for i in range(vlm.num_layers("vision.layer"))]


def collect_images(
    vlm: VLM, items: Sequence[BenchItem], sites: Sequence[str], batch_size: int
) -> dict[str, Activations]:
    """Image-token activations at ``sites`` (default: every vision MLP activation, or, where
    the vision tower keeps no sequence per image (Qwen2-VL), every LM MLP activation)."""
    chosen = default_sites(vlm, sites)
    try:
        return collect(vlm, items, chosen, groups=("image",), batch_size=batch_size)
    except NotApplicableError:
        if sites or vlm.contrastive:
            raise
    lm = [site("lm.layer", i, "mlp.act") for i in range(vlm.num_layers("lm.layer"))]
    return collect(vlm, items, lm, groups=("image",), batch_size=batch_size)


@register(
    "network_dissection",
    kind=KIND,
    family="neuron/concept",
    paper="Bau et al. 2017",
    level="model/neuron",
)
class NetworkDissection(Study):
    """Label units with the world's patch concepts by thresholded IoU (Bau et al. 2017).

    Args:
        sites: MLP activation sites (default: every ``vision.layer[i].mlp.act``, or every
            ``lm.layer[i].mlp.act`` where the vision tower keeps no sequence per image, as
            Qwen2-VL's; LM sites are read at image tokens).
        quantile: per-unit activation quantile above which a unit fires (0.995 in the paper;
            0.95 here, see the module docstring).
        min_iou: least IoU for a label (0.04 in the paper).
        min_cover: least share of a patch an object covers to give it its concepts.
        batch_size: items per forward.
        background: also label with ``"background"`` (off by default: it covers most patches,
            so any unit would pass ``min_iou`` with it; Broden has no such concept).
    """

    def __init__(
        self,
        sites: tuple[str, ...] = (),
        quantile: float = 0.95,
        min_iou: float = 0.04,
        min_cover: float = 0.25,
        batch_size: int = 16,
        background: bool = False,
    ) -> None:
        self.background = bool(background)
        self.sites = tuple(str(s) for s in sites)
        self.quantile = number("quantile", quantile)
        if not 0.0 < self.quantile < 1.0:
            raise InputError(f"quantile must lie in (0, 1), not {quantile}")
        self.min_iou = number("min_iou", min_iou)
        self.min_cover = number("min_cover", min_cover)
        if not 0.0 < self.min_cover <= 1.0:
            raise InputError(f"min_cover must lie in (0, 1], not {min_cover}")
        self.batch_size = positive_int("batch_size", batch_size)

    def settings(self) -> dict[str, Any]:
        return dict(vars(self))

    def __call__(
        self, vlm: VLM, items: Sequence[BenchItem], scenes: Sequence[Scene] | None = None
    ) -> DissectionResult:
        """``scenes``: the world scene of each item (default: matched by pixels)."""
        found = item_scenes(items, scenes)
        acts = collect_images(vlm, items, self.sites, self.batch_size)
        sites = list(acts)
        first = acts[sites[0]]
        names, concepts = patch_concept_matrix(first, items, found, self.min_cover, self.background)
        rows: dict[str, list[Any]] = {k: [] for k in COLUMNS}
        agree: list[bool] = []
        for at in sites:
            a = acts[at]
            if not (np.array_equal(a.item, first.item) and np.array_equal(a.patch, first.patch)):
                first = a
                names, concepts = patch_concept_matrix(
                    a, items, found, self.min_cover, self.background
                )
            agree += add_units(rows, at, a, names, concepts, self.quantile, self.min_iou)
        n = len(names)
        return dissection_result("network_dissection", rows, n, agree, self.settings())


COLUMNS = ("site", "unit", "label", "iou", "threshold", "p_value", "labelled")


def add_units(
    rows: dict[str, list[Any]],
    site: str,
    acts: Activations,
    names: list[str],
    concepts: np.ndarray,
    quantile: float,
    min_iou: float,
) -> list[bool]:
    """Append every unit of ``acts`` to ``rows`` (``COLUMNS``); return, per labelled unit,
    whether its labels on the even and the odd items agree (split-half stability)."""
    best, score, cut, p = label_units(acts.values, concepts, quantile)
    keep = score > min_iou
    halves = [acts.item % 2 == h for h in (0, 1)]
    split = [label_units(acts.values[h], concepts[h], quantile)[0] for h in halves]
    rows["site"] += [site] * len(best)
    rows["unit"] += list(range(len(best)))
    rows["label"] += [names[b] for b in best]
    rows["iou"] += score.tolist()
    rows["threshold"] += cut.tolist()
    rows["p_value"] += p.tolist()
    rows["labelled"] += keep.tolist()
    return (split[0] == split[1])[keep].tolist()


def dissection_result(
    method: str,
    rows: dict[str, list[Any]],
    n_concepts: int,
    agree: list[bool],
    settings: dict[str, Any],
) -> DissectionResult:
    """The labelled units of ``rows`` with every unit's row as the ``units`` table."""
    keep = np.flatnonzero(rows["labelled"])
    labels = [rows["label"][i] for i in keep]
    significant = np.asarray(rows["p_value"])[keep] < ALPHA / max(n_concepts, 1)
    summary = {
        "units": len(rows["unit"]),
        "labelled": len(keep),
        "above_chance": int(significant.sum()),
        "label_kinds": kinds_summary(labels),
        "split_half_agreement": float(np.mean(agree)) if agree else float("nan"),
    }
    return DissectionResult(
        method,
        tuple((rows["site"][i], int(rows["unit"][i])) for i in keep),
        tuple(labels),
        tuple(float(rows["iou"][i]) for i in keep),
        settings,
        table={k: v if k in ("site", "label") else np.asarray(v) for k, v in rows.items()},
        summary=summary,
    )
