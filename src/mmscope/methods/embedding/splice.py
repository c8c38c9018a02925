"""SpLiCE: sparse, non-negative decompositions of CLIP image embeddings into concepts
(Bhalla et al. 2024, "Interpreting CLIP with Sparse Linear Concept Embeddings").

Each concept is embedded by CLIP's text tower from ``template.format(concept)`` (default
``"a {}"``, the form of the world's captions). Concept embeddings are L2-normalised, centred by
their mean and normalised again; image embeddings likewise, centred by their mean over the
study's items (the paper centres by a modality mean over a dataset, MSCOCO; here the dataset is
the items). Per image, ``min_{w>=0} ||z - C^T w||^2 + lambda ||w||_1`` is solved by
scikit-learn's ``Lasso(positive=True, alpha=lambda / (2 d))`` (its objective is the same divided
by ``2 d``, ``d`` the embedding size).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from mmscope.core.errors import InputError
from mmscope.core.registry import register
from mmscope.core.validate import number, positive_int
from mmscope.methods.analysis import Result, jsonable, new_figure
from mmscope.methods.embedding.clip_embed import (
    image_embeddings,
    needs_clip,
    present_concepts,
    spelled,
    text_embeddings,
)
from mmscope.methods.study import KIND, Study
from mmscope.world import concept_vocabulary

if TYPE_CHECKING:
    from mmscope.models.base import VLM
    from mmscope.world.items import BenchItem


def centred(x: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """Rows of ``x`` minus ``mean``, L2-normalised (zero rows stay zero)."""
    x = x - mean
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def decompose(z: np.ndarray, dictionary: np.ndarray, lam: float) -> np.ndarray:
    """``(images, concepts)`` non-negative weights: per row of ``z``, the minimiser of
    ``||z - dictionary^T w||^2 + lam ||w||_1`` (scikit-learn's positive Lasso)."""
    from sklearn.linear_model import Lasso

    d = dictionary.shape[1]
    lasso = Lasso(alpha=lam / (2 * d), positive=True, fit_intercept=False, max_iter=10_000)
    x = dictionary.T.astype(np.float64)
    return np.stack([lasso.fit(x, row.astype(np.float64)).coef_.copy() for row in z])


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine (0 where a row is zero)."""
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)


@dataclass(frozen=True)
class SpliceResult(Result):
    """Sparse concept decompositions of image embeddings.

    Attributes:
        concepts: the dictionary's concepts (columns of ``weights``).
        weights: ``(images, concepts)`` non-negative weights.
        cosine: per image, cosine of ``C^T w`` with the centred embedding (what is fitted).
        cosine_full: per image, cosine of the reconstruction with the mean added back and the
            original embedding (SpLiCE's reported cosine).
        lam: the l1 penalty.
        k: concepts shown per image.
        present: per image, the concepts really in it (``None`` where unknown).
        dropped: concepts left out because the tokenizer cannot spell them.
    """

    concepts: tuple[str, ...]
    weights: np.ndarray
    cosine: np.ndarray
    cosine_full: np.ndarray
    lam: float
    k: int
    present: tuple[frozenset[str], ...] | None = None
    dropped: tuple[str, ...] = ()

    @property
    def l0(self) -> np.ndarray:
        """Per image, the number of nonzero weights."""
        return (self.weights > 0).sum(-1)

    def _chosen(self, image: int, k: int | None) -> list[int]:
        row = self.weights[image]
        return [int(j) for j in np.argsort(-row, kind="stable") if row[j] > 0][:k]

    def top(self, image: int) -> list[tuple[str, float]]:
        """The image's nonzero concepts, largest weight first, at most ``k``."""
        return [
            (self.concepts[j], float(self.weights[image, j])) for j in self._chosen(image, self.k)
        ]

    def precision(self, k: int | None = None) -> float:
        """Share of the chosen concepts (top ``k`` nonzero, or all nonzero when ``None``)
        that are present, pooled over images; NaN without ground truth or choices."""
        if self.present is None:
            return float("nan")
        hits = total = 0
        for i, present in enumerate(self.present):
            chosen = self._chosen(i, k)
            hits += sum(self.concepts[j] in present for j in chosen)
            total += len(chosen)
        return hits / total if total else float("nan")

    def tables(self) -> dict[str, dict[str, Any]]:
        """``images``: per image its sparsity, cosines and top concepts; ``weights``: every
        nonzero (image, concept, weight)."""
        tops = [self.top(i) for i in range(len(self.weights))]
        rows, cols = np.nonzero(self.weights)
        return {
            "images": {
                "image": np.arange(len(self.weights)),
                "l0": self.l0,
                "cosine": self.cosine,
                "cosine_full": self.cosine_full,
                "top": ["; ".join(f"{c}:{w:.3f}" for c, w in t) for t in tops],
            },
            "weights": {
                "image": rows,
                "concept": [self.concepts[j] for j in cols],
                "weight": self.weights[rows, cols],
            },
        }

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "study": "splice",
                "lam": self.lam,
                "concepts": list(self.concepts),
                "dropped": list(self.dropped),
                "mean_l0": float(self.l0.mean()),
                "mean_cosine": float(self.cosine.mean()),
                "mean_cosine_full": float(self.cosine_full.mean()),
                "precision_at_1": self.precision(1),
                "precision_at_k": self.precision(self.k),
                "precision_nonzero": self.precision(None),
                "top": [self.top(i) for i in range(len(self.weights))],
            }
        )

    def plot(self, ax: Any = None) -> Any:
        """Mean weight per concept over images (the concepts ever used)."""
        fig, ax = new_figure(8, 3, ax)
        mean = self.weights.mean(0)
        used = np.flatnonzero(mean > 0)
        used = used[np.argsort(-mean[used], kind="stable")]
        ax.bar(range(len(used)), mean[used], color="tab:blue")
        ax.set_xticks(range(len(used)), [self.concepts[j] for j in used], rotation=90, fontsize=7)
        ax.set_ylabel("mean weight", fontsize=8)
        ax.set_title(
            f"SpLiCE (lambda={self.lam}): mean L0 {self.l0.mean():.2f}, "
            f"cosine {self.cosine.mean():.3f}",
            fontsize=9,
        )
        return fig


