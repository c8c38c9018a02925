"""Visual-token ablation (Neo et al. 2024, "Towards interpreting visual information processing
in VLMs"): replace chosen image tokens, after the projector, by the mean image token (or zero)
and count the correct answers that turn wrong.

Token sets: the evidence object's patches grown by a buffer, the same number of random
patches, high-norm "register" tokens, and the top patches of an attribution method.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmscope.core.errors import InputError
from mmscope.core.hooks import capture, patch
from mmscope.core.inputs import Inputs
from mmscope.core.registry import register
from mmscope.core.targets import Predicted, Target, Token, TokenId
from mmscope.core.validate import integer, valid_seed
from mmscope.methods.analysis import (
    KIND,
    Analysis,
    Result,
    bind,
    jsonable,
    new_figure,
    next_token_ids,
)
from mmscope.methods.token import sets as token_sets
from mmscope.models.base import VLM

SETS = ("object", "random", "high_norm", "attributed")


@dataclass(frozen=True)
class AblationResult(Result):
    """Per token set and item: how many tokens were replaced and what the target became.

    Attributes:
        sets: the token sets, in order.
        counts: ``(sets, items)`` tokens replaced (0: the set is empty for that item).
        clean: ``(items,)`` the target's score without ablation.
        ablated: ``(sets, items)`` the score with the set replaced.
        correct: ``(items,)`` whether the model's answer was the target before (decoders).
        correct_after: ``(sets, items)`` and after.
        fill: ``"mean"`` or ``"zero"``.
    """

    sets: tuple[str, ...]
    counts: np.ndarray
    clean: np.ndarray
    ablated: np.ndarray
    correct: np.ndarray | None
    correct_after: np.ndarray | None
    fill: str

    def flip_rate(self, name: str) -> float:
        """Share of the correct answers (with a non-empty set) that turn wrong."""
        if self.correct is None or self.correct_after is None:
            return float("nan")
        s = self.sets.index(name)
        chosen = self.correct & (self.counts[s] > 0)
        return float(np.mean(~self.correct_after[s][chosen])) if chosen.any() else float("nan")

    def drop(self, name: str) -> float:
        """Mean fall of the target's score over items with a non-empty set."""
        s = self.sets.index(name)
        chosen = self.counts[s] > 0
        return (
            float(np.mean(self.clean[chosen] - self.ablated[s][chosen]))
            if chosen.any()
            else float("nan")
        )

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "analysis": "token_ablation",
                "fill": self.fill,
                "sets": {
                    name: {
                        "flip_rate": self.flip_rate(name),
                        "score_drop": self.drop(name),
                        "mean_tokens": float(self.counts[s].mean()),
                        "items": int((self.counts[s] > 0).sum()),
                    }
                    for s, name in enumerate(self.sets)
                },
            }
        )

    def plot(self, ax: Any = None) -> Any:
        """Share of correct answers flipped per token set (score drop for dual encoders)."""
        fig, ax = new_figure(4.5, 3, ax)
        flips = self.correct is not None
        values = [self.flip_rate(n) if flips else self.drop(n) for n in self.sets]
        ax.bar(range(len(self.sets)), values, color="#4c72b0")
        ax.set_xticks(range(len(self.sets)), list(self.sets), fontsize=8)
        ax.set_ylabel("correct answers flipped" if flips else "score drop", fontsize=8)
        ax.set_title(f"visual-token ablation ({self.fill} fill)", fontsize=9)
        return fig


def first_image_rows(inputs: Inputs) -> list[int]:
    """Per item, the row of its first image's first token in ``vlm.image_tokens`` (items in
    order, each item's images in order)."""
    rows, at = [], 0
    for item in inputs.image_spans:
        rows.append(at)
        at += sum(span.size for span in item)
    return rows


def _answers(vlm: VLM, inputs: Inputs, target: Target | None, output: Any) -> np.ndarray | None:
    """Per item, the token a next-token target names (None for other targets and encoders)."""
    if vlm.contrastive:
        return None
    if target is None or isinstance(target, Predicted):
        return output.logits[:, -1].argmax(-1).cpu().numpy()  # type: ignore[no-any-return]
    if isinstance(target, (Token, TokenId)):
        return np.asarray(next_token_ids(vlm, inputs, target))
    return None


def mean_image_token(vlm: VLM, batches: Sequence[Inputs]) -> torch.Tensor:
    """The dataset-mean image token (after the projector) over batches of inputs."""
    total, count = None, 0
    for inputs in batches:
        with torch.no_grad(), capture(vlm, vlm.IMAGE_TOKENS_SITE) as cap:
            vlm.forward(inputs)
        tokens = vlm.image_tokens(cap[vlm.IMAGE_TOKENS_SITE], inputs).float()
        total = tokens.sum(0) if total is None else total + tokens.sum(0)
        count += tokens.shape[0]
    if total is None:
        raise InputError("no batches to average")
    return total / count


