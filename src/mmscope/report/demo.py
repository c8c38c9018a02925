"""``mmscope demo``: the main job on the embedded toy model, written as an HTML report."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmscope.core.targets import AnswerLogProb, Generated
from mmscope.methods.explain import attribution_methods, make_method
from mmscope.models import VLM, load
from mmscope.report.decoding import decoding_section
from mmscope.report.explanations import explanation_rows
from mmscope.report.html import data_uri, write_page
from mmscope.report.inside import inside_section
from mmscope.report.neurons import neurons_section
from mmscope.world import (
    DESCRIBE_PROMPT,
    QUESTION_TYPES,
    Question,
    Rendered,
    Scene,
    ask,
    caption,
    render,
    sample_scenes,
)
from mmscope.world.captions import hallucinated
from mmscope.world.seeds import DEMO_SEED

#: Methods shown per generated token of a caption (one forward, batched backwards each).
CAPTION_METHODS = ("integrated_gradients", "grad_cam", "chefer_relevance")


def _evidence_image(
    image: Image.Image, masks: np.ndarray, evidence: tuple[int, ...]
) -> Image.Image:
    """The image dimmed everywhere but on the evidence objects' masks."""
    arr = np.asarray(image).astype(np.float32)
    keep = masks[list(evidence)].any(axis=0) if evidence else np.zeros(arr.shape[:2], bool)
    arr[~keep] = arr[~keep] * 0.25 + 40
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def _attributions(
    vlm: VLM, rendered: list[Rendered], qs: list[Question], scenes: list[Scene], n: int
) -> dict[str, Any]:
    """Every attribution method on ``n`` questions (beside the true evidence), and the
    per-token maps of one generated caption."""
    questions = []
    for r, q in list(zip(rendered, qs))[:n]:
        inputs = vlm.prepare(r.image, q.text)
        target = AnswerLogProb(q.answer)
        methods = [
            {"name": key, "rows": explanation_rows(make_method(key)(vlm, inputs, target))}
            for key in attribution_methods()
        ]
        evidence = data_uri(_evidence_image(r.image, r.masks, q.evidence), 3)
        questions.append(
            {"question": q.text, "answer": q.answer, "evidence": evidence, "methods": methods}
        )
    caption_inputs = vlm.prepare(rendered[0].image, DESCRIBE_PROMPT)
    per_token = [
        {"name": key, "rows": explanation_rows(make_method(key)(vlm, caption_inputs, Generated()))}
        for key in CAPTION_METHODS
    ]
    return {"questions": questions, "caption": per_token, "truth": caption(scenes[0])}


def _benchmark(vlm: VLM, out_dir: Path, n: int) -> dict[str, Any]:
    """A small leaderboard (every method and metric on ``n`` world items, written to
    ``out_dir/bench``) and POPE's three splits on held-out world images."""
    from mmscope.bench import BenchConfig, run_leaderboard
    from mmscope.bench.report import failing_sanity, table
    from mmscope.metrics.hallucination import Pope
    from mmscope.world import POPE_SPLITS
    from mmscope.world.items import world_items

    few = min(n, 4)
    config = BenchConfig(
        vlm.name, n, batch_size=few, subsets={"randomisation": few, "max_sensitivity": few}
    )
    results = run_leaderboard(
        vlm, world_items(n, contrastive=vlm.contrastive), config, out_dir / "bench"
    )
    rows = table(results)
    pope = {} if vlm.contrastive else {s: Pope(s, n_images=40)(vlm).scores for s in POPE_SPLITS}
    return {
        "metrics": list(dict.fromkeys(r["metric"] for r in rows)),
        "methods": list(dict.fromkeys(r["method"] for r in rows)),
        "cells": {(r["method"], r["metric"]): r for r in rows},
        "failing": failing_sanity(results),
        "n": n,
        "pope": pope,
    }


def run_demo(
    out_dir: Path,
    model: str = "toy-llava",
    n: int = 10,
    seed: int = DEMO_SEED,
    explain: int = 3,
    bench: int = 10,
    inside: int = 30,
    decoding: int = 40,
    neurons: int = 40,
) -> Path:
    """Answer ``n`` world questions and describe a few images, explain ``explain`` of the
    answers with every attribution method, score every method on ``bench`` items (0: skip)
    with POPE beside, run every inside-the-model analysis on ``inside`` world questions (0:
    skip), compare every decoder on ``decoding`` world images (0: skip), run the neuron and
    concept studies on ``neurons`` world items (0: skip); write ``out_dir/index.html``."""
    vlm = load(model)
    scenes = sample_scenes(n, seed)
    rng = np.random.default_rng(seed)
    rendered = [render(s) for s in scenes]
    qs = [ask(s, QUESTION_TYPES[i % len(QUESTION_TYPES)], rng) for i, s in enumerate(scenes)]
    answers = vlm.generate(vlm.prepare([r.image for r in rendered], [q.text for q in qs]))  # type: ignore[attr-defined]
    rows = [
        {
            "image": data_uri(r.image, 3),
            "mask": data_uri(_evidence_image(r.image, r.masks, q.evidence), 3),
            "question": q.text,
            "type": q.type,
            "answer": a,
            "truth": q.answer,
            "correct": a == q.answer,
        }
        for r, q, a in zip(rendered, qs, answers)
    ]
    k = min(4, n)
    texts = vlm.generate(vlm.prepare([r.image for r in rendered[:k]], [DESCRIBE_PROMPT] * k))  # type: ignore[attr-defined]
    captions = [
        {
            "image": data_uri(r.image, 3),
            "answer": t,
            "truth": caption(s),
            "hallucinated": hallucinated(t, s),
        }
        for r, s, t in zip(rendered, scenes, texts)
    ]
    attributions = _attributions(vlm, rendered, qs, scenes, min(explain, n)) if explain else None
    benchmark = _benchmark(vlm, out_dir, bench) if bench else None
    analyses = inside_section(vlm, inside) if inside else None
    decoders = decoding_section(vlm, decoding) if decoding else None
    units = neurons_section(vlm, neurons) if neurons else None
    return write_page(
        out_dir / "index.html",
        "demo.html",
        model=model,
        family=type(vlm).__name__,
        n=n,
        seed=seed,
        correct=sum(r["correct"] for r in rows),
        rows=rows,
        captions=captions,
        attributions=attributions,
        benchmark=benchmark,
        inside=analyses,
        decoding=decoders,
        neurons=units,
    )
