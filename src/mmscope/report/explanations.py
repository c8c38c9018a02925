"""Explanations written to disk: overlays (PNG), scores (JSON) and one HTML page side by side."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmscope.core.explanation import Explanation
from mmscope.report.html import data_uri, write_page


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """``heat`` (the image's size) over ``image`` in a diverging colour map, 0 = no colour."""
    from matplotlib import colormaps

    scale = float(np.abs(heat).max()) or 1.0
    colours = colormaps["RdBu_r"]((heat / scale + 1) / 2)[..., :3]
    weight = alpha * np.clip(np.abs(heat) / scale * 2, 0, 1)[..., None]
    base = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    mixed = base * (1 - weight) + colours * weight
    return Image.fromarray((mixed * 255).round().astype(np.uint8))


def explanation_rows(exp: Explanation, item: int = 0, scale: int = 4) -> list[dict[str, Any]]:
    """One row per explained output: overlays of every image and the coloured prompt words."""
    rows = []
    for k, label in enumerate(exp.labels[item]):
        images = [
            data_uri(_enlarged(overlay(im, exp.heatmap(i, item=item, output=k)), scale))
            for i, im in enumerate(exp.images[item] if exp.images else ())
        ]
        words = exp.text_map(item=item, output=k)
        top = max((abs(s) for _, s in words), default=0.0) or 1.0
        rows.append(
            {
                "label": label,
                "images": images,
                "words": [{"token": t, "score": s, "weight": s / top} for t, s in words],
            }
        )
    return rows


def _enlarged(image: Image.Image, scale: int) -> Image.Image:
    if scale <= 1 or max(image.size) >= 256:
        return image
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)


def write_explanations(
    explanations: Sequence[Explanation], out_dir: str | Path, title: str = ""
) -> Path:
    """``<method>.png`` and ``<method>.json`` per explanation, ``scores.json`` with all of them,
    and ``index.html`` laying the methods side by side. Returns the page's path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    methods = []
    for exp in explanations:
        exp.save(out / f"{exp.method}.png")
        exp.save(out / f"{exp.method}.json")
        methods.append(
            {"name": exp.method, "settings": exp.settings, "rows": explanation_rows(exp)}
        )
    everything = {exp.method: exp.to_dict() for exp in explanations}
    (out / "scores.json").write_text(json.dumps(everything) + "\n")
    target = explanations[0].target if explanations else ""
    return write_page(
        out / "index.html", "explain.html", title=title, target=target, methods=methods
    )
