"""Modality-specific neurons by MINER (Huang et al. 2024), as in its released code.

Per item, modality (image tokens; text tokens, the last position included) and layer, five
scores of each MLP neuron over that modality's activations ``A`` ``(tokens, width)``:
share > 0, mean, max, and two attention-weighted sums with that layer's self-attention ``S``
(head mean, restricted to the modality's tokens): ``attn_k = sum(softmax(S, dim=0).T @ A)``
and ``attn_q = sum(softmax(S, dim=1) @ A)``. Each score is min-max normalised over the
layer's neurons (a constant score gives 0), averaged over the items (the released code sums,
the same ranking when every item has both modalities) and weighted (``weights``, default
``[0, 0.25, 0.25, 0.5, 0]`` as released). The ``share`` of all neurons with the largest sum
over modalities is kept, each labelled with its best modality ("adaptive" selection).
Attention is read with eager attention, a layer at a time, never kept for all layers.

Hybrid models (Qwen3.5): the attention scores need the layer's softmax attention, so with
nonzero attention weights the default sites leave out the MLPs of the linear-attention layers
(a warning; ``settings["skipped_layers"]`` says why) and a named site in such a layer raises
``NotApplicableError``; with zero attention weights every layer is read.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.hooks import patch
from mmscope.core.registry import register
from mmscope.core.sites import Site, site
from mmscope.core.validate import number, positive_int
from mmscope.methods.activations import batches
from mmscope.methods.neuron.accumulate import RowCache
from mmscope.methods.neuron.base import NeuronSet
from mmscope.methods.neuron.dape import FoundNeurons
from mmscope.methods.neuron.stats import check_sites, default_sites
from mmscope.methods.study import KIND, Study
from mmscope.models.base import parse_site
from mmscope.models.capabilities import require_softmax, softmax_only

if TYPE_CHECKING:
    from mmscope.models.base import VLM
    from mmscope.world.items import BenchItem

MODALITIES = ("image", "text")
METRICS = ("prob", "mean", "max", "attn_k", "attn_q")


def _minmax(v: torch.Tensor) -> torch.Tensor:
    low, high = v.min(dim=-1, keepdim=True).values, v.max(dim=-1, keepdim=True).values
    span = high - low
    return torch.where(span > 0, (v - low) / torch.where(span > 0, span, 1), 0.0)


def item_scores(a: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    """The five normalised scores ``(5, width)`` of one item's modality tokens: activations
    ``a`` ``(tokens, width)``, attention ``s`` ``(tokens, tokens)`` (None: zeros for the two
    attention scores)."""
    a = a.float()
    out = [(a > 0).float().mean(0), a.mean(0), a.max(0).values]
    if s is None:
        out += [torch.zeros_like(out[0])] * 2
    else:
        s = s.float()
        out.append((s.softmax(dim=0).t() @ a).sum(0))
        out.append((s.softmax(dim=1) @ a).sum(0))
    return _minmax(torch.stack(out))


def miner_select(
    scores: np.ndarray, weights: Sequence[float], share: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``scores`` ``(modalities, 5, neurons)`` -> ``(weighted (modalities, neurons), kept,
    best modality of each kept)``: the ``share`` of neurons with the largest sum over
    modalities, each assigned to its best one."""
    weighted = np.tensordot(np.asarray(weights, dtype=np.float64), scores, axes=([0], [1]))
    total = weighted.sum(axis=0)
    keep = max(1, int(share * total.size))
    kept = np.argsort(-total, kind="stable")[:keep]
    return weighted, kept, weighted[:, kept].argmax(axis=0)


