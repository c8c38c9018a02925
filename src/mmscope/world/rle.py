"""Uncompressed COCO-style run-length encoding of binary masks.

Counts run over the mask in column-major (Fortran) order and always start with a
background (zero) run, which may be empty.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def encode_rle(mask: np.ndarray) -> dict[str, Any]:
    """Encode a 2-D binary mask.

    Args:
        mask: Array of shape ``(h, w)``; non-zero means foreground.

    Returns:
        ``{"size": [h, w], "counts": [...]}`` with plain ``int`` counts.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    h, w = mask.shape
    flat = mask.astype(bool).ravel(order="F")
    if flat.size == 0:
        return {"size": [int(h), int(w)], "counts": []}
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate(([0], change, [flat.size]))
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0, *counts]
    return {"size": [int(h), int(w)], "counts": [int(c) for c in counts]}


def decode_rle(d: dict[str, Any]) -> np.ndarray:
    """Decode an uncompressed RLE dict back into a bool array of shape ``(h, w)``."""
    h, w = (int(v) for v in d["size"])
    counts = np.asarray(d["counts"], dtype=np.int64)
    if counts.size and (counts < 0).any():
        raise ValueError("RLE counts must be non-negative")
    if int(counts.sum()) != h * w:
        raise ValueError(f"RLE counts sum to {int(counts.sum())}, expected {h * w}")
    values = np.arange(counts.size) % 2 == 1
    flat = np.repeat(values, counts)
    return flat.reshape((h, w), order="F")
