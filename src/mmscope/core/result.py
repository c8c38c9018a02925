"""The habits every result shares: ``Explanation``, the analyses' and studies' results, and the
metrics' results all have ``to_dict``, ``plot`` (a matplotlib ``Figure``), ``save`` and
``_repr_html_`` (notebooks)."""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch


class Result:
    """Base of result types (frozen dataclasses). Subclasses give ``to_dict`` and ``plot``;
    ``record`` is what ``save`` writes (``to_dict`` unless a result keeps more per item)."""

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def plot(self, ax: Any = None) -> Any:
        """A matplotlib ``Figure`` of the result (``ax``: draw into these axes, and return
        their figure)."""
        raise NotImplementedError

    def record(self) -> dict[str, Any]:
        """What ``save`` writes as JSON."""
        return self.to_dict()

    def save(self, path: str | Path) -> Path:
        """Write ``record`` as strict JSON (NaN as null); a ``.png`` path writes the figure."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".png":
            self.plot().savefig(path, dpi=100, bbox_inches="tight")
        else:
            path.write_text(json.dumps(jsonable(self.record()), allow_nan=False) + "\n")
        return path

    def _repr_html_(self) -> str:
        return f'<img src="{figure_uri(self.plot())}"/>'


def figure_uri(fig: Any, dpi: int = 80) -> str:
    """A figure as a ``data:`` URI of its PNG."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def jsonable(value: Any) -> Any:
    """``value`` with arrays and tensors as lists and NaN as ``None``: strict JSON (which has
    no NaN) for results whose "does not apply" is NaN."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray) or torch.is_tensor(value):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def new_figure(width: float, height: float, ax: Any = None) -> tuple[Any, Any]:
    """(figure, axes): the given axes' figure, or a new figure not tied to pyplot's state."""
    if ax is not None:
        return ax.figure, ax
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height))
    return fig, fig.add_subplot()
