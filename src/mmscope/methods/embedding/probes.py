"""Linear probes per layer with control tasks (Hewitt & Liang 2019, "Designing and
interpreting probes with control tasks").

A probe is a standardised logistic regression (scikit-learn) from a layer's activations to a
world concept (colour, shape, quadrant, count). Its accuracy is cross-validated with folds
grouped by image (``GroupKFold``): the tokens of one image never sit in training and test
at once. A control task gives every *type* a random label drawn from the concept's label
distribution; it can be learned only by memorising types, and selectivity = probe accuracy
minus control accuracy says how much of the accuracy is the representation's, not the
probe's.

Types: Hewitt & Liang's type is the input word; the analogue here is what recurs across
images without holding the concept: an image token's patch grid index (its position, which
a ViT or LLM is given) and the last token's prompt. A per-object type would never recur
across image-grouped folds (the control would be at chance by construction), and a
(colour, shape) type would be a concept, not an input type.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mmscope.core.errors import InputError
from mmscope.core.registry import register
from mmscope.core.sites import site
from mmscope.core.validate import integer, number, positive_int, valid_seed
from mmscope.methods.activations import collect
from mmscope.methods.analysis import Result, jsonable, new_figure
from mmscope.methods.analysis import stack as default_stack
from mmscope.methods.embedding.concepts import CONCEPTS, row_labels
from mmscope.methods.study import KIND, Study
from mmscope.world.items import item_scenes

if TYPE_CHECKING:
    from mmscope.models.base import VLM
    from mmscope.world.items import BenchItem

KINDS: tuple[str, ...] = ("object", "last", "class")
STACKS: tuple[str, ...] = ("lm.layer", "vision.layer")


def probe_accuracy(
    features: np.ndarray, labels: np.ndarray, groups: np.ndarray, folds: int, c: float = 1.0
) -> float:
    """Mean accuracy of a standardised L2 logistic regression over ``GroupKFold(folds)``
    grouped by ``groups`` (NaN with fewer than two labels or ``folds`` groups)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(set(groups.tolist())) < folds:
        return float("nan")
    cv = GroupKFold(folds)
    if any(len(set(labels[train].tolist())) < 2 for train, _ in cv.split(features, labels, groups)):
        return float("nan")  # a training fold with a single label
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    scores = cross_val_score(probe, features, labels, groups=groups, cv=cv, error_score="raise")
    return float(np.mean(scores))


def control_labels(labels: np.ndarray, types: np.ndarray, seed: int) -> np.ndarray:
    """A control task: each type's label drawn at random from the empirical distribution of
    ``labels``, the same for every row of the type (Hewitt & Liang 2019)."""
    values, counts = np.unique(labels.astype(str), return_counts=True)
    kinds, inverse = np.unique(types.astype(str), return_inverse=True)
    drawn = np.random.default_rng(seed).choice(values, size=len(kinds), p=counts / counts.sum())
    return drawn[inverse]


@dataclass(frozen=True, eq=False)
class ProbeResult(Result):
    """Probe and control accuracies per layer, concept and position kind.

    Attributes:
        stack: the layer stack probed (``"lm.layer"`` or ``"vision.layer"``).
        layers: the layers, in order.
        concepts: the concepts probed.
        kinds: position kinds (``"object"`` patches, ``"last"`` token, ``"class"`` token).
        accuracy: ``(layers, concepts, kinds)`` probe accuracy, NaN where not measurable.
        control: the same for the control task.
        rows: ``(concepts, kinds)`` labelled rows per layer.
        classes: ``(concepts, kinds)`` distinct labels.
        folds: cross-validation folds (grouped by image).
    """

    stack: str
    layers: tuple[int, ...]
    concepts: tuple[str, ...]
    kinds: tuple[str, ...]
    accuracy: np.ndarray
    control: np.ndarray
    rows: np.ndarray
    classes: np.ndarray
    folds: int

    @property
    def selectivity(self) -> np.ndarray:
        """Probe accuracy minus control accuracy."""
        return self.accuracy - self.control

    def at(self, concept: str, kind: str) -> dict[str, np.ndarray]:
        """Per layer accuracy, control and selectivity of one concept and kind."""
        c, k = self.concepts.index(concept), self.kinds.index(kind)
        acc, ctl = self.accuracy[:, c, k], self.control[:, c, k]
        return {"accuracy": acc, "control": ctl, "selectivity": acc - ctl}

    def tables(self) -> dict[str, dict[str, list[Any]]]:
        """One row per layer, concept and kind."""
        cols: dict[str, list[Any]] = {
            k: []
            for k in ("layer", "concept", "kind", "accuracy", "control", "selectivity", "rows")
        }
        for i, layer in enumerate(self.layers):
            for c, concept in enumerate(self.concepts):
                for k, kind in enumerate(self.kinds):
                    acc, ctl = float(self.accuracy[i, c, k]), float(self.control[i, c, k])
                    for key, value in zip(
                        cols,
                        (layer, concept, kind, acc, ctl, acc - ctl, int(self.rows[c, k])),
                    ):
                        cols[key].append(value)
        return {"probes": cols}

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "study": "probe",
                "stack": self.stack,
                "layers": list(self.layers),
                "concepts": list(self.concepts),
                "kinds": list(self.kinds),
                "accuracy": self.accuracy,
                "control": self.control,
                "selectivity": self.selectivity,
                "rows": self.rows,
                "classes": self.classes,
                "folds": self.folds,
            }
        )

    def plot(self, ax: Any = None) -> Any:
        """Accuracy (solid) and selectivity (dashed) per layer, a colour per concept."""
        fig, ax = new_figure(6.0, 3.5, ax)
        markers = {"object": "o", "last": "s", "class": "^"}
        for c, concept in enumerate(self.concepts):
            for k, kind in enumerate(self.kinds):
                acc = self.accuracy[:, c, k]
                if np.all(np.isnan(acc)):
                    continue
                style = {"color": f"C{c}", "marker": markers.get(kind, "o")}
                ax.plot(self.layers, acc, label=f"{concept} @ {kind}", **style)
                ax.plot(self.layers, acc - self.control[:, c, k], linestyle="--", **style)
        ax.set_xticks(list(self.layers))
        ax.set_xlabel(f"{self.stack}[i]")
        ax.set_ylabel("accuracy (solid), selectivity (dashed)")
        ax.set_title(f"linear probes, {self.folds}-fold grouped by image", fontsize=9)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        return fig


