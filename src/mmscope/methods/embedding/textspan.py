"""TextSpan: text descriptions of CLIP's attention heads, and which components matter
(Gandelsman et al. 2024, "Interpreting CLIP's Image Representation via Text-Based
Decomposition").

The image embedding splits into direct contributions of heads and MLPs
(``textspan_decompose``). Per head of the last ``layers`` layers its contributions (divided by
each image's embedding norm, as the paper decomposes the normalised representation) are centred
over images; the text pool's embeddings are projected onto the span of the top ``rank`` right
singular vectors; then ``m`` times the text whose projection of the contributions has the
largest variance is chosen and projected out of both the contributions and the texts (the
released code's ``replace_with_iterative_removal``; we centre before the SVD, as the paper's
text says). Mean-ablation replaces a component's direct contribution by its mean over images
and reports the change in zero-shot accuracy over ``labels``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mmscope.core.errors import InputError
from mmscope.core.registry import register
from mmscope.core.validate import positive_int
from mmscope.methods.analysis import Result, jsonable, new_figure
from mmscope.methods.embedding.clip_embed import (
    needs_class_token,
    present_concepts,
    spelled,
    text_embeddings,
)
from mmscope.methods.embedding.textspan_decompose import Decomposition, decompose
from mmscope.methods.study import KIND, Study
from mmscope.world import concept_vocabulary

if TYPE_CHECKING:
    from mmscope.models.base import VLM
    from mmscope.world.items import BenchItem


def greedy_texts(data: np.ndarray, texts: np.ndarray, m: int, rank: int) -> list[tuple[int, float]]:
    """TextSpan's greedy choice: ``m`` (text index, share of the variance it removes).

    Args:
        data: ``(images, d)`` one head's contributions.
        texts: ``(texts, d)`` text embeddings.
        m: texts to choose.
        rank: right singular vectors of the centred data spanning the texts' projection.
    """
    data = data - data.mean(0)
    total = float((data**2).sum())
    if total <= 0:
        return []
    _, _, vh = np.linalg.svd(data, full_matrices=False)
    basis = vh[:rank]
    texts = texts @ basis.T @ basis
    out: list[tuple[int, float]] = []
    for _ in range(min(m, len(texts))):
        spread = (data @ texts.T).std(0)
        best = int(np.argmax(spread))
        t = texts[best]
        norm = float(t @ t)
        if spread[best] <= 1e-12 or norm <= 1e-12:
            break
        removed = np.outer(data @ t / norm, t)
        out.append((best, float((removed**2).sum()) / total))
        data = data - removed
        texts = texts - np.outer(texts @ t / norm, t)
    return out


def zero_shot(embeddings: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Index of the best class per image (cosine with normalised class embeddings)."""
    norm = np.linalg.norm(embeddings, axis=-1, keepdims=True)
    return np.argmax(embeddings / np.maximum(norm, 1e-12) @ classes.T, axis=-1)


@dataclass(frozen=True)
class TextSpanResult(Result):
    """Per-head text descriptions and mean-ablation of components.

    Attributes:
        layers: the layers whose heads are described.
        texts: per ``(layer, head)``, the chosen texts with their share of the head's variance.
        head_variance: ``(len(layers), heads)`` each head's share of the described heads'
            total variance.
        accuracy: zero-shot accuracy of the intact embeddings.
        ablation: ``(component, accuracy)`` with the component mean-ablated.
    """

    layers: tuple[int, ...]
    texts: dict[tuple[int, int], tuple[tuple[str, float], ...]]
    head_variance: np.ndarray
    accuracy: float
    ablation: tuple[tuple[str, float], ...]

    def tables(self) -> dict[str, dict[str, Any]]:
        """``texts``: (layer, head, rank, text, share); ``ablation``: (component, accuracy,
        drop)."""
        rows = [
            (ly, h, r, t, s) for (ly, h), ts in self.texts.items() for r, (t, s) in enumerate(ts)
        ]
        return {
            "texts": {
                "layer": [r[0] for r in rows],
                "head": [r[1] for r in rows],
                "rank": [r[2] for r in rows],
                "text": [r[3] for r in rows],
                "share": [r[4] for r in rows],
            },
            "ablation": {
                "component": [c for c, _ in self.ablation],
                "accuracy": [a for _, a in self.ablation],
                "drop": [self.accuracy - a for _, a in self.ablation],
            },
        }

    def drop(self, component: str) -> float:
        """Accuracy lost when ``component`` is mean-ablated."""
        return self.accuracy - dict(self.ablation)[component]

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "study": "textspan",
                "layers": list(self.layers),
                "accuracy": self.accuracy,
                "heads": [
                    {"layer": ly, "head": h, "texts": [list(t) for t in ts]}
                    for (ly, h), ts in self.texts.items()
                ],
                "head_variance": self.head_variance,
                "ablation": [{"component": c, "accuracy": a} for c, a in self.ablation],
            }
        )

    def plot(self, ax: Any = None) -> Any:
        """Accuracy lost by mean-ablating each single head and MLP."""
        fig, ax = new_figure(8, 3, ax)
        single = [(c, self.accuracy - a) for c, a in self.ablation if c.count(".") == 1]
        ax.bar(range(len(single)), [d for _, d in single], color="tab:red")
        ax.set_xticks(range(len(single)), [c for c, _ in single], rotation=90, fontsize=6)
        ax.set_ylabel("accuracy drop", fontsize=8)
        ax.set_title(f"TextSpan mean-ablation (intact accuracy {self.accuracy:.3f})", fontsize=9)
        return fig


