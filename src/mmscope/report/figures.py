"""Matplotlib figures of results: an explanation's overlay and its prompt-word scores."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from mmscope.core.explanation import Explanation


def plot_explanation(
    exp: Explanation, *, item: int = 0, output: int = 0, image: int = 0, ax: Any = None
) -> Any:
    """The image with the heatmap over it (left) and the prompt-word scores (right).

    Returns the image axes; its ``.figure`` is the whole figure.
    """
    import matplotlib.pyplot as plt  # its default backend: Agg without a display

    words = exp.text_map(item=item, output=output)
    if ax is None:
        fig, axes = plt.subplots(
            1, 2 if words else 1, figsize=(7 if words else 3.5, 3.2), squeeze=False
        )
        ax, text_ax = axes[0][0], (axes[0][1] if words else None)
    else:
        text_ax = None
    heat = exp.heatmap(image, item=item, output=output)
    if exp.images:
        ax.imshow(exp.images[item][image])
    scale = float(np.abs(heat).max()) or 1.0
    ax.imshow(heat, cmap="RdBu_r", vmin=-scale, vmax=scale, alpha=0.55)
    ax.set_axis_off()
    ax.set_title(f"{exp.method}: {exp.labels[item][output]}", fontsize=9)
    if text_ax is not None:
        tokens, scores = zip(*words)
        y = np.arange(len(tokens))
        text_ax.barh(y, scores, color=["#c0392b" if s > 0 else "#2e86c1" for s in scores])
        text_ax.set_yticks(y, tokens, fontsize=8)
        text_ax.invert_yaxis()
        text_ax.set_title("prompt words", fontsize=9)
        text_ax.tick_params(axis="x", labelsize=7)
    ax.figure.tight_layout()
    return ax
