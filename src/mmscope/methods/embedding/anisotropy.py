"""Anisotropy of embeddings per layer (Ethayarajh 2019; Wolfe & Caliskan 2022, "Contrastive
visual semantic pretraining magnifies the semantics of natural language representations").

Anisotropy is the expected cosine similarity of two random embeddings: near 0 when they
point every way, near 1 when they crowd into a narrow cone. Measured per layer, separately
for image tokens and text tokens (decoders: ``lm.layer[i]`` at the image and the prompt
tokens; dual encoders: ``vision.layer[i]`` at the patches, ``text.layer[i]`` at the text's
tokens). Pairs are drawn from different items, so that a text's or image's own tokens do
not pair with each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmscope.core.errors import InputError
from mmscope.core.hooks import capture
from mmscope.core.registry import register
from mmscope.core.sites import site
from mmscope.core.validate import positive_int, valid_seed
from mmscope.methods.activations import batches, collect
from mmscope.methods.analysis import Result, jsonable, new_figure
from mmscope.methods.study import KIND, Study

if TYPE_CHECKING:
    from mmscope.models.base import VLM
    from mmscope.world.items import BenchItem


def random_pairs(item: np.ndarray, pairs: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row pairs ``(i, j)`` from different items: all of them when there are at most
    ``pairs``, else ``pairs`` drawn uniformly with replacement."""
    n = len(item)
    if n * (n - 1) // 2 <= pairs:
        first, second = np.triu_indices(n, k=1)
        keep = item[first] != item[second]
        return first[keep], second[keep]
    rng = np.random.default_rng(seed)
    got_i: list[np.ndarray] = []
    got_j: list[np.ndarray] = []
    have = 0
    while have < pairs:
        i, j = rng.integers(n, size=(2, 2 * pairs))
        keep = item[i] != item[j]
        got_i.append(i[keep])
        got_j.append(j[keep])
        have += int(keep.sum())
        if have == 0 and len(set(item.tolist())) < 2:
            break
    return np.concatenate(got_i)[:pairs], np.concatenate(got_j)[:pairs]


def mean_cosine(values: np.ndarray, item: np.ndarray, pairs: int = 2000, seed: int = 0) -> float:
    """Mean cosine similarity of random row pairs from different items (NaN: no pair)."""
    i, j = random_pairs(np.asarray(item), pairs, seed)
    if len(i) == 0:
        return float("nan")
    x = np.asarray(values, dtype=np.float64)
    unit = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return float(np.mean(np.sum(unit[i] * unit[j], axis=1)))


@dataclass(frozen=True, eq=False)
class AnisotropyResult(Result):
    """Mean cosine of random embedding pairs per layer and token group.

    Attributes:
        sites: per group (``"image"``, ``"text"``), the sites measured, layer by layer.
        values: per group, ``(layers,)`` mean cosines.
        pairs: pairs drawn per value (at most).
    """

    sites: dict[str, tuple[str, ...]]
    values: dict[str, np.ndarray]
    pairs: int

    def tables(self) -> dict[str, dict[str, list[Any]]]:
        """One row per group and layer."""
        cols: dict[str, list[Any]] = {"group": [], "site": [], "layer": [], "mean_cosine": []}
        for group, sites in self.sites.items():
            for layer, (name, value) in enumerate(zip(sites, self.values[group])):
                cols["group"].append(group)
                cols["site"].append(name)
                cols["layer"].append(layer)
                cols["mean_cosine"].append(float(value))
        return {"anisotropy": cols}

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "study": "anisotropy",
                "sites": {g: list(s) for g, s in self.sites.items()},
                "values": self.values,
                "pairs": self.pairs,
            }
        )

    def plot(self, ax: Any = None) -> Any:
        """Mean cosine per layer, one line per token group."""
        fig, ax = new_figure(5.0, 3.5, ax)
        for group, values in self.values.items():
            ax.plot(range(len(values)), values, marker="o", label=f"{group} tokens")
        ax.set_xlabel("layer")
        ax.set_ylabel("mean cosine of random pairs")
        ax.axhline(0.0, color="k", linewidth=0.5, linestyle=":")
        ax.set_title("anisotropy", fontsize=9)
        ax.legend(fontsize=8)
        return fig


def _text_tower(
    vlm: VLM, items: Sequence[BenchItem], sites: list[str], batch_size: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A dual encoder's text-tower outputs at the text's tokens: ``(values, item)`` per site."""
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {s: [] for s in sites}
    for first, chunk in batches(items, batch_size):
        inputs = vlm.prepare([it.image for it in chunk], [it.prompt for it in chunk])
        with torch.no_grad(), capture(vlm, sites) as cap:
            vlm.forward(inputs)
        for where in sites:
            value = cap[where].float().cpu()
            for b, (start, end) in enumerate(inputs.prompt_spans):
                rows = value[b, start:end].numpy()
                parts[where].append((rows, np.full(len(rows), first + b)))
    return {
        s: (np.concatenate([p[0] for p in v]), np.concatenate([p[1] for p in v]))
        for s, v in parts.items()
    }


@register(
    "anisotropy",
    kind=KIND,
    family="embedding/geometry",
    paper="Wolfe & Caliskan 2022",
    level="model/embedding",
    needs=("image_positions",),
)
class Anisotropy(Study):
    """Mean cosine between random pairs of embeddings per layer, for image and text tokens
    (Ethayarajh 2019; Wolfe & Caliskan 2022).

    Args:
        pairs: random pairs per layer and group (all pairs when there are fewer).
        seed: draws the pairs.
        batch_size: items per forward.
    """

    def __init__(self, pairs: int = 2000, seed: int = 0, batch_size: int = 16) -> None:
        self.pairs = positive_int("pairs", pairs)
        self.seed = valid_seed(seed)
        self.batch_size = positive_int("batch_size", batch_size)

    def __call__(self, vlm: VLM, items: Sequence[BenchItem]) -> AnisotropyResult:
        if len(items) < 2:
            raise InputError("anisotropy needs at least two items (pairs come from different ones)")
        sites: dict[str, tuple[str, ...]] = {}
        data: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        if vlm.contrastive:
            stacks = {"image": "vision.layer", "text": "text.layer"}
        else:
            stacks = {"image": "lm.layer", "text": "lm.layer"}
        for group, stack in stacks.items():
            sites[group] = tuple(site(stack, i) for i in range(vlm.num_layers(stack)))
        if vlm.contrastive:
            image = collect(vlm, items, list(sites["image"]), ("image",), self.batch_size)
            text = _text_tower(vlm, items, list(sites["text"]), self.batch_size)
            data["image"] = [(image[s].values, image[s].item) for s in sites["image"]]
            data["text"] = [text[s] for s in sites["text"]]
        else:
            acts = collect(vlm, items, list(sites["image"]), ("image", "text"), self.batch_size)
            for group in ("image", "text"):
                data[group] = [
                    (a.values, a.item) for a in (acts[s].where(group) for s in sites[group])
                ]
        values = {
            group: np.array([mean_cosine(x, it, self.pairs, self.seed) for x, it in rows])
            for group, rows in data.items()
        }
        return AnisotropyResult(sites, values, self.pairs)
