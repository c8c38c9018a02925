"""First-token analysis (Zhao et al. 2024, "The first to know: how token distributions reveal
hidden knowledge in large vision-language models?").

The distribution of the first answer token (the next-token distribution after the prompt)
already tells answerable questions from unanswerable ones: this analysis reports, per class,
which tokens come first and how sure the model is of them, and fits a linear probe on the
first-token log-probabilities, scored by stratified cross-validation.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmscope.core.errors import InputError
from mmscope.core.registry import register
from mmscope.core.targets import Predicted, Target
from mmscope.core.validate import integer, number, valid_seed
from mmscope.methods.analysis import Analysis, Result, jsonable, new_figure
from mmscope.models.capabilities import require

if TYPE_CHECKING:
    from mmscope.core.inputs import Inputs
    from mmscope.models.base import VLM

CLASSES: tuple[str, str] = ("answerable", "unanswerable")


@torch.no_grad()
def first_token_logprobs(vlm: VLM, inputs: Inputs) -> torch.Tensor:
    """``(batch, vocab)`` log-softmax of the logits at the last position (float32, CPU)."""
    require(vlm, ("generates",), "the first-token analysis")
    out = vlm.forward(inputs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    return torch.log_softmax(logits[:, -1].float(), dim=-1).cpu()


def probe_scores(
    features: np.ndarray, labels: np.ndarray, folds: int, seed: int, c: float = 1.0
) -> np.ndarray:
    """Out-of-fold probabilities of the positive class: a standardised L2 logistic
    regression (scikit-learn) fitted on the other folds of a shuffled stratified k-fold."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    probe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(probe, features, labels, cv=cv, method="predict_proba")
    return np.asarray(scores[:, 1], dtype=float)


@dataclass(frozen=True, eq=False)
class FirstTokenResult(Result):
    """What the first answer token says about answerability.

    Attributes:
        labels: per item, True where the question is answerable.
        top_tokens: per item, the most probable first token.
        top_probs: per item, its probability.
        frequent: per class (``"answerable"``, ``"unanswerable"``), the most frequent top
            tokens with the share of the class's items they top, most frequent first.
        mean_top_prob: per class, the mean probability of the top token (None: no items).
        probe_scores: per item, the probe's out-of-fold probability of "answerable".
        accuracy: the probe's cross-validated accuracy (threshold 0.5).
        auc: the probe's ROC AUC on the out-of-fold probabilities.
        folds: cross-validation folds.

    The probe's fields are None where a class has fewer than ``folds`` items.
    """

    labels: tuple[bool, ...]
    top_tokens: tuple[str, ...]
    top_probs: np.ndarray
    frequent: dict[str, list[tuple[str, float]]]
    mean_top_prob: dict[str, float | None]
    probe_scores: np.ndarray | None
    accuracy: float | None
    auc: float | None
    folds: int

    @property
    def n(self) -> int:
        return len(self.labels)

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "analysis": "first_token",
                "labels": list(self.labels),
                "top_tokens": list(self.top_tokens),
                "top_probs": self.top_probs.tolist(),
                "frequent": {k: [list(t) for t in v] for k, v in self.frequent.items()},
                "mean_top_prob": dict(self.mean_top_prob),
                "probe_scores": None if self.probe_scores is None else self.probe_scores.tolist(),
                "accuracy": self.accuracy,
                "auc": self.auc,
                "folds": self.folds,
                "n": self.n,
            }
        )

    def plot(self, ax: Any = None) -> Any:
        """Histogram of the top first-token probability per class; the probe's AUC on top."""
        fig, ax = new_figure(5.0, 3.5, ax)
        labels = np.asarray(self.labels, dtype=bool)
        bins = np.linspace(0.0, 1.0, 21)
        for name, chosen, color in ((CLASSES[0], labels, "C0"), (CLASSES[1], ~labels, "C3")):
            ax.hist(self.top_probs[chosen], bins=bins, alpha=0.6, color=color, label=name)
        ax.set_xlabel("probability of the top first token")
        ax.set_ylabel("items")
        ax.legend(fontsize=8)
        probe = (
            "too few items for the probe"
            if self.auc is None or self.accuracy is None
            else f"probe AUC {self.auc:.2f}, accuracy {self.accuracy:.2f} ({self.folds}-fold)"
        )
        ax.set_title(f"first token: {probe}, n={self.n}", fontsize=9)
        return fig


