"""``NeuronSet``: the result of every neuron-finding method (DAPE, MINER, knowledge neurons,
dissection), and what neuron editing takes."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmscope.core.errors import InputError
from mmscope.methods.analysis import Result, new_figure


@dataclass(frozen=True)
class NeuronSet(Result):
    """Neurons as ``(site, unit)`` pairs, each with a label and a score.

    Attributes:
        method: the method that found them, e.g. ``"dape"``.
        neurons: ``(site, unit)`` per neuron; the site is an MLP activation site such as
            ``"lm.layer[1].mlp.act"`` and the unit an index into its last dimension.
        labels: per neuron, what it is specific to (a domain, a modality, a concept), or ``""``.
        scores: per neuron, the method's score (higher: more specific or more important).
        settings: the method's settings.
    """

    method: str
    neurons: tuple[tuple[str, int], ...]
    labels: tuple[str, ...]
    scores: tuple[float, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not len(self.neurons) == len(self.labels) == len(self.scores):
            raise InputError("a NeuronSet needs one label and one score per neuron")

    def __len__(self) -> int:
        return len(self.neurons)

    def by_site(self) -> dict[str, list[int]]:
        """Units per site."""
        out: dict[str, list[int]] = defaultdict(list)
        for site, unit in self.neurons:
            out[site].append(unit)
        return dict(out)

    def with_label(self, label: str) -> NeuronSet:
        """The neurons labelled ``label``."""
        keep = [i for i, lab in enumerate(self.labels) if lab == label]
        return self._subset(keep)

    def top(self, k: int) -> NeuronSet:
        """The ``k`` highest-scoring neurons."""
        order = np.argsort(-np.asarray(self.scores, dtype=float), kind="stable")[:k]
        return self._subset(order.tolist())

    def _subset(self, keep: list[int]) -> NeuronSet:
        return NeuronSet(
            self.method,
            tuple(self.neurons[i] for i in keep),
            tuple(self.labels[i] for i in keep),
            tuple(self.scores[i] for i in keep),
            self.settings,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "neurons": [
                {"site": s, "unit": u, "label": lab, "score": sc}
                for (s, u), lab, sc in zip(self.neurons, self.labels, self.scores)
            ],
            "settings": self.settings,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NeuronSet:
        rows = data["neurons"]
        return cls(
            data["method"],
            tuple((r["site"], int(r["unit"])) for r in rows),
            tuple(r["label"] for r in rows),
            tuple(float(r["score"]) for r in rows),
            data.get("settings", {}),
        )

    def plot(self, ax: Any = None) -> Any:
        """Neurons per site, stacked by label."""
        fig, ax = new_figure(6, 3, ax)
        sites = sorted({s for s, _ in self.neurons})
        labels = sorted(set(self.labels))
        bottom = np.zeros(len(sites))
        for label in labels:
            counts = np.array(
                [
                    sum(
                        1
                        for (s, _), lab in zip(self.neurons, self.labels)
                        if s == site and lab == label
                    )
                    for site in sites
                ]
            )
            ax.bar(range(len(sites)), counts, bottom=bottom, label=label or "(none)")
            bottom += counts
        ax.set_xticks(range(len(sites)), sites, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("neurons")
        ax.set_title(f"{self.method}: {len(self)} neurons")
        if labels:
            ax.legend(fontsize=7)
        return fig


def load_neuron_set(path: str | Path) -> NeuronSet:
    """A ``NeuronSet`` saved as JSON (``NeuronSet.save``)."""
    try:
        return NeuronSet.from_dict(json.loads(Path(path).read_text()))
    except FileNotFoundError:
        raise InputError(f"no neuron set at {path}") from None
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{path} is not a saved neuron set: {err}") from None
