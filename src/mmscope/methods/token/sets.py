"""Sets of image tokens that analyses ablate, block or restore (Neo et al. 2024): the evidence
object's patches grown by a buffer, high-norm "register" tokens, random tokens."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.ndimage import binary_dilation

from mmscope.core.errors import InputError
from mmscope.core.inputs import ImageSpan
from mmscope.world.concepts import patch_coverage


def object_cells(
    mask: np.ndarray,
    span: ImageSpan,
    buffer: int = 0,
    min_cover: float = 0.1,
) -> np.ndarray:
    """Bool ``(rows, cols)``: the cells of ``span``'s grid that the pixel ``mask`` covers by at
    least ``min_cover``, grown by ``buffer`` cells in every direction (8-neighbourhood).

    ``mask`` is in the original image's pixels; only the part inside the span's crop box
    (what the processor kept) is laid over the grid. An all-zero crop box means the whole mask.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise InputError(f"an evidence mask is (height, width), not {mask.shape}")
    left, top, right, bottom = span.crop
    if right > left and bottom > top:
        box = (int(round(top)), int(round(bottom)), int(round(left)), int(round(right)))
        # a box past the image's edges (Mllama's padded tile canvas, LLaVA-NeXT's unpadded
        # tiles, OneVision's square): nothing of the mask there
        window = np.zeros((max(0, box[1] - box[0]), max(0, box[3] - box[2])), dtype=bool)
        y0, y1 = max(box[0], 0), min(box[1], mask.shape[0])
        x0, x1 = max(box[2], 0), min(box[3], mask.shape[1])
        if y1 > y0 and x1 > x0:
            window[y0 - box[0] : y1 - box[0], x0 - box[2] : x1 - box[2]] = mask[y0:y1, x0:x1]
        mask = window
    rows, cols = span.grid
    if mask.shape[0] < rows or mask.shape[1] < cols:
        raise InputError(f"a {mask.shape} mask is smaller than the {span.grid} token grid")
    cells = patch_coverage(mask[None], (rows, cols))[0] >= min_cover
    if buffer > 0 and cells.any():
        cells = binary_dilation(cells, structure=np.ones((3, 3), bool), iterations=buffer)
    return np.asarray(cells, dtype=bool)


def random_cells(count: int, grid: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Bool ``grid`` with ``count`` cells chosen uniformly without replacement."""
    rows, cols = grid
    flat = np.zeros(rows * cols, dtype=bool)
    flat[rng.choice(rows * cols, size=min(count, rows * cols), replace=False)] = True
    return flat.reshape(grid)


def high_norm_cells(tokens: torch.Tensor, grid: tuple[int, int], sds: float = 2.0) -> np.ndarray:
    """Bool ``grid``: image tokens whose norm exceeds the image's mean norm by ``sds``
    standard deviations (the high-norm "register" tokens of Darcet et al. 2024)."""
    norms = tokens.float().norm(dim=-1).cpu().numpy()
    return np.asarray(norms > norms.mean() + sds * norms.std(), dtype=bool).reshape(grid)


def top_cells(scores: np.ndarray, count: int) -> np.ndarray:
    """Bool mask of the ``count`` highest cells of a score grid (ties: the first ones)."""
    flat = np.zeros(scores.size, dtype=bool)
    flat[np.argsort(-scores.ravel(), kind="stable")[:count]] = True
    return flat.reshape(scores.shape)


def positions(span: ImageSpan, cells: np.ndarray) -> list[int]:
    """Sequence positions of the chosen cells (raster order inside the span)."""
    if cells.shape != tuple(span.grid):
        raise InputError(f"cells {cells.shape} do not match the token grid {span.grid}")
    return [span.positions[int(i)] for i in np.flatnonzero(cells)]


def block_matrix(length: int, queries: Sequence[int], keys: Sequence[int]) -> torch.Tensor:
    """Bool ``(length, length)``, True at every (query, key) pair to block; a query never loses
    its own position (a row with no key left would be undefined)."""
    block = torch.zeros(length, length, dtype=torch.bool)
    if queries and keys:
        q = torch.as_tensor(list(queries)).view(-1, 1)
        k = torch.as_tensor(list(keys)).view(1, -1)
        block[q, k] = True
        block.fill_diagonal_(False)
    return block
