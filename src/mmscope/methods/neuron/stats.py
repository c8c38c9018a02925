"""Per-neuron activation statistics over a dataset, streamed: how often each MLP neuron fires
(activation > 0, the MMNeuron / LAPE notion of "active", Huo et al. 2024; Tang et al. 2024), its
mean and max, and its top-k examples, per token group (image / text / last / class) and,
when the caller gives a domain per item, per group and domain.

Memory is O(sites x groups x width x k), independent of the number of items: each site's
output is reduced inside the forward (an identity ``patch`` that scatters the batch into the
accumulators on the model's device), so neither the dataset's nor even one batch's activations
of all sites are kept. A checkpoint (``.npz`` of arrays plus a JSON header; no pickle) lets a
long run resume; ``accumulate.py`` holds that part and the accumulators.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmscope.core.errors import InputError
from mmscope.core.hooks import patch
from mmscope.core.registry import register
from mmscope.core.sites import sites
from mmscope.core.validate import integer, positive_int
from mmscope.methods.activations import GROUPS, batches
from mmscope.methods.analysis import Result, new_figure
from mmscope.methods.neuron.accumulate import Accumulator, RowCache, load_checkpoint, meta_of
from mmscope.methods.study import KIND, Study
from mmscope.models.base import parse_site

if TYPE_CHECKING:
    from mmscope.models.base import VLM
    from mmscope.world.items import BenchItem


def default_sites(vlm: VLM) -> tuple[str, ...]:
    """Every MLP activation of the stack where image and text meet (CLIP: the vision tower)."""
    stack = "vision.layer" if vlm.contrastive else "lm.layer"
    return tuple(sites(stack, range(vlm.num_layers(stack)), "mlp.act"))


@dataclass(frozen=True, eq=False)
class NeuronStats(Result):
    """Activation statistics per site, token group and neuron.

    Attributes:
        sites: the sites read.
        groups: the groups: token groups first, then ``"{group}@{domain}"`` per domain.
        n_items: items seen.
        count: per site, ``(groups,)`` tokens seen per group.
        active: per site, ``(groups, width)`` tokens on which the neuron was > 0.
        total: per site, ``(groups, width)`` sum of activations.
        max: per site, ``(groups, width)`` largest activation (``-inf`` where no token).
        top_values: per site, ``(token groups, width, k)`` the k largest activations, descending.
        top_items: their items (-1: none).
        top_positions: their positions in the item's own sequence (without the padding of
            its batch).
        settings: the study's settings.
    """

    sites: tuple[str, ...]
    groups: tuple[str, ...]
    n_items: int
    count: dict[str, np.ndarray] = field(repr=False)
    active: dict[str, np.ndarray] = field(repr=False)
    total: dict[str, np.ndarray] = field(repr=False)
    max: dict[str, np.ndarray] = field(repr=False)
    top_values: dict[str, np.ndarray] = field(repr=False)
    top_items: dict[str, np.ndarray] = field(repr=False)
    top_positions: dict[str, np.ndarray] = field(repr=False)
    settings: dict[str, Any] = field(default_factory=dict)

    def group(self, name: str) -> int:
        if name not in self.groups:
            raise InputError(f"no group {name!r}; groups: {', '.join(self.groups)}")
        return self.groups.index(name)

    def p_active(self, site: str) -> np.ndarray:
        """``(groups, width)`` share of tokens on which each neuron is > 0 (NaN: no token)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.active[site] / self.count[site][:, None]

    def mean(self, site: str) -> np.ndarray:
        """``(groups, width)`` mean activation (NaN: no token)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return self.total[site] / self.count[site][:, None]

    def tables(self) -> dict[str, dict[str, Any]]:
        """``neurons``: one row per site, group (with tokens) and neuron; ``top``: the top-k
        examples, one row per site, group, neuron and rank."""
        cols: dict[str, list[np.ndarray]] = {
            k: [] for k in ("site", "layer", "neuron", "group", "count", "p_active", "mean", "max")
        }
        tops: dict[str, list[np.ndarray]] = {
            k: [] for k in ("site", "neuron", "group", "rank", "item", "position", "value")
        }
        for site in self.sites:
            layer = parse_site(site)[1]
            p, mean = self.p_active(site), self.mean(site)
            width = p.shape[1]
            for g, name in enumerate(self.groups):
                if self.count[site][g] == 0:
                    continue
                for key, value in (
                    ("site", np.full(width, site, dtype=object)),
                    ("layer", np.full(width, -1 if layer is None else layer)),
                    ("neuron", np.arange(width)),
                    ("group", np.full(width, name, dtype=object)),
                    ("count", np.full(width, self.count[site][g], dtype=np.int64)),
                    ("p_active", p[g]),
                    ("mean", mean[g]),
                    ("max", self.max[site][g]),
                ):
                    cols[key].append(value)
            values = self.top_values[site]
            for g in range(values.shape[0]):
                neuron, rank = np.nonzero(self.top_items[site][g] >= 0)
                for key, value in (
                    ("site", np.full(rank.size, site, dtype=object)),
                    ("neuron", neuron),
                    ("group", np.full(rank.size, self.groups[g], dtype=object)),
                    ("rank", rank),
                    ("item", self.top_items[site][g][neuron, rank]),
                    ("position", self.top_positions[site][g][neuron, rank]),
                    ("value", values[g][neuron, rank]),
                ):
                    tops[key].append(value)
        return {
            "neurons": {k: _cat(v) for k, v in cols.items()},
            "top": {k: _cat(v) for k, v in tops.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        """Per site and group: tokens, mean p_active, share of neurons never active (the
        per-neuron arrays are in ``tables()``)."""
        summary = []
        for site in self.sites:
            p = self.p_active(site)
            for g, name in enumerate(self.groups):
                if self.count[site][g]:
                    summary.append(
                        {
                            "site": site,
                            "group": name,
                            "tokens": int(self.count[site][g]),
                            "mean_p_active": float(np.mean(p[g])),
                            "dead_share": float(np.mean(self.active[site][g] == 0)),
                        }
                    )
        return {
            "method": "neuron_stats",
            "sites": list(self.sites),
            "groups": list(self.groups),
            "n_items": self.n_items,
            "summary": summary,
            "settings": self.settings,
        }

    def plot(self, ax: Any = None) -> Any:
        """Median p_active per site for each token group, with the 10-90% band of neurons."""
        fig, ax = new_figure(6, 3, ax)
        x = np.arange(len(self.sites))
        for g, name in enumerate(self.groups):
            if "@" in name or not all(self.count[s][g] for s in self.sites):
                continue
            q = np.array([np.quantile(self.p_active(s)[g], [0.1, 0.5, 0.9]) for s in self.sites])
            ax.plot(x, q[:, 1], marker="o", label=name)
            ax.fill_between(x, q[:, 0], q[:, 2], alpha=0.2)
        ax.set_xticks(x, self.sites, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("p(active)")
        ax.set_ylim(0, 1)
        ax.set_title(f"neuron activity over {self.n_items} items")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        return fig


def _cat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0)


def check_sites(sites: Any) -> tuple[str, ...]:
    """A ``sites`` setting: a site or a tuple of them (empty: the default MLP activations)."""
    names = (sites,) if isinstance(sites, str) else tuple(sites)
    if not all(isinstance(s, str) and s for s in names):
        raise InputError(f"sites must be site names such as 'lm.layer[0].mlp.act', not {sites!r}")
    return names


def check_domains(domains: Sequence[str] | None, n: int) -> tuple[str, ...] | None:
    if domains is None:
        return None
    labels = tuple(str(d) for d in domains)
    if len(labels) != n:
        raise InputError(f"domains has {len(labels)} labels for {n} items")
    return labels


@register(
    "neuron_stats",
    kind=KIND,
    family="neuron/statistics",
    paper="Huo et al. 2024",
    level="model/neuron",
)
class NeuronStatsStudy(Study):
    """Stream a dataset through the model and keep, per site, token group and neuron: tokens,
    active count (> 0), sum, max and top-k examples.

    Args:
        sites: sites to read (default: every ``lm.layer[i].mlp.act``; CLIP:
            ``vision.layer[i].mlp.act``).
        groups: token groups kept (``mmscope.methods.activations.GROUPS``).
        top_k: examples kept per neuron and token group (0: none): the k items with the
            largest activation, each with the position of its largest.
        batch_size: items per forward.
        save_every: batches between checkpoints (when a checkpoint path is given).
        progress: show a tqdm bar.
    """

    def __init__(
        self,
        sites: tuple[str, ...] = (),
        groups: tuple[str, ...] = GROUPS,
        top_k: int = 5,
        batch_size: int = 16,
        save_every: int = 10,
        progress: bool = True,
    ) -> None:
        self.sites = check_sites(sites)
        self.groups = (groups,) if isinstance(groups, str) else tuple(groups)
        bad = set(self.groups) - set(GROUPS)
        if bad or not self.groups:
            raise InputError(f"groups must be among {GROUPS}, not {sorted(bad) or 'none'}")
        self.top_k = integer("top_k", top_k, minimum=0)
        self.batch_size = positive_int("batch_size", batch_size)
        self.save_every = positive_int("save_every", save_every)
        self.progress = bool(progress)

    def settings(self) -> dict[str, Any]:
        return {"sites": list(self.sites), "groups": list(self.groups), "top_k": self.top_k}

    def __call__(
        self,
        vlm: VLM,
        items: Sequence[BenchItem],
        domains: Sequence[str] | None = None,
        checkpoint: str | Path | None = None,
    ) -> NeuronStats:
        """Args:
        domains: a label per item (e.g. the world's scene style); adds the groups
            ``"{group}@{domain}"``.
        checkpoint: a file to resume from and save to every ``save_every`` batches.
        """
        from tqdm.auto import tqdm

        sites = self.sites or default_sites(vlm)
        for site in sites:
            vlm.resolve(site)  # unknown sites raise before any forward
        labels = check_domains(domains, len(items))
        names = sorted(set(labels)) if labels else []
        meta = meta_of(vlm, items, sites, self.groups, names, labels, self.settings())
        acc = Accumulator(sites, self.groups, names, self.top_k, vlm.device)
        path = Path(checkpoint) if checkpoint is not None else None
        done = load_checkpoint(path, meta, acc) if path is not None else 0
        dom = None
        if labels:
            dom = torch.tensor([names.index(d) for d in labels], device=vlm.device)
        bar = tqdm(total=len(items), initial=done, disable=not self.progress, desc="neuron stats")
        try:
            for step, (first, chunk) in enumerate(batches(items[done:], self.batch_size)):
                first += done
                inputs = vlm.prepare([it.image for it in chunk], [it.prompt for it in chunk])
                rows = RowCache(vlm, inputs, self.groups, first, dom)
                with torch.no_grad(), patch(vlm, {s: acc.reducer(s, rows) for s in sites}):
                    vlm.forward(inputs)
                bar.update(len(chunk))
                end = first + len(chunk)
                if path is not None and ((step + 1) % self.save_every == 0 or end == len(items)):
                    acc.save(path, meta, end)
        finally:
            bar.close()
        count, active, total, high, top_values, top_items, top_positions = acc.arrays()
        return NeuronStats(
            tuple(sites),
            acc.group_names,
            len(items),
            count,
            active,
            total,
            high,
            top_values,
            top_items,
            top_positions,
            {**self.settings(), "sites": list(sites)},
        )