@register(
    "miner",
    kind=KIND,
    family="neuron/modality",
    paper="Huang et al. 2024",
    level="model/neuron",
    needs=("lm_image_tokens",),
)
class Miner(Study):
    """Modality-specific neurons (image vs text) of a decoder's MLPs.

    Args:
        share: share of all neurons kept (0.02).
        weights: weights of the scores (prob, mean, max, attn_k, attn_q).
        sites: MLP activation sites ``*.layer[i].mlp.act`` (default: every LM layer's).
        batch_size: items per forward.
        progress: show a progress bar.
    """

    def __init__(
        self,
        share: float = 0.02,
        weights: tuple[float, ...] = (0.0, 0.25, 0.25, 0.5, 0.0),
        sites: tuple[str, ...] = (),
        batch_size: int = 8,
        progress: bool = True,
    ) -> None:
        self.share = number("share", share)
        if not 0 < self.share <= 1:
            raise InputError(f"share must lie in (0, 1], not {share!r}")
        self.weights = tuple(number("weights", w) for w in weights)
        if len(self.weights) != len(METRICS):
            raise InputError(f"weights needs one weight per score {METRICS}, not {weights!r}")
        self.sites = check_sites(sites)
        if any(not s.endswith(".mlp.act") for s in self.sites):
            raise InputError(f"MINER reads MLP activation sites (*.mlp.act), not {self.sites}")
        self.batch_size = positive_int("batch_size", batch_size)
        self.progress = bool(progress)

    def __call__(self, vlm: VLM, items: Sequence[BenchItem]) -> FoundNeurons:
        from tqdm.auto import tqdm

        if vlm.contrastive:
            raise NotApplicableError(
                f"{vlm.name} is a dual encoder: its image and text tokens never share a layer"
            )
        sites = list(self.sites or default_sites(vlm))
        attend = any(self.weights[3:])
        skipped: dict[str, str] = {}
        if attend:
            sites, skipped = self._attending(vlm, sites)
        probs = {s: str(replace(Site.parse(s), part="attn.probs")) for s in sites}
        for at in sites:
            vlm.resolve(at)
            if attend:
                vlm.resolve(probs[at])
        groups = ("image", "text", "last")
        total: dict[str, torch.Tensor] = {}
        seen = torch.zeros(len(MODALITIES))
        attention: dict[str, torch.Tensor] = {}

        def keep_attention(site: str) -> Any:
            def fn(value: torch.Tensor) -> torch.Tensor:
                attention[site] = value.mean(dim=1)  # (batch, queries, keys), head mean
                return value

            return fn

        def reduce(site: str, rows: RowCache) -> Any:
            def fn(value: torch.Tensor) -> torch.Tensor:
                b, pos, grp = rows.get(site, value)
                s = attention.pop(site, None)
                for i in range(value.shape[0]):  # a loop over items and modalities only
                    for m, want in enumerate(((0,), (1, 2))):
                        sel = (b == i) & torch.isin(grp, torch.tensor(want, device=grp.device))
                        p = pos[sel]
                        if p.numel() == 0:
                            continue
                        sub = s[i][p][:, p] if s is not None else None
                        score = item_scores(value[i, p], sub)
                        key = f"{site}#{m}"
                        total[key] = total.get(key, 0) + score.double().cpu()
                        if site == sites[0]:
                            seen[m] += 1
                return value

            return fn

        bar = tqdm(total=len(items), disable=not self.progress, desc="miner")
        try:
            for first, chunk in batches(items, self.batch_size):
                inputs = vlm.prepare([it.image for it in chunk], [it.prompt for it in chunk])
                rows = RowCache(vlm, inputs, groups, first)
                fns = {s: reduce(s, rows) for s in sites}
                if attend:  # attention of a layer runs before its MLP
                    fns.update({probs[s]: keep_attention(s) for s in sites})
                with torch.no_grad(), patch(vlm, fns):
                    vlm.forward(inputs)
                bar.update(len(chunk))
        finally:
            bar.close()
        return self._result(sites, total, seen, skipped)

    def _attending(self, vlm: VLM, sites: Sequence[str]) -> tuple[list[str], dict[str, str]]:
        """The sites whose layer has softmax attention, for the attention scores: a named site
        without raises; the default sites without are skipped (``{site: why}``)."""
        parsed = [Site.parse(s) for s in sites]
        if self.sites:
            for at, p in zip(sites, parsed):
                if p.layer is not None:
                    require_softmax(vlm, p.stack, p.layer, f"miner's attention scores at {at}")
            return list(sites), {}
        layers = [p.layer for p in parsed if p.layer is not None]
        kept, skipped = softmax_only(vlm, "lm.layer", layers, "miner's attention scores")
        return [site("lm.layer", i, "mlp.act") for i in kept], skipped

    def _result(
        self,
        sites: Sequence[str],
        total: dict[str, torch.Tensor],
        seen: torch.Tensor,
        skipped: dict[str, str],
    ) -> FoundNeurons:
        if seen.min() == 0:
            raise InputError("MINER needs items with both image and text tokens")
        # (modalities, 5, sites * width): scores averaged over the items
        scores = np.stack(
            [
                np.concatenate([total[f"{s}#{m}"].numpy() for s in sites], axis=1) / seen[m]
                for m in range(len(MODALITIES))
            ]
        )
        rows = [(s, u) for s in sites for u in range(total[f"{s}#0"].shape[1])]
        weighted, kept, best = miner_select(scores, self.weights, self.share)
        settings = {"share": self.share, "weights": list(self.weights), "sites": list(sites)}
        if skipped:
            settings["skipped_layers"] = skipped
        neurons = NeuronSet(
            "miner",
            tuple(rows[u] for u in kept),
            tuple(MODALITIES[m] for m in best),
            tuple(float(weighted[:, u].sum()) for u in kept),
            settings,
        )
        label = np.full(len(rows), "", dtype=object)
        label[kept] = [MODALITIES[m] for m in best]
        table: dict[str, Any] = {
            "site": np.array([s for s, _ in rows], dtype=object),
            "layer": np.array([parse_site(s)[1] or 0 for s, _ in rows]),
            "neuron": np.array([u for _, u in rows]),
            "selected": label != "",
            "label": label,
        }
        for m, modality in enumerate(MODALITIES):
            table[f"score_{modality}"] = weighted[m]
            for k, metric in enumerate(METRICS):
                table[f"{metric}_{modality}"] = scores[m, k]
        counts = {mod: int(sum(1 for m in best if MODALITIES[m] == mod)) for mod in MODALITIES}
        return FoundNeurons(neurons, table, {"neurons_per_modality": counts})
