"""Sanity check by cascading model-parameter randomisation (Adebayo et al. 2018, "Sanity Checks
for Saliency Maps").

The model's modules are re-initialised from the output down to the input, cumulatively, and the
method is run again after each stage; the Spearman rank correlation of the absolute maps with
the original ones should fall. A method whose maps stay put does not explain the model. Every
parameter touched is saved first and put back afterwards, also when the method raises.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import numpy as np
import torch

from mmscope.core.errors import InputError
from mmscope.core.explanation import Explanation
from mmscope.core.registry import register
from mmscope.core.sites import site
from mmscope.core.validate import positive_int, valid_seed
from mmscope.metrics.base import LEVEL, Case, Metric

if TYPE_CHECKING:
    from mmscope.models.base import VLM


def cascade_sites(vlm: VLM) -> list[str]:
    """The adapter's sites from the output down to the input (the order of randomisation):
    decoders ``lm_head``, ``lm.layer[n-1] .. [0]``, ``projector``; contrastive encoders
    ``vision.proj`` or their pooling ``vision.head`` (SigLIP); then ``vision.layer[m-1] .. [0]``
    (only the roles the adapter has)."""
    sites: list[str] = []
    heads = ("vision.proj", "vision.head") if vlm.contrastive else ("lm_head",)
    sites += [r for r in heads if r in vlm.ROLES]
    if not vlm.contrastive:
        if "lm.layer" in vlm.LAYER_LISTS:
            sites += [site("lm.layer", i) for i in reversed(range(vlm.num_layers("lm.layer")))]
        if "projector" in vlm.ROLES:
            sites.append("projector")
    if "vision.layer" in vlm.LAYER_LISTS:
        sites += [site("vision.layer", i) for i in reversed(range(vlm.num_layers("vision.layer")))]
    return sites


def stage_ends(n: int, stages: int) -> list[int]:
    """How many cascade sites are randomised at the end of each of ``stages`` evenly spaced
    stages (the last one: all ``n``)."""
    return [int(round(n * (s + 1) / stages)) for s in range(stages)]


def _maps(explanation: Explanation) -> list[np.ndarray | None]:
    """Per item the absolute map of image 0, output 0, flattened (None without an image)."""
    return [
        np.abs(np.asarray(item[0][0], dtype=np.float64)).ravel() if item else None
        for item in explanation.image_scores
    ]


def rank_correlation(a: np.ndarray | None, b: np.ndarray | None) -> float:
    """Spearman's rank correlation of two maps; NaN when one is missing or constant."""
    from scipy.stats import spearmanr

    if a is None or b is None or a.shape != b.shape or a.size < 2:
        return float("nan")
    if not (np.isfinite(a).all() and np.isfinite(b).all()) or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(spearmanr(a, b).statistic)


def _randomise(
    module: torch.nn.Module,
    saved: dict[int, tuple[torch.nn.Parameter, torch.Tensor]],
    generator: torch.Generator,
) -> None:
    """Draw every parameter of ``module`` with dim >= 2 from N(0, its own std), saving a clone
    of it first; 1-D parameters (biases, norms) are left as they are."""
    for p in module.parameters():
        if p.dim() < 2 or id(p) in saved:
            continue
        saved[id(p)] = (p, p.detach().clone())
        std = float(p.detach().float().std()) if p.numel() > 1 else 0.0
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
        p.copy_((noise * (std if np.isfinite(std) else 0.0)).to(p))


def cascade_correlations(case: Case, stages: int = 3, seed: int = 0) -> np.ndarray:
    """``(stages, batch)`` rank correlations of the re-run method's maps with the original
    ones after each cumulative stage of the cascade (last row: everything randomised).

    The model comes out exactly as it went in, also when the method raises.
    """
    if case.method is None:
        raise InputError("randomisation re-runs the method; give the Case its method")
    stages = positive_int("stages", stages)
    vlm = case.vlm
    modules = [vlm.resolve(site) for site in cascade_sites(vlm)]
    if not modules:
        raise InputError(f"{vlm.name} has no modules to randomise")
    original = _maps(case.explanation)
    out = np.full((stages, len(original)), np.nan)
    generator = torch.Generator().manual_seed(valid_seed(seed))
    saved: dict[int, tuple[torch.nn.Parameter, torch.Tensor]] = {}
    done = 0
    try:
        for s, end in enumerate(stage_ends(len(modules), stages)):
            with torch.no_grad():
                for module in modules[done:end]:
                    _randomise(module, saved, generator)
            done = max(done, end)
            again = _maps(case.method(vlm, case.inputs, case.target))
            out[s] = [rank_correlation(a, b) for a, b in zip(original, again)]
    finally:
        with torch.no_grad():
            for p, value in saved.values():
                p.copy_(value)
    return out


@register(
    "randomisation",
    kind="metric",
    family="metric/randomisation",
    paper="Adebayo et al. 2018",
    level=LEVEL,
)
class Randomisation(Metric):
    """Rank correlation of the maps with the original once the whole cascade is randomised
    (Adebayo et al. 2018); lower is better (the map depends on the model)."""

    category = "randomisation"
    higher_is_better = False

    def __init__(self, stages: int = 3, seed: int = 0) -> None:
        self.stages = positive_int("stages", stages)
        self.seed = valid_seed(seed)

    def __call__(self, case: Case) -> np.ndarray:
        return cascade_correlations(case, self.stages, self.seed)[-1]
