"""Object hallucination: POPE (Li et al. 2023) and CHAIR (Rohrbach et al. 2018).

POPE asks "is there a X in the image?" about present and absent objects and scores the
yes/no answers (positive class "yes"); CHAIR counts the objects a caption mentions that are
not in the image. Both run on the world's held-out scenes by default; POPE also reads the
official POPE JSONL format (``load_pope_jsonl``) so it runs on a user's own probes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from mmscope.core.errors import InputError
from mmscope.core.registry import register
from mmscope.core.result import Result, new_figure
from mmscope.metrics.base import LEVEL, bootstrap_ci, bootstrap_interval
from mmscope.models.capabilities import require
from mmscope.world import DESCRIBE_PROMPT, pope_questions, render, sample_scenes
from mmscope.world.captions import caption_objects
from mmscope.world.seeds import EVAL_SEED

if TYPE_CHECKING:
    from mmscope.core.images import ImageLike
    from mmscope.models.base import VLM

_YES = re.compile(r"\s*yes\b", re.IGNORECASE)


def _says_yes(answer: str) -> bool:
    """An answer is "yes" when its first word is "yes" (any case, punctuation ignored)."""
    return bool(_YES.match(answer))


def _confusion(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    tp = float(np.sum(pred & truth))
    precision = tp / pred.sum() if pred.sum() else 0.0
    recall = tp / truth.sum() if truth.sum() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    scores = (np.mean(pred == truth), precision, recall, f1, np.mean(pred))
    return {
        k: float(v) for k, v in zip(("accuracy", "precision", "recall", "f1", "yes_ratio"), scores)
    }


def _yes_no(answers: Sequence[str], truths: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Predicted and true "yes" as boolean arrays (checked: same length, truths yes/no)."""
    if len(answers) != len(truths):
        raise InputError(f"{len(answers)} answers for {len(truths)} truths")
    if not answers:
        raise InputError("no POPE answers to score")
    bad = sorted({t for t in truths if t.strip().lower() not in ("yes", "no")})
    if bad:
        raise InputError(f"POPE truths must be 'yes' or 'no', got {bad[:3]}")
    pred = np.array([_says_yes(a) for a in answers])
    return pred, np.array([t.strip().lower() == "yes" for t in truths])


