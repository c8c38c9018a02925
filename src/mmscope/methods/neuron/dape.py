"""Domain-specific neurons by DAPE, domain activation probability entropy (MMNeuron, Huo et
al. 2024, after LAPE of Tang et al. 2024).

A neuron is active on a token when its MLP activation is > 0. ``p[d, u]`` is the share of the
tokens of domain ``d`` on which neuron ``u`` is active (from the streaming ``neuron_stats``
engine); normalised over the domains it is a distribution whose entropy is the neuron's DAPE.
Neurons whose largest ``p`` exceeds the ``percentile``-th percentile of all ``p[d, u]`` are
candidates; the ``top_share`` of all neurons with the lowest DAPE among them are kept, each
labelled with every domain whose ``p`` exceeds that percentile (several joined by ``"+"``).
Deactivating them means zeroing their activation (``neuron_edit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mmscope.core.errors import InputError
from mmscope.core.registry import register
from mmscope.core.validate import number, positive_int, valid_seed
from mmscope.methods.activations import GROUPS
from mmscope.methods.analysis import Result
from mmscope.methods.neuron.base import NeuronSet
from mmscope.methods.neuron.stats import NeuronStatsStudy, check_sites
from mmscope.methods.study import KIND, Study
from mmscope.models.base import parse_site
from mmscope.world import STYLES, WorldConfig, make_samples
from mmscope.world.items import BenchItem, question_item
from mmscope.world.seeds import BENCH_SEED

if TYPE_CHECKING:
    from mmscope.models.base import VLM


@dataclass(frozen=True, eq=False)
class FoundNeurons(Result):
    """A neuron-finding study's result: the ``NeuronSet`` plus a per-neuron table.

    ``to_dict`` is the neuron set's (so ``load_neuron_set`` reads a saved result) with the
    study's summary added; ``tables()`` gives the per-neuron scores of every neuron read.

    Attributes:
        neurons: the neurons found.
        table: per neuron read (selected or not), equal-length columns.
        info: JSON-able summary (thresholds, domains, counts).
    """

    neurons: NeuronSet
    table: dict[str, np.ndarray] = field(repr=False)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {**self.neurons.to_dict(), **self.info}

    def plot(self, ax: Any = None) -> Any:
        return self.neurons.plot(ax)

    def tables(self) -> dict[str, dict[str, np.ndarray]]:
        return {self.neurons.method: self.table}


def domain_items(n: int, seed: int = BENCH_SEED, styles: Sequence[str] = STYLES) -> list[BenchItem]:
    """``n`` world items, the background styles in turn (an item's domain is its
    ``scene.style``).

    Every style draws its scenes from the same seed, so the domains share their objects and
    questions and differ only in the background.
    """
    styles = tuple(styles)
    if not styles or any(s not in STYLES for s in styles):
        raise InputError(f"styles must be among {STYLES}, not {styles!r}")
    count = positive_int("n", n)
    per = -(-count // len(styles))
    samples = {
        s: make_samples(per, valid_seed(seed), config=WorldConfig(styles=(s,))) for s in styles
    }
    items = []
    for i in range(count):
        style = styles[i % len(styles)]
        j = i // len(styles)
        sample = samples[style][j]
        items.append(question_item(sample, sample.questions[j % len(sample.questions)]))
    return items


def dape_select(
    p: np.ndarray, percentile: float = 95.0, top_share: float = 0.01
) -> tuple[np.ndarray, float, np.ndarray, list[list[int]]]:
    """DAPE over ``p`` ``(domains, neurons)``: returns ``(dape, threshold, kept, domains)``
    with ``dape`` per neuron (NaN where never active), the percentile ``threshold``, the kept
    neurons (lowest DAPE first) and each kept neuron's domains (``p > threshold``)."""
    p = np.asarray(p, dtype=np.float64)
    total = p.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = p / total
        dape = -np.where(q > 0, q * np.log(q), 0.0).sum(axis=0)
    dape[total == 0] = np.nan
    threshold = float(np.percentile(p, percentile))
    candidate = (p.max(axis=0) > threshold) & np.isfinite(dape)
    keep = max(1, int(top_share * p.shape[1]))
    order = np.argsort(np.where(candidate, dape, np.inf), kind="stable")[:keep]
    kept = order[candidate[order]]
    return dape, threshold, kept, [np.flatnonzero(p[:, u] > threshold).tolist() for u in kept]


