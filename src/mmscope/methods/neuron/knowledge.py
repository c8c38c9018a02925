"""Knowledge neurons (Dai et al. 2022, "Knowledge neurons in pretrained transformers").

Attribution of a neuron of a language-model MLP (``lm.layer[l].mlp.act``) to the probability
of the answer's (first) token, read at the last position: integrated gradients along the
path that scales the layer's whole activation vector at that position from 0 to its value,
``attr_i = w_i / m * sum_{k=1..m} dP(k/m * w) / dw_i`` (m = 20), as the authors' released code
does (one path per layer rather than one per neuron; per layer the attributions then add up
to ``P(w) - P(0)``). The m steps of a batch run as one forward: the scaled vectors are a leaf
tensor patched into the site, and ``torch.autograd.grad`` reads their gradients.

Per item, the coarse neurons are those with ``attr >= threshold * max attr`` (the maximum
over every attributed layer; threshold 0.2 in the paper); per fact (here: per answer word),
the knowledge neurons are the coarse neurons of at least a share p of its items. The paper
starts from p = 0.7 and moves it by 0.05 at a time until the facts have 2 to 5 knowledge
neurons on average; here (``adapt``) each answer's p moves so until it has 2 to 5 (or p
reaches 0.05 or 1). The EleutherAI re-implementation instead fixes p = 0.5 (with 0.3 x max).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.hooks import capture, patch
from mmscope.core.registry import register
from mmscope.core.sites import Site, site
from mmscope.core.state import preserved
from mmscope.core.targets import answer_id
from mmscope.core.validate import number, positive_int
from mmscope.methods.activations import batches
from mmscope.methods.neuron.base import NeuronSet
from mmscope.methods.study import KIND, Study

if TYPE_CHECKING:
    from mmscope.core.inputs import Inputs
    from mmscope.models.base import VLM
    from mmscope.world.items import BenchItem

#: Knowledge neurons per fact that the paper's adaptive share aims at, and its step.
BOUNDS = (2, 5)
STEP = 0.05


def integrated_gradients(
    vlm: VLM, inputs: Inputs, site: str, targets: Sequence[int], steps: int = 20
) -> torch.Tensor:
    """``(batch, width)`` attributions of the site's units at the last position to the
    probability of ``targets[b]`` (Dai et al. 2022; right Riemann sum with ``steps``)."""
    with preserved(vlm.model):  # eval mode, frozen weights: gradients reach the leaf only
        return _integrate(vlm, inputs, site, targets, steps)


def _integrate(
    vlm: VLM, inputs: Inputs, site: str, targets: Sequence[int], steps: int
) -> torch.Tensor:
    batch = inputs.batch_size
    with torch.no_grad(), capture(vlm, site) as cap:
        vlm.forward(inputs)
    full = cap[site][:, -1].float()  # (batch, width) at the last position (left padding)
    alphas = torch.arange(1, steps + 1, device=full.device, dtype=full.dtype) / steps
    scaled = (alphas.repeat_interleave(batch)[:, None] * full.repeat(steps, 1)).detach()
    leaf = scaled.requires_grad_(True)  # (steps * batch, width), step-major like Inputs.tile

    def put(out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        out[:, -1] = leaf.to(out.dtype)
        return out

    ids = torch.as_tensor(list(targets), device=full.device).repeat(steps)
    with torch.enable_grad(), patch(vlm, {site: put}):
        logits = vlm.forward(inputs.tile(steps)).logits[:, -1].float()
        probs = torch.softmax(logits, dim=-1).gather(1, ids[:, None])
        (grads,) = torch.autograd.grad(probs.sum(), leaf)
    return (full * grads.view(steps, batch, -1).mean(0)).detach()


def coarse(attributions: np.ndarray, threshold: float) -> np.ndarray:
    """Per item (first axis), the units whose attribution is at least ``threshold`` times the
    item's maximum over all other axes (none where the maximum is not positive)."""
    flat = attributions.reshape(len(attributions), -1)
    top = flat.max(axis=1, keepdims=True)
    return ((flat >= threshold * top) & (top > 0)).reshape(attributions.shape)


def refine(chosen: np.ndarray, share: float) -> np.ndarray:
    """The units chosen (coarse) for at least a share ``share`` of the items (first axis)."""
    return chosen.mean(axis=0) >= share  # type: ignore[no-any-return]


def adapt_share(
    chosen: np.ndarray, share: float, bounds: tuple[int, int] = BOUNDS, step: float = STEP
) -> tuple[np.ndarray, float]:
    """``refine`` with the share moved by ``step`` until between ``bounds`` neurons are kept
    (Dai et al. 2022, sec. 4.1), or the share reaches ``step`` or 1: (kept, share used)."""
    low, high = bounds
    kept = refine(chosen, share)
    while kept.sum() < low and share > step + 1e-9:
        share = round(share - step, 10)
        kept = refine(chosen, share)
    while kept.sum() > high and share < 1 - 1e-9:
        share = round(min(1.0, share + step), 10)
        kept = refine(chosen, share)
    return kept, share