@register(
    "first_token",
    kind="analysis",
    family="inside/first-token",
    paper="Zhao et al. 2024",
    level="model/token",
    needs=("generates",),
)
class FirstToken(Analysis):
    """First answer token's distribution and a linear probe for answerability (Zhao et al. 2024).

    Per item the log-softmax of the logits at the last position (the first answer token) is
    the feature vector; a standardised logistic regression (scikit-learn, L2 with ``c``)
    separates answerable from unanswerable items, scored out of fold by a shuffled
    ``StratifiedKFold(folds, random_state=seed)``: accuracy and ROC AUC.

    Args:
        folds: cross-validation folds (with fewer items than this in a class, the result has
            the distributions only, and a warning says so).
        seed: shuffles the folds.
        top: how many frequent top tokens to report per class.
        c: inverse regularisation strength of the probe.
    """

    def __init__(self, folds: int = 5, seed: int = 0, top: int = 5, c: float = 1.0) -> None:
        self.folds = integer("folds", folds, minimum=2)
        self.seed = valid_seed(seed)
        self.top = integer("top", top, minimum=1)
        self.c = number("c", c)
        if self.c <= 0:
            raise InputError(f"c must be positive, not {c}")

    def __call__(
        self,
        vlm: VLM,
        inputs: Inputs,
        target: Target | None = None,
        labels: Sequence[bool] | None = None,
    ) -> FirstTokenResult:
        if target is not None and not isinstance(target, Predicted):
            raise InputError(
                "the first-token analysis reads the whole first-token distribution; "
                f"leave target unset, not {target!r}"
            )
        flags = _labels(labels, inputs.batch_size)
        logp = first_token_logprobs(vlm, inputs)
        top_p, top_i = logp.exp().max(-1)
        names = tuple(str(t) for t in vlm.tokenizer.convert_ids_to_tokens(top_i.tolist()))
        probs = top_p.numpy().astype(float)
        frequent: dict[str, list[tuple[str, float]]] = {}
        mean_top: dict[str, float | None] = {}
        for name, chosen in ((CLASSES[0], flags), (CLASSES[1], ~flags)):
            tokens = [t for t, keep in zip(names, chosen) if keep]
            counts = Counter(tokens).most_common(self.top)
            frequent[name] = [(t, c / len(tokens)) for t, c in counts]
            mean_top[name] = float(probs[chosen].mean()) if tokens else None
        scores, accuracy, auc = None, None, None
        fewest = min(int(flags.sum()), int((~flags).sum()))
        if fewest >= self.folds:
            from sklearn.metrics import roc_auc_score

            scores = probe_scores(logp.numpy(), flags, self.folds, self.seed, self.c)
            accuracy = float(np.mean((scores >= 0.5) == flags))
            auc = float(roc_auc_score(flags, scores))
        else:
            warnings.warn(
                f"{self.folds}-fold cross-validation needs at least {self.folds} items of each "
                f"class; the smaller class has {fewest}: no probe, only the distributions",
                stacklevel=2,
            )
        return FirstTokenResult(
            labels=tuple(bool(f) for f in flags),
            top_tokens=names,
            top_probs=probs,
            frequent=frequent,
            mean_top_prob=mean_top,
            probe_scores=scores,
            accuracy=accuracy,
            auc=auc,
            folds=self.folds,
        )


def _labels(labels: Sequence[bool] | None, batch: int) -> np.ndarray:
    if labels is None:
        raise InputError("the first-token analysis needs labels: one bool per item (answerable)")
    if isinstance(labels, (str, bytes)) or len(labels) != batch:
        raise InputError(f"labels must be one bool per item ({batch}), not {labels!r}")
    return np.asarray([bool(x) for x in labels], dtype=bool)