@register("dape", kind=KIND, family="neuron/domain", paper="Huo et al. 2024", level="model/neuron")
class Dape(Study):
    """Domain-specific neurons: low entropy of the activation probability over domains.

    Args:
        percentile: percentile of all ``p[d, u]`` a neuron's largest must exceed (95).
        top_share: share of all neurons kept, the lowest DAPE first (0.01).
        sites: MLP activation sites (default: every ``lm.layer[i].mlp.act``; CLIP: vision).
        groups: token groups counted as a domain's tokens (default: all).
        batch_size: items per forward.
        progress: show a progress bar.
    """

    def __init__(
        self,
        percentile: float = 95.0,
        top_share: float = 0.01,
        sites: tuple[str, ...] = (),
        groups: tuple[str, ...] = GROUPS,
        batch_size: int = 16,
        progress: bool = True,
    ) -> None:
        self.percentile = number("percentile", percentile)
        if not 0 <= self.percentile < 100:
            raise InputError(f"percentile must lie in [0, 100), not {percentile!r}")
        self.top_share = number("top_share", top_share)
        if not 0 < self.top_share <= 1:
            raise InputError(f"top_share must lie in (0, 1], not {top_share!r}")
        self.sites = check_sites(sites)
        self.stats = NeuronStatsStudy(
            sites=self.sites, groups=groups, top_k=0, batch_size=batch_size, progress=progress
        )

    def __call__(
        self,
        vlm: VLM,
        items: Sequence[BenchItem],
        domains: Sequence[str] | None = None,
        checkpoint: str | Path | None = None,
    ) -> FoundNeurons:
        """Args:
        domains: a label per item; default: each world item's background style
            (``domain_items`` gives items in every style), else each item's question type.
        checkpoint: resume the statistics from / save them to this file.
        """
        labels = [str(d) for d in domains] if domains is not None else _default_domains(items)
        names = sorted(set(labels))
        if len(names) < 2:
            raise InputError(f"DAPE needs items of at least two domains, got {names}")
        stats = self.stats(vlm, items, domains=labels, checkpoint=checkpoint)
        base = self.stats.groups
        per_site, rows = [], []
        for site in stats.sites:
            p = []
            for d in names:
                idx = [stats.group(f"{g}@{d}") for g in base]
                count = stats.count[site][idx].sum()
                p.append(stats.active[site][idx].sum(axis=0) / max(count, 1))
            per_site.append(np.stack(p))
            rows += [(site, u) for u in range(per_site[-1].shape[1])]
        p_all = np.concatenate(per_site, axis=1)
        dape, threshold, kept, doms = dape_select(p_all, self.percentile, self.top_share)
        label = ["+".join(names[i] for i in ds) for ds in doms]
        settings = {
            "percentile": self.percentile,
            "top_share": self.top_share,
            **stats.settings,
        }
        neurons = NeuronSet(
            "dape",
            tuple(rows[u] for u in kept),
            tuple(label),
            tuple(float(np.log(len(names)) - dape[u]) for u in kept),
            settings,
        )
        selected = np.full(len(rows), "", dtype=object)
        selected[kept] = label
        table: dict[str, Any] = {
            "site": np.array([s for s, _ in rows], dtype=object),
            "layer": np.array([parse_site(s)[1] or 0 for s, _ in rows]),
            "neuron": np.array([u for _, u in rows]),
            "dape": dape,
            "selected": np.isin(np.arange(len(rows)), kept),
            "label": selected,
            **{f"p_{d}": p_all[i] for i, d in enumerate(names)},
        }
        tokens = {
            d: int(sum(stats.count[stats.sites[0]][stats.group(f"{g}@{d}")] for g in base))
            for d in names
        }
        info = {
            "domains": names,
            "threshold": threshold,
            "tokens_per_domain": tokens,
            "items": len(items),
        }
        return FoundNeurons(neurons, table, info)


def _default_domains(items: Sequence[BenchItem]) -> list[str]:
    if all(it.scene is not None for it in items):
        return [it.scene.style for it in items if it.scene is not None]
    return [it.kind for it in items]
