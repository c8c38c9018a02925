"""Surrogate attributions: fit a linear model to the target on random feature subsets.

LIME (Ribeiro et al. 2016) and KernelSHAP (Lundberg & Lee 2017), run by captum's ``Lime`` and
``KernelShap`` on the interpretable features of one batch item: all cells of the item's images,
then its prompt tokens (``Features.of_item``). captum draws binary keep vectors over them; the
forward function turns each into a keep mask of the whole batch (the other items' features
kept) and scores it with ``masked_forwards``. captum explains one scalar per sample, so each
explained output is a captum call with the same seed: they draw the same samples and the
forward function answers the repeats from a cache, so the model runs once per sample for all
outputs. captum's draws do not depend on the scores, so a first pass per item only records
them; the recorded subsets of every item then run together (items never share features: one
masked copy of the batch carries a subset of each item's), and the real captum pass reads
them from the cache: ``samples`` masked copies of the batch in all, not ``samples`` per item.

captum fits its surrogate with scikit-learn (LIME: ``Lasso(alpha)``; KernelSHAP:
``LinearRegression``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from mmscope.core.errors import InputError, MMScopeError
from mmscope.core.registry import register
from mmscope.core.targets import BoundTarget
from mmscope.core.validate import number, positive_int, valid_seed
from mmscope.methods.attribution.base import Maps
from mmscope.methods.attribution.perturbation import (
    FAMILY,
    LEVEL,
    Features,
    Perturbation,
    masked_forwards,
)

if TYPE_CHECKING:
    from mmscope.models.base import VLM


def _captum() -> Any:
    try:
        import captum.attr
    except ImportError:
        raise MMScopeError("lime and kernel_shap need captum and scikit-learn") from None
    return captum.attr


def item_forward(
    vlm: VLM, bound: BoundTarget, item: int, batch_size: int = 16, fill: float = 0.0
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Item ``item``'s forward function for captum: ``(n, its features)`` keep masks ->
    ``(n, k)`` its scores, every other feature of the batch kept."""
    features = Features.of(vlm, bound.inputs)
    index = features.of_item(item)

    def forward(keep: torch.Tensor) -> torch.Tensor:
        masks = torch.ones(len(keep), features.size)
        masks[:, index] = keep.detach().float().cpu()
        return masked_forwards(vlm, bound, masks, batch_size, fill)[:, item]

    return forward


class _Cached:
    """A forward function that runs each distinct binary mask once."""

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.forward, self.memo = forward, {}  # type: ignore[var-annotated]

    def __call__(self, keep: torch.Tensor) -> torch.Tensor:
        keys = [bytes(row) for row in keep.detach().cpu().bool().numpy()]
        new = {k: i for i, k in enumerate(keys) if k not in self.memo}
        if new:
            got = self.forward(keep[list(new.values())])
            self.memo.update(zip(new, got))
        return torch.stack([self.memo[k] for k in keys])