def _layers(vlm: VLM, layers: Sequence[int]) -> list[int]:
    n = vlm.num_layers("lm.layer")
    out = list(range(n)) if not layers else [int(layer) for layer in layers]
    bad = [layer for layer in out if not -n <= layer < n]
    if bad:
        raise InputError(f"layers {bad} are out of range for {n} language-model layers")
    return sorted({layer % n for layer in out})


def _decoder_only(vlm: VLM) -> None:
    if vlm.contrastive:
        raise NotApplicableError(
            f"{vlm.name} is a contrastive encoder: it predicts no answer token to attribute"
        )


@register(
    "knowledge_neurons",
    kind=KIND,
    family="neuron/attribution",
    paper="Dai et al. 2022",
    level="model/neuron",
)
class KnowledgeNeurons(Study):
    """Knowledge neurons of each answer word: integrated gradients per item, kept where
    they pass ``threshold`` x the item's maximum in at least ``share`` of the answer's items.

    Args:
        layers: language-model layers to attribute (default: all).
        steps: integration steps (m = 20 in the paper).
        threshold: coarse threshold as a share of the item's maximum attribution (0.2).
        share: least share of an answer's items whose coarse neurons hold the neuron (p;
            0.7, the paper's starting value).
        adapt: move each answer's share by 0.05 until it keeps 2 to 5 neurons (the paper's
            refinement); ``False`` keeps ``share`` as given.
        batch_size: items per forward (each runs ``steps`` times).
    """

    def __init__(
        self,
        layers: tuple[int, ...] = (),
        steps: int = 20,
        threshold: float = 0.2,
        share: float = 0.7,
        adapt: bool = True,
        batch_size: int = 8,
    ) -> None:
        try:
            self.layers = tuple(int(layer) for layer in layers)
        except (TypeError, ValueError):
            raise InputError(f"layers must be layer indices, not {layers!r}") from None
        self.steps = positive_int("steps", steps)
        self.threshold = number("threshold", threshold)
        self.share = number("share", share)
        if not 0 < self.threshold <= 1 or not 0 < self.share <= 1:
            raise InputError("threshold and share lie in (0, 1]")
        if not isinstance(adapt, bool):
            raise InputError(f"adapt must be True or False, not {adapt!r}")
        self.adapt = adapt
        self.batch_size = positive_int("batch_size", batch_size)

    def attributions(self, vlm: VLM, items: Sequence[BenchItem]) -> dict[str, np.ndarray]:
        """Per site, ``(items, width)`` attributions to each item's answer."""
        _decoder_only(vlm)
        sites = [site("lm.layer", layer, "mlp.act") for layer in _layers(vlm, self.layers)]
        parts: dict[str, list[np.ndarray]] = defaultdict(list)
        for _, chunk in batches(items, self.batch_size):
            inputs = vlm.prepare([it.image for it in chunk], [it.prompt for it in chunk])
            targets = [answer_id(vlm, it.answer) for it in chunk]
            for at in sites:
                attr = integrated_gradients(vlm, inputs, at, targets, self.steps)
                parts[at].append(attr.cpu().numpy())
        return {at: np.concatenate(parts[at]) for at in sites}

    def __call__(self, vlm: VLM, items: Sequence[BenchItem]) -> NeuronSet:
        _decoder_only(vlm)
        scored = [it for it in items if it.answer]
        if not scored:
            raise InputError("knowledge_neurons needs items with expected answers")
        attrs = self.attributions(vlm, scored)
        sites = list(attrs)
        stacked = np.stack([attrs[s] for s in sites], axis=1)  # (items, sites, width)
        chosen = coarse(stacked, self.threshold)
        answers = np.array([it.answer for it in scored], dtype=object)
        neurons: list[tuple[str, int]] = []
        labels: list[str] = []
        scores: list[float] = []
        shares: dict[str, float] = {}
        for answer in sorted(set(answers)):
            group = answers == answer
            if self.adapt:
                kept, shares[str(answer)] = adapt_share(chosen[group], self.share)
            else:
                kept, shares[str(answer)] = refine(chosen[group], self.share), self.share
            mean = stacked[group].mean(axis=0)
            for s, u in zip(*np.nonzero(kept)):
                neurons.append((sites[s], int(u)))
                labels.append(str(answer))
                scores.append(float(mean[s, u]))
        settings: dict[str, Any] = {
            "layers": [Site.parse(s).layer for s in sites],
            "steps": self.steps,
            "threshold": self.threshold,
            "share": self.share,
            "adapt": self.adapt,
            "shares": shares,
            "items": len(scored),
        }
        return NeuronSet(
            "knowledge_neurons", tuple(neurons), tuple(labels), tuple(scores), settings
        )
