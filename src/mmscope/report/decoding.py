"""The demo's decoding section: every registered decoder on the same POPE probes, CHAIR
images and questions; one hallucinating caption decoded each way with the hallucinated objects
marked; and the hallucination explained."""

from __future__ import annotations

from typing import Any

from markupsafe import Markup, escape

from mmscope.bench.decoders import compare_decoders
from mmscope.core.result import figure_uri
from mmscope.decoding import decoders, generate
from mmscope.decoding.explain import explain_hallucination
from mmscope.models.base import VLM
from mmscope.report.html import data_uri
from mmscope.world import DESCRIBE_PROMPT, render, sample_scenes
from mmscope.world.captions import hallucinated
from mmscope.world.seeds import CAPTION_SEED


def marked(caption: str, wrong: list[str]) -> Markup:
    """The caption as HTML with each hallucinated object name in ``<mark>``."""
    out = str(escape(caption))
    for name in dict.fromkeys(wrong):
        out = out.replace(name, f"<mark>{name}</mark>")
    return Markup(out)


def _example(vlm: VLM, keys: list[str], search: int = 40) -> dict[str, Any] | None:
    """The first world scene whose greedy caption hallucinates, decoded by every decoder."""
    scenes = sample_scenes(search, CAPTION_SEED)
    images = [render(s).image for s in scenes]
    captions = generate(vlm, vlm.prepare(images, [DESCRIBE_PROMPT] * len(scenes)))
    found = next((i for i, (c, s) in enumerate(zip(captions, scenes)) if hallucinated(c, s)), None)
    if found is None:
        return None
    scene, image = scenes[found], images[found]
    inputs = vlm.prepare(image, DESCRIBE_PROMPT)
    rows = []
    for key in keys:
        text = generate(vlm, inputs, key)[0]
        wrong = hallucinated(text, scene)
        rows.append({"decoder": key, "caption": marked(text, wrong), "wrong": len(wrong)})
    phrase = hallucinated(captions[found], scene)[0]
    explained = explain_hallucination(vlm, image, phrase)
    return {
        "image": data_uri(image, 3),
        "truth": ", ".join(o.name for o in scene.objects),
        "rows": rows,
        "phrase": phrase,
        "figure": figure_uri(explained.plot()),
        "image_attention": float(explained.image_attention[-1]),
    }


def decoding_section(vlm: VLM, n: int = 40) -> dict[str, Any] | None:
    """The comparison on ``n`` images per POPE split and ``n`` captions, and the example."""
    if vlm.contrastive:
        return None
    keys = decoders()
    ordered = ["greedy"] + [k for k in keys if k != "greedy"]
    result = compare_decoders(vlm, ordered, n_images=n, n_captions=n, n_answers=2 * n)
    return {"n": n, "comparison": result["decoders"], "example": _example(vlm, ordered)}