class Surrogate(Perturbation):
    """Shared pipeline: one captum explainer per item and output (see the module docstring)."""

    def __init__(
        self, samples: int = 200, seed: int = 0, batch_size: int = 16, fill: float = 0.0
    ) -> None:
        super().__init__(batch_size, fill)
        self.samples = positive_int("samples", samples)
        self.seed = valid_seed(seed)

    def explainer(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        raise NotImplementedError

    def _captum_pass(
        self, forward: Callable[[torch.Tensor], torch.Tensor], n: int, output: int
    ) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self.explainer(forward).attribute(  # type: ignore[no-any-return]
                torch.ones(1, n),
                target=output,
                n_samples=self.samples,
                perturbations_per_eval=self.batch_size,
            )

    def _run_together(
        self, vlm: VLM, bound: BoundTarget, features: Features, forwards: list[_Cached]
    ) -> None:
        """Record every item's captum subsets, run them in one pass, fill the caches."""
        recorded = []
        for b in range(len(forwards)):
            seen: list[torch.Tensor] = []

            def record(keep: torch.Tensor, seen: list[torch.Tensor] = seen) -> torch.Tensor:
                seen.append(keep.detach().float().cpu())
                return torch.zeros(len(keep), bound.k)

            index = features.of_item(b)
            if len(index):
                self._captum_pass(record, len(index), 0)
            rows = torch.cat(seen) if seen else torch.zeros(0, len(index))
            recorded.append(torch.unique(rows, dim=0))
        masks = torch.ones(max(len(r) for r in recorded), features.size)
        for b, rows in enumerate(recorded):
            masks[: len(rows), features.of_item(b)] = rows
        got = masked_forwards(vlm, bound, masks, self.batch_size, self.fill)
        for b, (rows, forward) in enumerate(zip(recorded, forwards)):
            keys = [bytes(row) for row in rows.bool().numpy()]
            forward.memo.update(zip(keys, got[: len(rows), b]))

    def attribute(self, vlm: VLM, bound: BoundTarget) -> Maps:
        features = Features.of(vlm, bound.inputs)
        batch = bound.inputs.batch_size
        per_item = torch.zeros(batch, bound.k, features.size)
        forwards = [
            _Cached(item_forward(vlm, bound, b, self.batch_size, self.fill)) for b in range(batch)
        ]
        self._run_together(vlm, bound, features, forwards)
        for b, forward in enumerate(forwards):
            index = features.of_item(b)
            if not len(index):
                continue
            for j in range(len(bound.labels[b])):  # an item's outputs (shorter answers: fewer)
                attr = self._captum_pass(forward, len(index), j)
                per_item[b, j, index] = attr.flatten().float()
        maps = features.maps(features.combine(per_item))
        maps.extras.update(self.extras(vlm, bound, features, per_item))
        return maps

    def extras(
        self, vlm: VLM, bound: BoundTarget, features: Features, per_item: torch.Tensor
    ) -> dict[str, Any]:
        return {}


@register("lime", family=FAMILY, paper="Ribeiro et al. 2016", level=LEVEL)
class LIME(Surrogate):
    """LIME: a weighted Lasso (``alpha``, captum's default 0.01) fitted to the target on
    ``samples`` Bernoulli(0.5) feature subsets, weighted by exp(-d^2 / 2 ``kernel_width``^2)
    with d the cosine distance of the subset to all-kept (captum's defaults)."""

    def __init__(
        self,
        samples: int = 200,
        seed: int = 0,
        alpha: float = 0.01,
        kernel_width: float = 1.0,
        batch_size: int = 16,
        fill: float = 0.0,
    ) -> None:
        super().__init__(samples, seed, batch_size, fill)
        self.alpha = number("alpha", alpha)
        self.kernel_width = number("kernel_width", kernel_width)
        if self.alpha < 0 or self.kernel_width <= 0:
            raise InputError("LIME needs alpha >= 0 and kernel_width > 0")

    def explainer(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        attr = _captum()
        from captum._utils.models.linear_model import SkLearnLasso
        from captum.attr._core.lime import get_exp_kernel_similarity_function

        return attr.Lime(
            forward,
            interpretable_model=SkLearnLasso(alpha=self.alpha),
            similarity_func=get_exp_kernel_similarity_function("cosine", self.kernel_width),
        )


@register("kernel_shap", family=FAMILY, paper="Lundberg & Lee 2017", level=LEVEL)
class KernelSHAP(Surrogate):
    """KernelSHAP: Shapley values estimated by weighted linear regression on ``samples``
    subsets drawn from the Shapley kernel (captum's sampler; all-kept and all-removed come
    first with weight 1e6, which pins the sum of the attributions to f(x) - f(all removed)).

    ``extras``: per item and output ``delta`` = f(x) - f(all the item's features removed) and
    ``efficiency_gap`` = sum of the item's attributions - delta.
    """

    def explainer(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> Any:
        return _captum().KernelShap(forward)

    def extras(
        self, vlm: VLM, bound: BoundTarget, features: Features, per_item: torch.Tensor
    ) -> dict[str, Any]:
        masks = torch.stack([torch.ones(features.size), 1 - features.owners.amax(0)])
        got = masked_forwards(vlm, bound, masks, self.batch_size, self.fill)
        delta = got[0] - got[1]  # (batch, k)
        total = (per_item * features.owners[:, None, :]).sum(-1)
        return {"delta": delta.tolist(), "efficiency_gap": (total - delta).tolist()}