def _ablations(parts: Decomposition, first: int) -> list[tuple[str, np.ndarray]]:
    """(name, mean-ablated embeddings) for every head, MLP, layer and group."""
    _, n, h, _ = parts.heads.shape
    out = [("embed", parts.ablated(embed=True))]
    for layer in range(n):
        for head in range(h):
            mask = np.zeros((n, h), bool)
            mask[layer, head] = True
            out.append((f"L{layer}.H{head}", parts.ablated(heads=mask)))
        mlp = np.zeros(n, bool)
        mlp[layer] = True
        out.append((f"L{layer}.mlp", parts.ablated(mlps=mlp)))
        out.append(
            (
                f"L{layer} heads",
                parts.ablated(heads=np.eye(n, dtype=bool)[layer][:, None].repeat(h, 1)),
            )
        )
    out.append(("all mlps", parts.ablated(mlps=np.ones(n, bool))))
    out.append(("all heads", parts.ablated(heads=np.ones((n, h), bool))))
    if first > 0:
        early = np.zeros((n, h), bool)
        early[:first] = True
        out.append((f"heads of L0-L{first - 1}", parts.ablated(heads=early)))
    return out


@register(
    "textspan",
    kind=KIND,
    family="embedding/decomposition",
    paper="Gandelsman et al. 2024",
    level="model/embedding",
    needs=("contrastive", "class_token"),
)
class TextSpan(Study):
    """TextSpan over the items' images (Gandelsman et al. 2024).

    Args:
        layers: the last ``layers`` vision layers whose heads are described.
        m: texts chosen per head.
        rank: right singular vectors spanning the texts' projection (the paper: 80).
        texts: the text pool (default: ``"a {concept}"`` of the world's concepts and the
            captions of ``captions`` world scenes, seed 7); texts with unknown words are dropped.
        captions: world captions added to the default pool.
        labels: zero-shot classes, each scored as ``"a {label}"`` (default: the world's
            ``"color shape"`` names).
        batch_size: images per forward.
    """

    def __init__(
        self,
        layers: int = 4,
        m: int = 5,
        rank: int = 80,
        texts: tuple[str, ...] = (),
        captions: int = 40,
        labels: tuple[str, ...] = (),
        batch_size: int = 32,
    ) -> None:
        self.layers = positive_int("layers", layers)
        self.m = positive_int("m", m)
        self.rank = positive_int("rank", rank)
        self.texts = tuple(str(t) for t in texts)
        self.captions = positive_int("captions", captions)
        self.labels = tuple(str(t) for t in labels)
        self.batch_size = positive_int("batch_size", batch_size)

    def _pool(self, vlm: VLM) -> list[str]:
        if self.texts:
            return spelled(vlm, dict.fromkeys(self.texts))[0]
        from mmscope.world import caption, make_samples

        pool = [f"a {c}" for c in concept_vocabulary()]
        pool += [caption(s.scene) for s in make_samples(self.captions, seed=7)]
        return spelled(vlm, dict.fromkeys(pool))[0]

    def __call__(
        self,
        vlm: VLM,
        items: Sequence[BenchItem],
        present: Sequence[Iterable[str]] | None = None,
    ) -> TextSpanResult:
        """``present``: per item, the concepts in its image (by default read from the items'
        world scenes); a prediction is then right when it
        names an object present, else when it is the item's own prompt."""
        needs_class_token(vlm, "textspan")
        if len(items) < 2:
            raise InputError("textspan centres contributions over images: give >= 2 items")
        sets = present_concepts(items, present)
        from mmscope.world.scene import COLORS, SHAPES

        images = [it.image for it in items]
        chunks = [
            decompose(vlm, vlm.pixel_values_of(images[i : i + self.batch_size]))
            for i in range(0, len(images), self.batch_size)
        ]
        parts = Decomposition(
            embed=np.concatenate([c.embed for c in chunks]),
            heads=np.concatenate([c.heads for c in chunks]),
            mlps=np.concatenate([c.mlps for c in chunks]),
            bias=chunks[0].bias,
        )
        pool = self._pool(vlm)
        wanted = self.labels or tuple(f"{c} {s}" for c in COLORS for s in SHAPES)
        classes = spelled(vlm, [f"a {label}" for label in wanted])[0]
        if not pool or len(classes) < 2:
            raise InputError("the text pool is empty or fewer than 2 labels can be spelled")
        pool_emb = text_embeddings(vlm, pool, images[0]).numpy()
        class_emb = text_embeddings(vlm, classes, images[0]).numpy()
        n, heads = parts.heads.shape[1:3]
        first = max(0, n - self.layers)
        scale = np.linalg.norm(parts.total(), axis=-1)[:, None]
        texts: dict[tuple[int, int], tuple[tuple[str, float], ...]] = {}
        variance = np.zeros((n - first, heads))
        for layer in range(first, n):
            for head in range(heads):
                data = parts.heads[:, layer, head] / scale
                variance[layer - first, head] = float(data.var(0).sum())
                chosen = greedy_texts(data, pool_emb, self.m, self.rank)
                texts[(layer, head)] = tuple((pool[i], share) for i, share in chosen)

        def accuracy(emb: np.ndarray) -> float:
            pred = zero_shot(emb, class_emb)
            if sets is None:
                return float(np.mean([classes[j] == it.prompt for it, j in zip(items, pred)]))
            return float(np.mean([classes[j][2:] in s for s, j in zip(sets, pred)]))

        return TextSpanResult(
            layers=tuple(range(first, n)),
            texts=texts,
            head_variance=variance / max(variance.sum(), 1e-12),
            accuracy=accuracy(parts.total()),
            ablation=tuple((name, accuracy(emb)) for name, emb in _ablations(parts, first)),
        )
