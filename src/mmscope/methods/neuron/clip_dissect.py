"""CLIP-Dissect (Oikarinen & Weng 2023, "CLIP-Dissect: Automatic Description of Neuron
Representations in Deep Vision Networks").

P = cosine similarity of each image's CLIP embedding with each concept's text embedding (the
model's own text tower); p(t|x) = softmax(alpha P) over concepts (alpha = 10); B_k = the
``top_k`` images of highest activation of unit k (the unit's mean over the image's patch
tokens by default: the paper's spatial average); soft-WPMI(k, t) = sum_j log(1 + p_j
(p(t|x_j) - 1)) - log p(t), with p_j falling linearly by rank from 0.998 towards 0.97
(``p_j = p_start - j (p_start - p_end) / top_k``) and p(t) = mean_x p(t|x), as in the released
code (which also adds 1e-7 inside the logs); the label is the argmax concept.

On world items the labels are scored: a unit's *true* concept is the one whose presence
(``world.image_concepts``) best separates its top images from all images (largest share among
B_k minus share among all images); ``summary["agreement"]`` is the share of units whose label
is that concept, ``agreement_sharing_a_word`` counts "red" for "red circle" as agreeing.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.special import logsumexp, softmax

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.hooks import capture
from mmscope.core.registry import register
from mmscope.core.validate import number, positive_int
from mmscope.methods.activations import batches, token_rows
from mmscope.methods.embedding.clip_embed import spelled
from mmscope.methods.neuron.concept_truth import kinds_summary
from mmscope.methods.neuron.dissect import DissectionResult, default_sites
from mmscope.methods.study import KIND, Study
from mmscope.world import concept_vocabulary, image_concepts
from mmscope.world.items import item_scenes

if TYPE_CHECKING:
    from mmscope.models.base import VLM
    from mmscope.world import Scene
    from mmscope.world.items import BenchItem

POOLS = ("mean", "max", "class")


def soft_wpmi(
    similarity: np.ndarray,
    activations: np.ndarray,
    top_k: int = 100,
    alpha: float = 10.0,
    p_start: float = 0.998,
    p_end: float = 0.97,
    min_prob: float = 1e-7,
) -> np.ndarray:
    """Soft-WPMI ``(units, concepts)`` from ``similarity (images, concepts)`` and pooled
    ``activations (images, units)`` (Oikarinen & Weng 2023, their released ``soft_wpmi``)."""
    probs = softmax(alpha * similarity.astype(np.float64), axis=1)
    k = min(top_k, len(probs))
    top = np.argsort(-activations, axis=0, kind="stable")[:k]  # (k, units)
    weights = p_start - np.arange(k) / top_k * (p_start - p_end)
    given = np.log(1 + weights[:, None, None] * (probs[top] - 1) + min_prob).sum(0)
    prior = logsumexp(np.log(probs + min_prob), axis=0) - np.log(len(probs))
    return given - prior[None, :]


def top_lift(activations: np.ndarray, present: np.ndarray, top_k: int) -> np.ndarray:
    """``(units, concepts)``: share of each unit's ``top_k`` images (by ``activations (images,
    units)``) holding each concept (bool ``present (images, concepts)``) minus its share of
    all images; NaN for concepts always or never present."""
    top = np.argsort(-activations, axis=0, kind="stable")[: min(top_k, len(present))]
    lift = present[top].mean(0) - present.mean(0)
    varies = np.asarray(present.any(0) & ~present.all(0))
    return np.where(varies[None, :], lift, np.nan)


def _pool(value: np.ndarray, groups: list[str], pool: str) -> np.ndarray:
    if pool == "class":
        if "class" not in groups:
            raise NotApplicableError("pool='class' needs a tower with a class token")
        return value[groups.index("class")]
    rows = value[[g == "image" for g in groups]]
    return rows.mean(0) if pool == "mean" else rows.max(0)


def _chance(labels: np.ndarray, truth: np.ndarray) -> float:
    """Agreement expected if the labels were shuffled among the units."""
    names = set(labels.tolist()) | set(truth.tolist())
    return float(sum(np.mean(labels == n) * np.mean(truth == n) for n in names))


@register(
    "clip_dissect",
    kind=KIND,
    family="neuron/concept",
    paper="Oikarinen & Weng 2023",
    level="model/neuron",
    needs=("contrastive",),
)
class ClipDissect(Study):
    """Label every unit with a concept by soft-WPMI (Oikarinen & Weng 2023); CLIP models.

    Args:
        sites: vision MLP activation sites (default: every ``vision.layer[i].mlp.act``).
        concepts: the concept words (default: the world's colours, shapes, names and styles;
            words the tokenizer cannot spell are dropped with a warning).
        template: text around each concept, e.g. ``"a {}"`` (the paper: the word alone).
        top_k: images per unit (B_k; 100 in the paper).
        alpha: softmax scale of the similarities (10 in the paper).
        p_start, p_end: the rank weights p_j (0.998 and 0.97 in the paper).
        pool: a unit's activation on an image: ``mean`` or ``max`` over its patch tokens, or
            its ``class`` token.
        batch_size: items per forward.
    """

    def __init__(
        self,
        sites: tuple[str, ...] = (),
        concepts: tuple[str, ...] = (),
        template: str = "{}",
        top_k: int = 100,
        alpha: float = 10.0,
        p_start: float = 0.998,
        p_end: float = 0.97,
        pool: str = "mean",
        batch_size: int = 16,
    ) -> None:
        self.sites = tuple(str(s) for s in sites)
        self.concepts = tuple(str(c) for c in concepts)
        if "{}" not in template:
            raise InputError(f"template must hold {{}} for the concept, not {template!r}")
        self.template = template
        self.top_k = positive_int("top_k", top_k)
        self.alpha = number("alpha", alpha)
        self.p_start, self.p_end = number("p_start", p_start), number("p_end", p_end)
        if not 0.0 < self.p_end <= self.p_start <= 1.0:
            raise InputError("need 0 < p_end <= p_start <= 1")
        if pool not in POOLS:
            raise InputError(f"pool must be one of {POOLS}, not {pool!r}")
        self.pool = pool
        self.batch_size = positive_int("batch_size", batch_size)

    def _vocabulary(self, vlm: VLM) -> list[str]:
        kept, dropped = spelled(vlm, list(self.concepts) or concept_vocabulary())
        if dropped:
            warnings.warn(f"{vlm.name}'s tokenizer cannot spell {dropped}; dropped", stacklevel=3)
        if len(kept) < 2:
            raise InputError(f"clip_dissect needs at least two concepts, has {kept}")
        return kept

    @torch.no_grad()
    def _embed(
        self, vlm: VLM, items: Sequence[BenchItem], sites: list[str], words: list[str]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Similarity ``(images, concepts)`` and pooled activations per site."""
        texts = [self.template.format(w) for w in words]
        out = vlm.forward(vlm.prepare([items[0].image], texts))
        text = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
        sims: list[np.ndarray] = []
        pooled: dict[str, list[np.ndarray]] = {s: [] for s in sites}
        for _, chunk in batches(items, self.batch_size):
            inputs = vlm.prepare([it.image for it in chunk], [it.prompt for it in chunk])
            with capture(vlm, sites) as cap:
                out = vlm.forward(inputs)
            image = torch.nn.functional.normalize(out.image_embeds.float(), dim=-1)
            sims.append((image @ text.T).cpu().numpy())
            for site in sites:
                value = cap[site].float().cpu()
                for b, rows in enumerate(token_rows(vlm, inputs, site, value)):
                    picked = value[b, [r[0] for r in rows]].numpy()
                    pooled[site].append(_pool(picked, [r[1] for r in rows], self.pool))
        return np.concatenate(sims), {s: np.stack(v) for s, v in pooled.items()}

    def __call__(
        self, vlm: VLM, items: Sequence[BenchItem], scenes: Sequence[Scene] | None = None
    ) -> DissectionResult:
        """``scenes``: the world scene of each item, to score the labels (default: matched
        by pixels; a user's items are labelled but not scored)."""
        words = self._vocabulary(vlm)
        if self.top_k * 10 > len(items):
            warnings.warn(
                f"top_k={self.top_k} is over a tenth of the {len(items)} images (the paper: 100 "
                "of ~50,000); B_k then holds weakly activating images and the labels blur",
                stacklevel=2,
            )
        sites = default_sites(vlm, self.sites)
        sim, pooled = self._embed(vlm, items, sites, words)
        try:
            found: list[Scene] | None = item_scenes(items, scenes)
        except InputError:
            found = None
        present = None
        if found is not None:
            truth = [image_concepts(s) for s in found]
            present = np.array([[w in t for w in words] for t in truth], dtype=bool)
        keys = ("site", "unit", "label", "score", "truth", "truth_lift")
        rows: dict[str, list[Any]] = {k: [] for k in keys}
        for site in sites:
            wpmi = soft_wpmi(sim, pooled[site], self.top_k, self.alpha, self.p_start, self.p_end)
            best = wpmi.argmax(1)
            rows["site"] += [site] * len(best)
            rows["unit"] += list(range(len(best)))
            rows["label"] += [words[b] for b in best]
            rows["score"] += wpmi[np.arange(len(best)), best].tolist()
            lift = None if present is None else top_lift(pooled[site], present, self.top_k)
            if lift is None or np.all(np.isnan(lift)):
                rows["truth"] += [""] * len(best)
                rows["truth_lift"] += [float("nan")] * len(best)
                continue
            filled = np.nan_to_num(lift, nan=-np.inf)
            rows["truth"] += [words[t] for t in filled.argmax(1)]
            rows["truth_lift"] += filled.max(1).tolist()
        return self._result(rows, words)

    def _result(self, rows: dict[str, list[Any]], words: list[str]) -> DissectionResult:
        labels, truth = np.asarray(rows["label"]), np.asarray(rows["truth"])
        scored = truth != ""
        same_word = np.array([bool(set(a.split()) & set(b.split())) for a, b in zip(labels, truth)])
        summary = {
            "units": len(labels),
            "concepts": words,
            "scored_units": int(scored.sum()),
            "agreement": float(np.mean(labels[scored] == truth[scored])) if scored.any() else None,
            "agreement_sharing_a_word": float(np.mean(same_word[scored])) if scored.any() else None,
            "chance_agreement": _chance(labels[scored], truth[scored]) if scored.any() else None,
            "label_kinds": kinds_summary(rows["label"]),
        }
        settings = {k: v for k, v in vars(self).items()}
        return DissectionResult(
            "clip_dissect",
            tuple((s, int(u)) for s, u in zip(rows["site"], rows["unit"])),
            tuple(rows["label"]),
            tuple(float(v) for v in rows["score"]),
            settings,
            table={
                k: v if k in ("site", "label", "truth") else np.asarray(v) for k, v in rows.items()
            },
            summary=summary,
        )