@register(
    "splice",
    kind=KIND,
    family="embedding/concept",
    paper="Bhalla et al. 2024",
    level="model/embedding",
    needs=("contrastive",),
)
class Splice(Study):
    """SpLiCE over the items' images (Bhalla et al. 2024).

    Args:
        lam: the l1 penalty lambda (the paper's practical range is about 0.2-0.3).
        k: top concepts reported per image (and for precision@k).
        vocabulary: the concepts (default: the world's, ``world.concept_vocabulary``); concepts the
            tokenizer cannot spell are dropped (and listed in the result).
        template: the text embedded for a concept.
        batch_size: images per forward.
    """

    def __init__(
        self,
        lam: float = 0.25,
        k: int = 3,
        vocabulary: tuple[str, ...] = (),
        template: str = "a {}",
        batch_size: int = 32,
    ) -> None:
        self.lam = number("lam", lam)
        if self.lam < 0:
            raise InputError(f"lam must be >= 0, not {lam}")
        self.k = positive_int("k", k)
        self.vocabulary = tuple(str(v) for v in vocabulary)
        if "{}" not in template:
            raise InputError(f"template needs a '{{}}' for the concept, got {template!r}")
        self.template = template
        self.batch_size = positive_int("batch_size", batch_size)

    def __call__(
        self,
        vlm: VLM,
        items: Sequence[BenchItem],
        present: Sequence[Iterable[str]] | None = None,
    ) -> SpliceResult:
        """``present``: per item, the concepts really in its image (by default read from the
        items' world scenes; a user's items have none), for the decomposition's precision."""
        needs_clip(vlm, "splice")
        if len(items) < 2:
            raise InputError("splice centres image embeddings by their mean: give >= 2 items")
        truth = present_concepts(items, present)
        wanted = list(dict.fromkeys(self.vocabulary or concept_vocabulary()))
        concepts, dropped = spelled(vlm, [self.template.format(c) for c in wanted])
        keep = [c for c in wanted if self.template.format(c) in concepts]
        if len(keep) < 2:
            raise InputError(f"fewer than 2 concepts the tokenizer can spell (dropped {dropped})")
        text = text_embeddings(vlm, concepts, items[0].image).numpy()
        dictionary = centred(text, text.mean(0))
        images = image_embeddings(vlm, [it.image for it in items], self.batch_size).numpy()
        mean = images.mean(0)
        z = centred(images, mean)
        weights = decompose(z, dictionary, self.lam)
        recon = weights @ dictionary
        full = recon + mean
        full = full / np.maximum(np.linalg.norm(full, axis=-1, keepdims=True), 1e-12)
        return SpliceResult(
            concepts=tuple(keep),
            weights=weights,
            cosine=cosine(recon, z),
            cosine_full=cosine(full, images),
            lam=self.lam,
            k=self.k,
            present=None if truth is None else tuple(truth),
            dropped=tuple(c for c in wanted if c not in keep),
        )
