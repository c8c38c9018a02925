"""TCAV: testing with concept activation vectors (Kim et al. 2018, "Interpretability beyond
feature attribution: quantitative testing with concept activation vectors").

A CAV is the unit normal of a linear classifier (scikit-learn ``LogisticRegression``)
separating a layer's activations on images holding a concept (world images with, e.g., a red
object) from its activations on random images. The TCAV score is the share of inputs whose
target rises when the layer moves along the CAV: the sign of the directional derivative
``S = grad_h f . v``. Significance: ``runs`` CAVs against different random sets, and as many
random-vs-random CAVs; a two-sided t-test (scipy) of the two groups of scores.

Activations are the layer's image tokens (with a vision tower's class token), averaged per
image; moving along ``v`` adds ``v`` to every one of them, so ``S`` is the sum over those
tokens of ``grad_{h_p} f . v``. The random sets are drawn from the images that do not hold
the concept (Kim et al. draw random images from a large pool; in a small world a random draw
would often hold the concept).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmscope.core.errors import InputError
from mmscope.core.hooks import patch
from mmscope.core.registry import register
from mmscope.core.sites import site
from mmscope.core.targets import token_id
from mmscope.core.validate import integer, number, positive_int, valid_seed
from mmscope.methods.activations import batches, collect, token_rows
from mmscope.methods.analysis import Result, jsonable, new_figure
from mmscope.methods.analysis import stack as default_stack
from mmscope.methods.study import KIND, Study
from mmscope.world import image_concepts
from mmscope.world.items import item_scenes

if TYPE_CHECKING:
    from mmscope.core.inputs import Inputs
    from mmscope.models.base import VLM
    from mmscope.world.items import BenchItem


#: The token groups that make up an image at a layer: its patches, and a tower's class token.
IMAGE_GROUPS: tuple[str, ...] = ("image", "class")


def concept_activation_vector(
    concept: np.ndarray, random: np.ndarray, c: float = 1.0, seed: int = 0
) -> np.ndarray:
    """Unit normal of a logistic regression separating ``concept`` rows (class 1) from
    ``random`` rows (class 0), pointing towards the concept."""
    from sklearn.linear_model import LogisticRegression

    x = np.concatenate([concept, random]).astype(np.float64)
    y = np.r_[np.ones(len(concept)), np.zeros(len(random))]
    coef = LogisticRegression(C=c, max_iter=5000, random_state=seed).fit(x, y).coef_[0]
    return coef / max(float(np.linalg.norm(coef)), 1e-12)


def tcav_score(derivatives: np.ndarray) -> float:
    """Share of inputs whose directional derivative is positive."""
    return float(np.mean(np.asarray(derivatives) > 0))


def tcav_runs(
    pooled: np.ndarray,
    holds: np.ndarray,
    grads: np.ndarray,
    runs: int,
    k: int,
    c: float = 1.0,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """TCAV scores of ``runs`` concept CAVs and ``runs`` random-vs-random CAVs.

    Run ``r`` draws ``k`` concept rows of ``pooled`` (where ``holds``) and two disjoint random
    sets ``A``, ``B`` of ``k`` rows each from the others; the concept CAV separates the
    concept rows from ``A``, the random CAV ``B`` from ``A``. Scores: share of ``grads`` rows
    (inputs' gradients) with a positive dot product with the CAV.
    """
    concept, pool = np.flatnonzero(holds), np.flatnonzero(~holds)
    scores: list[float] = []
    random_scores: list[float] = []
    for run in range(runs):
        rng = np.random.default_rng([seed, run])
        chosen = rng.choice(concept, k, replace=False)
        a, b = np.split(rng.permutation(pool)[: 2 * k], 2)
        for rows, out in ((chosen, scores), (b, random_scores)):
            cav = concept_activation_vector(pooled[rows], pooled[a], c, seed)
            out.append(tcav_score(grads @ cav))
    return np.array(scores), np.array(random_scores)


def significance(scores: np.ndarray, random_scores: np.ndarray) -> tuple[float, float]:
    """``(t, p)`` of a two-sided t-test (scipy's ``ttest_ind``) of concept vs random scores;
    NaN where both are constant and equal."""
    from scipy.stats import ttest_ind

    with warnings.catch_warnings():  # scores that are all 1 are exact, not imprecise
        warnings.simplefilter("ignore", RuntimeWarning)
        test = ttest_ind(scores, random_scores)
    return float(test.statistic), float(test.pvalue)


def image_token_mask(vlm: VLM, inputs: Inputs, site: str, value: torch.Tensor) -> torch.Tensor:
    """``(batch, seq)`` 1.0 at the image's tokens of a site's output ``value`` (a vision
    tower's class token included)."""
    mask = torch.zeros(value.shape[:2], dtype=value.dtype, device=value.device)
    for b, rows in enumerate(token_rows(vlm, inputs, site, value)):
        mask[b, [p for p, group, _ in rows if group in IMAGE_GROUPS]] = 1.0
    return mask


def target_scores(vlm: VLM, inputs: Inputs, targets: Sequence[int | None]) -> torch.Tensor:
    """The explained scalar per item: the logit of token ``targets[b]`` at the last position
    (decoders), or image ``b``'s similarity with text ``b`` (dual encoders, ``None``)."""
    out = vlm.forward(inputs)
    if vlm.contrastive:
        return torch.diagonal(out.logits_per_image).float()
    logits = out.logits if hasattr(out, "logits") else out[0]
    index = torch.tensor([int(t or 0) for t in targets], device=logits.device)
    return logits[:, -1].float().gather(1, index.view(-1, 1))[:, 0]


def image_gradients(
    vlm: VLM, items: Sequence[Any], site: str, targets: Sequence[int | None], batch_size: int
) -> np.ndarray:
    """``(items, width)``: the gradient of each item's target with respect to a shift added to
    every image token at ``site``; its dot product with ``v`` is the derivative along ``v``."""
    out = []
    for first, chunk in batches(items, batch_size):
        inputs = vlm.prepare([it.image for it in chunk], [it.prompt for it in chunk])
        shift: list[torch.Tensor] = []

        def add(
            value: torch.Tensor, inputs: Inputs = inputs, shift: list[torch.Tensor] = shift
        ) -> torch.Tensor:
            delta = value.new_zeros(value.shape[0], value.shape[-1]).requires_grad_()
            shift.append(delta)
            mask = image_token_mask(vlm, inputs, site, value)
            return value + mask[..., None] * delta[:, None, :]

        with torch.enable_grad(), patch(vlm, {site: add}):
            scores = target_scores(vlm, inputs, targets[first : first + len(chunk)])
            (grad,) = torch.autograd.grad(scores.sum(), shift[-1])
        out.append(grad.float().cpu().numpy())
    return np.concatenate(out)


@dataclass(frozen=True, eq=False)
class TCAVResult(Result):
    """TCAV scores of a concept against random sets, and of random-vs-random CAVs.

    Attributes:
        concept: the concept (a world label, e.g. ``"red"``).
        site: the layer, e.g. ``"lm.layer[2]"``.
        target: the target word or text (``""``: each item's own answer or prompt).
        scores: ``(runs,)`` TCAV scores of the concept's CAVs.
        random_scores: ``(runs,)`` TCAV scores of random-vs-random CAVs.
        t: the t statistic of scores vs random scores (Student's, two-sided).
        p: its p-value.
        alpha: the significance level.
        inputs: how many inputs were scored.
        examples: concept (and random) examples per CAV.
    """

    concept: str
    site: str
    target: str
    scores: np.ndarray
    random_scores: np.ndarray
    t: float
    p: float
    alpha: float
    inputs: int
    examples: int

    @property
    def significant(self) -> bool:
        return bool(np.isfinite(self.p) and self.p < self.alpha)

    @property
    def score(self) -> float:
        """Mean TCAV score over runs."""
        return float(np.mean(self.scores))

    def to_dict(self) -> dict[str, Any]:
        own = {f.name: getattr(self, f.name) for f in fields(self)}
        own["t"] = self.t if np.isfinite(self.t) else None  # two constant groups: t is infinite
        extra = {"score": self.score, "significant": self.significant}
        return jsonable({"study": "tcav", **own, **extra})

    def plot(self, ax: Any = None) -> Any:
        """Mean TCAV score (bars, sd as error) of the concept and of random CAVs, runs as dots."""
        fig, ax = new_figure(4.0, 3.5, ax)
        for x, values, color in ((0, self.scores, "C0"), (1, self.random_scores, "C7")):
            ax.bar(x, np.mean(values), yerr=np.std(values), color=color, alpha=0.6, capsize=4)
            ax.scatter(np.full(len(values), x), values, color="k", s=8, zorder=3)
        ax.set_xticks([0, 1], [self.concept, "random"])
        ax.set_ylim(0, 1)
        ax.axhline(0.5, color="k", linewidth=0.5, linestyle=":")
        mark = "significant" if self.significant else "not significant"
        ax.set_title(f"TCAV at {self.site}: p={self.p:.3g} ({mark})", fontsize=9)
        ax.set_ylabel("TCAV score")
        return fig


@register(
    "tcav", kind=KIND, family="embedding/concept", paper="Kim et al. 2018", level="model/embedding"
)
class TCAV(Study):
    """Concept activation vectors and TCAV scores with a significance test (Kim et al. 2018).

    Args:
        concept: a world concept an image holds (a colour, shape, ``"red circle"``, size or
            background style).
        layer: index into the stack.
        stack: ``"lm.layer"`` or ``"vision.layer"``; ``""``: the language model's (a dual
            encoder's vision tower).
        target: decoders: the answer word whose logit at the last position is explained, and
            only items with this answer are scored; dual encoders: the caption, and only
            items with this prompt are scored. ``""``: every item, with its own answer/prompt.
        runs: CAVs against different random sets (and random-vs-random CAVs).
        examples: concept and random examples per CAV (fewer where the world has fewer).
        c: inverse L2 strength of the CAV's classifier.
        alpha: significance level of the two-sided t-test.
        seed: draws the example sets.
        batch_size: items per forward.
    """

    def __init__(
        self,
        concept: str = "red",
        layer: int = -2,
        stack: str = "",
        target: str = "",
        runs: int = 10,
        examples: int = 20,
        c: float = 1.0,
        alpha: float = 0.05,
        seed: int = 0,
        batch_size: int = 8,
    ) -> None:
        if not isinstance(concept, str) or not concept.strip():
            raise InputError("concept must be a world concept such as 'red'")
        if stack and stack not in ("lm.layer", "vision.layer"):
            raise InputError(f"stack must be 'lm.layer' or 'vision.layer', not {stack!r}")
        self.concept, self.stack, self.target = concept.strip(), stack, str(target).strip()
        self.layer = integer("layer", layer)
        self.runs = integer("runs", runs, minimum=2)
        self.examples = integer("examples", examples, minimum=2)
        self.c, self.alpha = number("c", c), number("alpha", alpha)
        if self.c <= 0 or not 0 < self.alpha < 1:
            raise InputError("c must be positive and alpha in (0, 1)")
        self.seed = valid_seed(seed)
        self.batch_size = positive_int("batch_size", batch_size)

    def _targets(self, vlm: VLM, items: Sequence[BenchItem]) -> tuple[list[Any], list[Any]]:
        if vlm.contrastive:
            chosen = [it for it in items if not self.target or it.prompt == self.target]
            return chosen, [None] * len(chosen)
        chosen = [it for it in items if not self.target or it.answer == self.target]
        words = [self.target or (it.answer.split() or [""])[0] for it in chosen]
        if any(not w for w in words):
            raise InputError("items without an answer need a target word")
        return chosen, [token_id(vlm, w) for w in words]

    def __call__(self, vlm: VLM, items: Sequence[BenchItem]) -> TCAVResult:
        holds = np.array([self.concept in image_concepts(s) for s in item_scenes(items)])
        k = min(self.examples, int(holds.sum()), int((~holds).sum()) // 2)
        if k < 2:
            raise InputError(
                f"{self.concept!r}: {int(holds.sum())} items hold it and {int((~holds).sum())} "
                "do not; TCAV needs at least 2 and 4"
            )
        inputs, targets = self._targets(vlm, items)
        if not inputs:
            raise InputError(f"no item has the target {self.target!r}")
        stack = self.stack or default_stack(vlm)
        n = vlm.num_layers(stack)
        if not -n <= self.layer < n:
            raise InputError(f"layer {self.layer} is outside {stack}'s {n} layers")
        where = site(stack, self.layer % n)
        acts = collect(vlm, items, where, IMAGE_GROUPS, self.batch_size)[where]
        pooled = np.stack([acts.values[acts.item == i].mean(0) for i in range(len(items))])
        grads = image_gradients(vlm, inputs, where, targets, self.batch_size)
        if not np.any(grads):
            warnings.warn(f"the target does not depend on the image at {where}", stacklevel=2)
        scores, random_scores = tcav_runs(pooled, holds, grads, self.runs, k, self.c, self.seed)
        t, p = significance(scores, random_scores)
        found = (self.concept, where, self.target, scores, random_scores, t, p, self.alpha)
        return TCAVResult(*found, len(inputs), k)
