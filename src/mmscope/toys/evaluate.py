"""Measuring the toys on held-out world data (``mmscope toys eval``)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch

from mmscope.metrics.hallucination import chair_scores
from mmscope.models.base import VLM
from mmscope.world import (
    COLORS,
    DESCRIBE_PROMPT,
    QUESTION_TYPES,
    SHAPES,
    SIZES,
    SLOTS,
    Scene,
    WorldObject,
    ask,
    caption,
    render,
    sample_scenes,
)
from mmscope.world.seeds import EVAL_SEED


def _chunks(n: int, size: int) -> list[range]:
    return [range(i, min(n, i + size)) for i in range(0, n, size)]


def eval_llava(
    vlm: VLM, n: int = 2000, n_captions: int = 300, seed: int = EVAL_SEED, batch: int = 100
) -> dict[str, Any]:
    """Exact-match accuracy by question type, and CHAIR on captions of held-out scenes."""
    scenes = sample_scenes(n, seed)
    rng = np.random.default_rng(seed)
    qs = [ask(s, QUESTION_TYPES[i % len(QUESTION_TYPES)], rng) for i, s in enumerate(scenes)]
    images = [render(s).image for s in scenes]
    right: dict[str, list[bool]] = defaultdict(list)
    for chunk in _chunks(n, batch):
        inputs = vlm.prepare([images[i] for i in chunk], [qs[i].text for i in chunk])
        answers = vlm.generate(inputs, max_new_tokens=4)  # type: ignore[attr-defined]
        for i, answer in zip(chunk, answers):
            right[qs[i].type].append(answer == qs[i].answer)
    by_type = {t: float(np.mean(v)) for t, v in right.items()}
    everything = [x for v in right.values() for x in v]
    chair = eval_captions(vlm, scenes[:n_captions], batch)
    return {"accuracy": float(np.mean(everything)), "by_type": by_type, "n": n, **chair}


def eval_captions(vlm: VLM, scenes: list[Scene], batch: int = 100) -> dict[str, float]:
    """CHAIR_i (hallucinated mentions / mentions), CHAIR_s, and caption exact match."""
    captions: list[str] = []
    for chunk in _chunks(len(scenes), batch):
        images = [render(scenes[i]).image for i in chunk]
        inputs = vlm.prepare(images, [DESCRIBE_PROMPT] * len(chunk))
        captions.extend(vlm.generate(inputs, max_new_tokens=24))  # type: ignore[attr-defined]
    scores = chair_scores(captions, [{o.name for o in s.objects} for s in scenes])
    exact = sum(text == caption(s) for text, s in zip(captions, scenes))
    return {
        "chair_i": scores["chair_i"],
        "chair_s": scores["chair_s"],
        "caption_exact": exact / max(1, len(scenes)),
    }


@torch.no_grad()
def eval_clip(vlm: VLM, n: int = 500, seed: int = EVAL_SEED) -> dict[str, float]:
    """Zero-shot shape and colour of single-object images, and retrieval top-1 among 100.

    Zero-shot labels are the 20 "a {color} {shape}" prompts; the predicted shape (colour)
    is the shape (colour) of the best prompt.
    """
    rng = np.random.default_rng(seed)
    labels = [(c, s) for c in COLORS for s in SHAPES]
    prompts = [f"a {c} {s}" for c, s in labels]
    singles = []
    for _ in range(n):
        c, s = labels[int(rng.integers(len(labels)))]
        size, slot = str(rng.choice(SIZES)), str(rng.choice(SLOTS))
        obj = WorldObject(s, c, size, slot, float(rng.uniform(-1, 1)), float(rng.uniform(-1, 1)))
        singles.append(Scene((obj,), texture_seed=int(rng.integers(1 << 30))))
    shape_ok = color_ok = 0
    for chunk in _chunks(n, 100):
        sims = vlm.similarity(  # type: ignore[attr-defined]
            vlm.prepare([render(singles[i]).image for i in chunk], prompts)
        )
        for i, best in zip(chunk, sims.argmax(dim=1).tolist()):
            obj = singles[i].objects[0]
            shape_ok += labels[best][1] == obj.shape
            color_ok += labels[best][0] == obj.color
    scenes = sample_scenes(1000, seed + 1)
    hits = 0
    for chunk in _chunks(len(scenes), 100):
        group = [scenes[i] for i in chunk]
        caps = [caption(s) for s in group]
        sims = vlm.similarity(vlm.prepare([render(s).image for s in group], caps))  # type: ignore[attr-defined]
        hits += sum(caps[j] == caps[best] for j, best in enumerate(sims.argmax(dim=1).tolist()))
    return {
        "zero_shot_shape": shape_ok / n,
        "zero_shot_color": color_ok / n,
        "retrieval_top1": hits / len(scenes),
    }
