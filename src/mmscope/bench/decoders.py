"""Do hallucination-mitigating decoders help? Every decoder on the same POPE probes, the same
CHAIR images and the same answerable questions, each compared with a baseline decoder by a
paired bootstrap (the same items resampled for both), so an improvement is claimed only where
its 95% interval excludes zero."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from mmscope.decoding import make_decoder
from mmscope.metrics.base import bootstrap_interval
from mmscope.metrics.hallucination import Chair, Pope, pope_scores
from mmscope.world.items import world_items
from mmscope.world.seeds import BENCH_SEED

if TYPE_CHECKING:
    from mmscope.models.base import VLM

Progress = Callable[[str], None]


def _f1(answers: np.ndarray, truths: np.ndarray) -> float:
    return float(pope_scores(list(answers), list(truths))["f1"])


def _chair_i(wrong: np.ndarray, found: np.ndarray) -> float:
    return float(wrong.sum() / max(1.0, found.sum()))


def _paired(
    ours: tuple[np.ndarray, ...],
    base: tuple[np.ndarray, ...],
    stat: Callable[..., float],
    seed: int,
) -> list[float]:
    """95% interval of ``stat(ours) - stat(base)`` over items resampled together."""
    k = len(ours)
    lo, hi = bootstrap_interval(
        (*ours, *base), lambda *s: stat(*s[:k]) - stat(*s[k:]), seed=seed
    )
    return [float(lo), float(hi)]


def _answers(vlm: VLM, decoder: str, n: int, batch: int) -> np.ndarray:
    """Per answerable world question, whether the decoder's answer is exactly right."""
    items = world_items(n, seed=BENCH_SEED)
    decode = make_decoder(decoder)
    right = []
    for i in range(0, n, batch):
        chunk = items[i : i + batch]
        inputs = vlm.prepare([it.image for it in chunk], [it.prompt for it in chunk])
        right += [a == it.answer for a, it in zip(decode(vlm, inputs, 4), chunk)]
    return np.array(right, dtype=float)


def compare_decoders(
    vlm: VLM,
    decoders: Sequence[str],
    n_images: int = 200,
    splits: Sequence[str] = ("random", "popular", "adversarial"),
    n_captions: int = 200,
    n_answers: int = 500,
    baseline: str = "greedy",
    batch_size: int = 50,
    seed: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """POPE per split, CHAIR and answer accuracy for each decoder, with paired intervals of
    the difference to ``baseline`` (F1 and accuracy up, CHAIR down, is better).

    Returns ``{"decoders": {name: {split: {...}, "chair": {...}, "answers": {...}}}, ...}``.
    """
    keys = list(dict.fromkeys([baseline, *decoders]))
    for key in keys:
        make_decoder(key)  # an unknown decoder fails before any work
    raw: dict[str, dict[str, Any]] = {}
    for key in keys:
        if progress:
            progress(key)
        runs: dict[str, Any] = {
            s: Pope(s, n_images, batch_size=batch_size, decoder=key)(vlm) for s in splits
        }
        runs["chair"] = Chair(n_captions, batch_size=batch_size, decoder=key)(vlm)
        runs["answers"] = _answers(vlm, key, n_answers, batch_size)
        raw[key] = runs
    out: dict[str, Any] = {}
    base = raw[baseline]
    for key, runs in raw.items():
        row: dict[str, Any] = {}
        for s in splits:
            pope = runs[s]
            ours = _pope_arrays(pope)
            row[s] = {**pope.scores, "ci": pope.to_dict()["ci"]}
            if key != baseline:
                row[s]["f1_gain_ci"] = _paired(ours, _pope_arrays(base[s]), _f1, seed)
        chair = runs["chair"]
        row["chair"] = {**chair.scores, "ci": chair.to_dict()["ci"]}
        if key != baseline:
            row["chair"]["chair_i_change_ci"] = _paired(
                _chair_arrays(chair), _chair_arrays(base["chair"]), _chair_i, seed
            )
        answers = runs["answers"]
        row["answers"] = {"accuracy": float(answers.mean()), "n": len(answers)}
        if key != baseline:
            row["answers"]["accuracy_change_ci"] = _paired(
                (answers,), (base["answers"],), np.mean, seed
            )
        out[key] = row
    settings = {"n_images": n_images, "n_captions": n_captions, "n_answers": n_answers}
    return {"baseline": baseline, "settings": settings, "decoders": out}


def _pope_arrays(result: Any) -> tuple[np.ndarray, np.ndarray]:
    answers = np.array([r["answer"] for r in result.per_item], dtype=object)
    return answers, np.array([r["label"] for r in result.per_item], dtype=object)


def _chair_arrays(result: Any) -> tuple[np.ndarray, np.ndarray]:
    wrong = np.array([len(r["hallucinated"]) for r in result.per_item], dtype=float)
    return wrong, np.array([len(r["mentions"]) for r in result.per_item], dtype=float)