def _layers(value: Any) -> tuple[int, ...]:
    raw = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for v in raw:
        if isinstance(v, str):
            if not v.strip().lstrip("-").isdigit():
                raise InputError(f"layers must be integers, not {v!r}")
            v = int(v)
        out.append(integer("layers", v))
    return tuple(out)


@register(
    "probe",
    kind=KIND,
    family="embedding/probe",
    paper="Hewitt & Liang 2019",
    level="model/embedding",
)
class Probe(Study):
    """Linear probes per layer with control tasks and selectivity (Hewitt & Liang 2019).

    Rows are the residual stream ``{stack}[i]`` at object patches (an image token whose patch
    an object covers by at least ``min_cover``: its colour, shape, quadrant) and at the last
    token (decoders: the scene's object count and the asked object's attributes) or a vision
    tower's class token (the count). Probe: ``StandardScaler`` + ``LogisticRegression(C=c)``,
    accuracy over ``GroupKFold(folds)`` grouped by image. Control labels: one random label
    per type (patch grid index, prompt) from the labels' distribution, drawn with ``seed``.

    Args:
        stack: ``"lm.layer"`` or ``"vision.layer"``; ``""``: the language model's (a dual
            encoder's vision tower).
        layers: layer indices; empty: every layer.
        concepts: among ``("color", "shape", "count", "position")``.
        folds: cross-validation folds.
        c: inverse L2 strength of the probe.
        min_cover: least share of a patch an object must cover to label it.
        seed: the control tasks' seed.
        batch_size: items per forward.
    """

    def __init__(
        self,
        stack: str = "",
        layers: tuple[int, ...] = (),
        concepts: tuple[str, ...] = CONCEPTS,
        folds: int = 5,
        c: float = 1.0,
        min_cover: float = 0.5,
        seed: int = 0,
        batch_size: int = 16,
    ) -> None:
        if stack and stack not in STACKS:
            raise InputError(f"stack must be one of {STACKS} (or empty), not {stack!r}")
        self.stack = stack
        self.layers = _layers(layers)
        self.concepts = tuple(concepts)
        if not self.concepts or set(self.concepts) - set(CONCEPTS):
            raise InputError(f"concepts must be among {CONCEPTS}, not {concepts!r}")
        self.folds = integer("folds", folds, minimum=2)
        self.c = number("c", c)
        self.min_cover = number("min_cover", min_cover)
        if self.c <= 0 or not 0 < self.min_cover <= 1:
            raise InputError("c must be positive and min_cover in (0, 1]")
        self.seed = valid_seed(seed)
        self.batch_size = positive_int("batch_size", batch_size)

    def __call__(self, vlm: VLM, items: Sequence[BenchItem]) -> ProbeResult:
        item_scenes(items)  # world items only: a user's carry no concept labels
        stack = self.stack or default_stack(vlm)
        n = vlm.num_layers(stack)
        layers = tuple(i % n for i in self.layers) if self.layers else tuple(range(n))
        for i in self.layers:
            if not -n <= i < n:
                raise InputError(f"layer {i} is outside {stack}'s {n} layers")
        sites = [site(stack, i) for i in layers]
        acts = collect(vlm, items, sites, ("image", "last", "class"), self.batch_size)
        first = acts[sites[0]]
        shape = (len(layers), len(self.concepts), len(KINDS))
        accuracy, control = np.full(shape, np.nan), np.full(shape, np.nan)
        rows = np.zeros(shape[1:], dtype=np.int64)
        classes = np.zeros(shape[1:], dtype=np.int64)
        for c, concept in enumerate(self.concepts):
            labels, kinds, types = row_labels(
                items, first.item, first.group, first.patch, first.grid, concept, self.min_cover
            )
            for k, kind in enumerate(KINDS):
                keep = kinds == kind
                if not keep.any():
                    continue
                y = labels[keep].astype(str)
                rows[c, k], classes[c, k] = int(keep.sum()), len(set(y.tolist()))
                y_control = control_labels(
                    y, types[keep], self.seed + 7919 * CONCEPTS.index(concept) + k
                )
                groups = first.item[keep]
                for i, where in enumerate(sites):
                    x = acts[where].values[keep]
                    accuracy[i, c, k] = probe_accuracy(x, y, groups, self.folds, self.c)
                    control[i, c, k] = probe_accuracy(x, y_control, groups, self.folds, self.c)
        if np.all(np.isnan(accuracy)):
            warnings.warn("no probe could be fitted: too few items or labels", stacklevel=2)
        used = [k for k in range(len(KINDS)) if rows[:, k].any()]
        return ProbeResult(
            stack,
            layers,
            self.concepts,
            tuple(KINDS[k] for k in used),
            accuracy[:, :, used],
            control[:, :, used],
            rows[:, used],
            classes[:, used],
            self.folds,
        )