@register(
    "token_ablation",
    kind=KIND,
    family="inside/ablation",
    paper="Neo et al. 2024",
    level="model/token",
)
class TokenAblation(Analysis):
    """Replace sets of image tokens and measure what the answer loses.

    Args:
        sets: token sets from ``"object"`` (needs evidence masks), ``"random"`` (as many as
            the object set, else a tenth of the grid), ``"high_norm"``, ``"attributed"``.
        buffer: patches grown around the object (0-2 in the paper).
        fill: ``"mean"`` (the mean image token) or ``"zero"``.
        attribution: the method ranking patches for the ``"attributed"`` set.
        seed: seed of the random set.
    """

    def __init__(
        self,
        sets: Sequence[str] = ("object", "random", "high_norm"),
        buffer: int = 1,
        fill: str = "mean",
        attribution: str = "integrated_gradients",
        seed: int = 0,
    ) -> None:
        unknown = set(sets) - set(SETS)
        if unknown or not sets:
            raise InputError(f"token sets are some of {', '.join(SETS)}, not {sorted(unknown)}")
        if fill not in ("mean", "zero"):
            raise InputError(f"fill is 'mean' or 'zero', not {fill!r}")
        self.sets = tuple(sets)
        self.buffer = integer("buffer", buffer, minimum=0)
        self.fill = fill
        self.attribution = attribution
        self.seed = valid_seed(seed)

    def __call__(
        self,
        vlm: VLM,
        inputs: Inputs,
        target: Target | None = None,
        masks: Sequence[np.ndarray | None] | None = None,
        mean: torch.Tensor | None = None,
    ) -> AblationResult:
        """``masks``: one pixel evidence mask per item (or None) for the object set; ``mean``:
        a dataset-mean image token (default: the mean over these inputs' image tokens)."""
        if masks is not None and len(masks) != inputs.batch_size:
            raise InputError(f"{len(masks)} masks for a batch of {inputs.batch_size}")
        bound = bind(vlm, inputs, target)
        site = vlm.IMAGE_TOKENS_SITE
        with torch.no_grad(), capture(vlm, site) as cap:
            output = vlm.forward(bound.inputs)
        tokens = vlm.image_tokens(cap[site], bound.inputs)
        clean = bound(output)[:, 0].float().cpu().numpy()
        fill = None
        if self.fill == "mean":
            fill = mean if mean is not None else tokens.float().mean(0)
        answers = _answers(vlm, inputs, target, output)
        cells = self._cells(vlm, inputs, target, answers, tokens, masks)
        first = first_image_rows(inputs)
        counts = np.zeros((len(self.sets), inputs.batch_size), dtype=int)
        ablated = np.zeros((len(self.sets), inputs.batch_size))
        after = np.zeros((len(self.sets), inputs.batch_size), dtype=bool)
        for s, name in enumerate(self.sets):
            rows = [first[b] + np.flatnonzero(c) for b, c in enumerate(cells[name])]
            counts[s] = [len(r) for r in rows]
            index = torch.as_tensor(np.concatenate(rows), dtype=torch.long)

            def replace(value: torch.Tensor, index: torch.Tensor = index) -> torch.Tensor:
                flat = vlm.image_tokens(value, bound.inputs).clone()
                flat[index.to(flat.device)] = 0.0 if fill is None else fill.to(flat)
                return vlm.with_image_tokens(value, flat, bound.inputs)

            with torch.no_grad(), patch(vlm, {site: replace}):
                out = vlm.forward(bound.inputs)
            ablated[s] = bound(out)[:, 0].float().cpu().numpy()
            if answers is not None:
                after[s] = out.logits[:, -1].argmax(-1).cpu().numpy() == answers
        correct = None
        if answers is not None:
            correct = output.logits[:, -1].argmax(-1).cpu().numpy() == answers
        return AblationResult(
            sets=self.sets,
            counts=counts,
            clean=clean,
            ablated=ablated,
            correct=correct,
            correct_after=after if correct is not None else None,
            fill=self.fill,
        )

    def _cells(
        self,
        vlm: VLM,
        inputs: Inputs,
        target: Target | None,
        answers: np.ndarray | None,
        tokens: torch.Tensor,
        masks: Sequence[np.ndarray | None] | None,
    ) -> dict[str, list[np.ndarray]]:
        """Per set, per item, the chosen cells of the item's first image."""
        spans = [item[0] for item in inputs.image_spans]
        if len(spans) != inputs.batch_size:
            raise InputError("visual-token ablation needs one image per item")
        grids = [(int(s.grid[0]), int(s.grid[1])) for s in spans]
        empty = [np.zeros(g, dtype=bool) for g in grids]
        out: dict[str, list[np.ndarray]] = {}
        objects = empty
        if masks is not None:
            objects = [
                token_sets.object_cells(m, s, self.buffer) if m is not None else e
                for m, s, e in zip(masks, spans, empty)
            ]
        if "object" in self.sets:
            if masks is None:
                raise InputError("the object set needs evidence masks (masks=...)")
            out["object"] = objects
        sizes = [int(o.sum()) or max(1, g[0] * g[1] // 10) for o, g in zip(objects, grids)]
        if "random" in self.sets:
            out["random"] = [
                token_sets.random_cells(k, g, np.random.default_rng([self.seed, b]))
                for b, (k, g) in enumerate(zip(sizes, grids))
            ]
        if "high_norm" in self.sets:
            out["high_norm"] = [
                token_sets.high_norm_cells(tokens[r : r + g[0] * g[1]], g)
                for r, g in zip(first_image_rows(inputs), grids)
            ]
        if "attributed" in self.sets:
            from mmscope.methods.explain import explain

            frozen = target if answers is None else TokenId([int(a) for a in answers])
            exp = explain(vlm, inputs, frozen, method=self.attribution)
            out["attributed"] = [
                token_sets.top_cells(exp.image_scores[b][0][0], k) for b, k in enumerate(sizes)
            ]
        return out