def pope_scores(answers: Sequence[str], truths: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive class "yes"), yes-ratio and ``n``; an
    answer is "yes" when its first word is. Bad input (lengths, truths) raises InputError."""
    return {**_confusion(*_yes_no(answers, truths)), "n": len(answers)}


def _mentions(
    captions: Sequence[str], present: Sequence[set[str]]
) -> tuple[list[list[str]], list[list[str]]]:
    """Per caption, its object mentions and the hallucinated ones among them."""
    if len(captions) != len(present):
        raise InputError(f"{len(captions)} captions for {len(present)} object sets")
    found = [caption_objects(c) for c in captions]
    return found, [[m for m in f if m not in p] for f, p in zip(found, present)]


def chair_scores(captions: Sequence[str], present: Sequence[set[str]]) -> dict[str, float]:
    """CHAIR_i (hallucinated mentions / mentions) and CHAIR_s (captions with a hallucinated
    object / captions); ``present[i]`` holds the ``"color shape"`` names in image ``i``."""
    found, wrong = _mentions(captions, present)
    mentions, hallucinated = sum(map(len, found)), sum(map(len, wrong))
    bad = sum(bool(w) for w in wrong)
    return {
        "chair_i": hallucinated / max(1, mentions),
        "chair_s": bad / max(1, len(captions)),
        "mentions": mentions,
        "hallucinated": hallucinated,
        "n": len(captions),
    }


@dataclass(frozen=True)
class PopeItem:
    """One yes/no probe: the image (a path or PIL image), the question and the truth."""

    image: ImageLike
    text: str
    label: str
    object: str = ""
    question_id: Any = None


def load_pope_jsonl(
    path: str | Path, images_dir: str | Path | None = None, *, allow_large: bool = False
) -> list[PopeItem]:
    """Probes in the official POPE format, one JSON object a line:
    ``{"question_id": 1, "image": "x.jpg", "text": "Is there a dog in the image?",
    "label": "yes"}`` ("question" is accepted for "text", "answer" for "label").
    Images are looked up in ``images_dir`` (default: the file's folder); each one's header is
    checked now, with the 50-megapixel guard unless ``allow_large`` (``core.images``)."""
    from mmscope.core.images import MAX_PIXELS, load_image, probe_image
    from mmscope.core.jsonl import records

    path = Path(path)
    folder = Path(images_dir) if images_dir is not None else path.parent
    items: list[PopeItem] = []
    images: dict[Path, Any] = {}  # each image file is checked once
    for no, row in records(path):
        where = f"{path}, line {no}"
        text, label = row.get("text", row.get("question")), row.get("label", row.get("answer"))
        if not isinstance(row.get("image"), str) or not isinstance(text, str):
            raise InputError(f"{where}: needs 'image' and 'text' (or 'question') strings")
        if not isinstance(label, str) or label.strip().lower() not in ("yes", "no"):
            raise InputError(f"{where}: label must be 'yes' or 'no', got {label!r}")
        image = folder / row["image"]
        if image not in images:
            try:
                width, height = probe_image(image, allow_large=allow_large)
            except InputError as err:
                raise InputError(f"{where}: {err}") from None
            large = width * height > MAX_PIXELS  # allowed: read now, past the guard
            images[image] = load_image(image, allow_large=True) if large else image
        answer = label.strip().lower()
        items.append(PopeItem(images[image], text, answer, "", row.get("question_id")))
    if not items:
        raise InputError(f"POPE file {path} has no probes")
    return items


@dataclass(frozen=True)
class HallucinationResult(Result):
    """Scores of one hallucination metric, their 95% intervals, and every item's record."""

    metric: str
    scores: dict[str, float]
    per_item: tuple[dict[str, Any], ...] = field(repr=False)
    ci: dict[str, tuple[float, float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        ci = {k: [float(lo), float(hi)] for k, (lo, hi) in self.ci.items()}
        return {"metric": self.metric, **self.scores, "ci": ci, "settings": self.settings}

    def record(self) -> dict[str, Any]:
        """``to_dict`` with the per-item records (what ``save`` writes)."""
        return {**self.to_dict(), "per_item": list(self.per_item)}

    def plot(self, ax: Any = None) -> Any:
        """Bar chart of the rates, with their intervals where known."""
        fig, ax = new_figure(4, 3, ax)
        names = [k for k, v in self.scores.items() if isinstance(v, float)]
        values = [self.scores[k] for k in names]
        ci = np.array([self.ci.get(k, (v, v)) for k, v in zip(names, values)]).reshape(-1, 2)
        err = np.abs(ci.T - np.array(values))
        ax.bar(names, values, yerr=err, color="#4c72b0", capsize=3)
        ax.set_ylim(0, 1)
        split = self.settings.get("split")
        ax.set_title(f"{self.metric}" + (f" ({split})" if split else ""), fontsize=9)
        ax.tick_params(axis="x", labelsize=8)
        return fig


def _answerer(vlm: VLM, metric: str) -> None:
    require(vlm, ("generates",), metric)


def _generate(
    vlm: VLM,
    images: list[Any],
    prompts: list[str],
    batch: int,
    tokens: int,
    decoder: str = "greedy",
    settings: dict[str, Any] | None = None,
) -> list[str]:
    from mmscope.decoding import make_decoder

    decode = make_decoder(decoder, **(settings or {}))
    out: list[str] = []
    for i in range(0, len(prompts), batch):
        inputs = vlm.prepare(images[i : i + batch], prompts[i : i + batch])
        out.extend(decode(vlm, inputs, tokens))
    return out


@register(
    "pope",
    kind="metric",
    family="metric/hallucination",
    paper="Li et al. 2023",
    level=LEVEL,
    needs=("generates",),
)
class Pope:
    """POPE: yes/no existence probes, half about absent objects (random, popular, or
    co-occurring "adversarial" ones); headline F1 of "yes". Answers come from a registered
    ``decoder`` (``mmscope.decoding``) with ``decoder_settings``."""

    category: ClassVar[str] = "hallucination"
    higher_is_better: ClassVar[bool] = True

    def __init__(
        self,
        split: str = "adversarial",
        n_images: int = 100,
        seed: int = EVAL_SEED,
        batch_size: int = 50,
        per_image: int = 3,
        decoder: str = "greedy",
        decoder_settings: dict[str, Any] | None = None,
    ) -> None:
        from mmscope.world import POPE_SPLITS

        if split not in POPE_SPLITS:
            raise InputError(f"unknown POPE split {split!r}; expected one of {POPE_SPLITS}")
        if n_images < 1 or batch_size < 1 or per_image < 1:
            raise InputError("n_images, batch_size and per_image must be at least 1")
        self.split, self.n_images, self.seed = split, n_images, seed
        self.batch_size, self.per_image = batch_size, per_image
        self.decoder, self.decoder_settings = decoder, dict(decoder_settings or {})

    def __call__(self, vlm: VLM, data: Sequence[PopeItem] | None = None) -> HallucinationResult:
        _answerer(vlm, "POPE")
        if data is None:  # the world's probes for this split on held-out scenes
            scenes = sample_scenes(self.n_images, self.seed)
            images = [render(s).image for s in scenes]
            qs = pope_questions(scenes, self.split, self.seed, self.per_image)
            data = [
                PopeItem(images[q.image_index], q.text, q.answer, q.object, i)
                for i, q in enumerate(qs)
            ]
            settings = {**vars(self)}
        else:
            settings = {"split": "data", "n_items": len(data), "decoder": self.decoder}
        items = list(data)
        answers = _generate(
            vlm,
            [it.image for it in items],
            [it.text for it in items],
            self.batch_size,
            4,
            self.decoder,
            self.decoder_settings,
        )
        pred, truth = _yes_no(answers, [it.label for it in items])
        scores = {**_confusion(pred, truth), "n": len(items)}
        ci = {
            "accuracy": bootstrap_ci((pred == truth).astype(float), seed=self.seed),
            "f1": bootstrap_interval(
                (pred, truth), lambda p, t: _confusion(p, t)["f1"], seed=self.seed
            ),
        }
        per_item = tuple(
            {
                "question_id": it.question_id,
                "image": str(it.image) if isinstance(it.image, (str, Path)) else None,
                "object": it.object,
                "question": it.text,
                "label": it.label,
                "answer": a,
                "correct": bool(p == t),
            }
            for it, a, p, t in zip(items, answers, pred, truth)
        )
        return HallucinationResult("pope", scores, per_item, ci, settings)


@register(
    "chair",
    kind="metric",
    family="metric/hallucination",
    paper="Rohrbach et al. 2018",
    level=LEVEL,
    needs=("generates",),
)
class Chair:
    """CHAIR on captions of held-out world scenes (the world's describe prompt), decoded by a
    registered ``decoder`` with ``decoder_settings``."""

    category: ClassVar[str] = "hallucination"
    higher_is_better: ClassVar[bool] = False

    def __init__(
        self,
        n_images: int = 100,
        seed: int = EVAL_SEED,
        batch_size: int = 50,
        max_new_tokens: int = 24,
        decoder: str = "greedy",
        decoder_settings: dict[str, Any] | None = None,
    ) -> None:
        if n_images < 1 or batch_size < 1 or max_new_tokens < 1:
            raise InputError("n_images, batch_size and max_new_tokens must be at least 1")
        self.n_images, self.seed = n_images, seed
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.decoder, self.decoder_settings = decoder, dict(decoder_settings or {})

    def __call__(self, vlm: VLM) -> HallucinationResult:
        _answerer(vlm, "CHAIR")
        scenes = sample_scenes(self.n_images, self.seed)
        images = [render(s).image for s in scenes]
        captions = _generate(
            vlm,
            images,
            [DESCRIBE_PROMPT] * len(scenes),
            self.batch_size,
            self.max_new_tokens,
            self.decoder,
            self.decoder_settings,
        )
        present = [{o.name for o in s.objects} for s in scenes]
        scores = chair_scores(captions, present)
        found, wrong = _mentions(captions, present)
        n_found = np.array([len(f) for f in found], dtype=float)
        n_wrong = np.array([len(w) for w in wrong], dtype=float)
        ci = {
            "chair_i": bootstrap_interval(
                (n_wrong, n_found), lambda w, f: w.sum() / max(1.0, f.sum()), seed=self.seed
            ),
            "chair_s": bootstrap_ci((n_wrong > 0).astype(float), seed=self.seed),
        }
        per_item = tuple(
            {"image": i, "caption": c, "objects": sorted(p), "mentions": f, "hallucinated": w}
            for i, (c, p, f, w) in enumerate(zip(captions, present, found, wrong))
        )
        return HallucinationResult("chair", scores, per_item, ci, {**vars(self)})
