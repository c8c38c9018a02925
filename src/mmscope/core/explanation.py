"""``Explanation``: the one result type of every attribution method.

Scores are kept per batch item over named axes: for each image of the item a map over its
patch grid, and a score per prompt token, each with a leading *output* axis (one row per
explained output: one for most targets, one per generated token for ``Generated``).
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from mmscope.core.errors import InputError
from mmscope.core.inputs import ImageSpan
from mmscope.core.result import Result, figure_uri


@dataclass(frozen=True, eq=False)
class Explanation(Result):
    """Attribution scores of one method for a batch.

    Attributes:
        method: registry key of the method.
        settings: the method's settings.
        target: the target, as text.
        labels: per item, the name of each explained output.
        image_scores: per item, per span (image or view), an array ``(outputs, rows, cols)``.
        text_scores: per item, an array ``(outputs, prompt tokens)``.
        prompt_tokens: per item, the prompt's tokens.
        spans: per item, its image spans: one per image, or one per view of an image shown
            several times (grid, crop box in the original image, positions).
        images: per item, the original images (kept for overlays, not serialised).
        extras: method-specific numbers, e.g. ``completeness_gap`` per item and output.
    """

    method: str
    settings: dict[str, Any]
    target: str
    labels: tuple[tuple[str, ...], ...]
    image_scores: tuple[tuple[np.ndarray, ...], ...]
    text_scores: tuple[np.ndarray, ...]
    prompt_tokens: tuple[tuple[str, ...], ...]
    spans: tuple[tuple[ImageSpan, ...], ...]
    images: tuple[tuple[Image.Image, ...], ...] = field(default=(), repr=False)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return len(self.labels)

    def _check(self, item: int, output: int) -> None:
        if not 0 <= item < self.batch_size:
            raise InputError(f"item {item} is out of range for a batch of {self.batch_size}")
        if not 0 <= output < len(self.labels[item]):
            raise InputError(f"output {output} is out of range: {len(self.labels[item])} outputs")

    def image_map(self, image: int = 0, *, item: int = 0, output: int = 0) -> np.ndarray:
        """The ``(rows, cols)`` map of the item's ``image``-th span over its grid (for families
        that show an image in several views, one view: see ``views`` and ``heatmap``)."""
        self._check(item, output)
        if not 0 <= image < len(self.image_scores[item]):
            raise InputError(f"item {item} has {len(self.image_scores[item])} image span(s)")
        return self.image_scores[item][image][output]

    def views(self, image: int = 0, *, item: int = 0) -> list[int]:
        """Indices of the spans (views) that show the item's ``image``-th image."""
        spans = self.spans[item]
        return [k for k, span in enumerate(spans) if span.image_index(k) == image]

    def text_map(self, *, item: int = 0, output: int = 0) -> list[tuple[str, float]]:
        """``(token, score)`` for every prompt token."""
        self._check(item, output)
        scores = self.text_scores[item][output] if self.text_scores[item].size else []
        return list(zip(self.prompt_tokens[item], map(float, scores)))

    def heatmap(
        self,
        image: int = 0,
        *,
        item: int = 0,
        output: int = 0,
        size: tuple[int, int] | None = None,
        view: int | None = None,
    ) -> np.ndarray:
        """The map of the item's ``image``-th image in its original pixels ``(height, width)``.

        Each view's grid is laid bilinearly over the box of the original image it covers (its
        crop box; zero outside). An image shown in several views (a base view and stitched
        tiles) gets the sum of its views, each as a density in units of the finest view's cell,
        so that one map in the original image's coordinates holds all of them; ``view`` (a span
        index of ``views``) draws one view alone. ``size`` (w, h) overrides the original size.
        """
        self._check(item, output)
        views = [view] if view is not None else self.views(image, item=item)
        if not views:
            raise InputError(f"item {item} has no image {image}")
        original = self.images[item][image].size if self.images else None
        layers = [self._view_heatmap(k, item, output, size, original) for k in views]
        if len(layers) == 1:
            return layers[0][0]
        finest = min(area for _, area in layers)
        return np.sum([m * (finest / area) for m, area in layers], axis=0).astype(np.float32)

    def _view_heatmap(
        self,
        k: int,
        item: int,
        output: int,
        size: tuple[int, int] | None,
        original: tuple[int, int] | None,
    ) -> tuple[np.ndarray, float]:
        """One view's map over its box in the requested pixels, and its cells' area there."""
        grid = self.image_map(k, item=item, output=output).astype(np.float32)
        width, height = size or original or (grid.shape[1] * 16, grid.shape[0] * 16)
        left, top, right, bottom = self.spans[item][k].crop
        if right <= left or bottom <= top or original is None:
            left, top, right, bottom = 0.0, 0.0, float(width), float(height)
        else:  # the crop box is in original pixels; rescale it to the requested size
            sx, sy = width / original[0], height / original[1]
            left, right, top, bottom = left * sx, right * sx, top * sy, bottom * sy
        box_w, box_h = max(1, round(right - left)), max(1, round(bottom - top))
        scaled = Image.fromarray(grid, mode="F").resize((box_w, box_h), Image.Resampling.BILINEAR)
        out = np.zeros((height, width), dtype=np.float32)
        x0, y0 = round(left), round(top)
        dy, dx = max(0, -y0), max(0, -x0)  # a box starting before the image's edge
        patch = np.asarray(scaled)[dy : height - y0, dx : width - x0]
        out[y0 + dy : y0 + dy + patch.shape[0], x0 + dx : x0 + dx + patch.shape[1]] = patch
        return out, box_w * box_h / max(1, grid.shape[0] * grid.shape[1])

    def plot(self, ax: Any = None, *, item: int = 0, output: int = 0, image: int = 0) -> Any:
        """The figure: the heatmap over the original image and the prompt-word scores."""
        from mmscope.report.figures import plot_explanation

        return plot_explanation(self, item=item, output=output, image=image, ax=ax).figure

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible content (images are left out)."""
        return {
            "method": self.method,
            "settings": _jsonable(self.settings),
            "target": self.target,
            "labels": [list(lab) for lab in self.labels],
            "image_scores": [[m.tolist() for m in item] for item in self.image_scores],
            "text_scores": [t.tolist() for t in self.text_scores],
            "prompt_tokens": [list(t) for t in self.prompt_tokens],
            "spans": [
                [
                    {
                        "start": s.start,
                        "end": s.end,
                        "grid": list(s.grid),
                        "sequence": s.sequence,
                        "crop": list(s.crop),
                        "image": s.image,
                        "view": s.view,
                        "cells": list(s.cells),
                    }
                    for s in item
                ]
                for item in self.spans
            ],
            "extras": _jsonable(self.extras),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Explanation:
        """Inverse of ``to_dict`` (without the images)."""
        spans = tuple(
            tuple(
                ImageSpan(
                    s["start"],
                    s["end"],
                    tuple(s["grid"]),
                    s["sequence"],
                    tuple(s["crop"]),
                    s.get("image", -1),
                    s.get("view", ""),
                    tuple(s.get("cells", ())),
                )
                for s in item
            )
            for item in d["spans"]
        )
        return cls(
            method=d["method"],
            settings=dict(d["settings"]),
            target=d["target"],
            labels=tuple(tuple(lab) for lab in d["labels"]),
            image_scores=tuple(
                tuple(np.asarray(m, dtype=np.float32) for m in item) for item in d["image_scores"]
            ),
            text_scores=tuple(np.asarray(t, dtype=np.float32) for t in d["text_scores"]),
            prompt_tokens=tuple(tuple(t) for t in d["prompt_tokens"]),
            spans=spans,
            extras=dict(d.get("extras", {})),
        )

    def _repr_html_(self) -> str:
        caption = html.escape(f"{self.method}: {self.target}")
        image = f'<img src="{figure_uri(self.plot())}"/>'
        return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray) or hasattr(value, "detach"):  # numpy or torch
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return value
