"""Noisy linear imputation (Rong et al. 2022, "A Consistent and Efficient Evaluation Strategy
for Attribution Methods", ROAD).

Every removed pixel becomes the weighted mean of its 8 neighbours (weight 1/6 for the four
direct neighbours, 1/12 for the diagonal ones, as the paper's reference code), known
neighbours fixed: one sparse linear system, solved for a whole stack of images at once (the
images are independent blocks of one system), plus a little Gaussian noise on the imputed
pixels so the model cannot read the removal pattern from perfectly smooth fills.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from scipy.sparse.linalg import spsolve

_NEIGHBOURS = (
    (-1, 0, 1 / 6),
    (1, 0, 1 / 6),
    (0, -1, 1 / 6),
    (0, 1, 1 / 6),
    (-1, -1, 1 / 12),
    (-1, 1, 1 / 12),
    (1, -1, 1 / 12),
    (1, 1, 1 / 12),
)


def impute(
    images: torch.Tensor, removed: torch.Tensor, noise: float = 0.0, seed: int = 0
) -> torch.Tensor:
    """Images with their removed pixels filled by noisy linear imputation.

    Args:
        images: ``(N, C, H, W)``.
        removed: ``(N, H, W)`` bool, True where a pixel is removed.
        noise: standard deviation of the Gaussian noise added to imputed pixels.
        seed: seed of that noise.

    Returns:
        ``(N, C, H, W)``, equal to ``images`` where nothing was removed. An image with every
        pixel removed has no neighbour to read and becomes zeros (the processor's mean colour).
    """
    x = images.detach().float().cpu().numpy()
    gone = removed.detach().cpu().numpy().astype(bool)
    n, c, h, w = x.shape
    out = x.copy()
    whole = np.all(gone.reshape(n, -1), axis=1)
    out[whole] = 0.0
    gone = gone & ~whole[:, None, None]
    if not gone.any():
        return torch.from_numpy(out).to(images)
    index = np.full(gone.shape, -1, dtype=np.int64)
    img, row, col = np.nonzero(gone)
    unknowns = img.size
    index[img, row, col] = np.arange(unknowns)
    rows, cols, vals = [], [], []
    diag = np.zeros(unknowns)
    rhs = np.zeros((unknowns, c))
    for dy, dx, weight in _NEIGHBOURS:
        r, q = row + dy, col + dx
        inside = (r >= 0) & (r < h) & (q >= 0) & (q < w)
        me, rr, qq, ii = np.nonzero(inside)[0], r[inside], q[inside], img[inside]
        diag[me] += weight
        other = index[ii, rr, qq]
        unknown = other >= 0
        rows.append(me[unknown])
        cols.append(other[unknown])
        vals.append(np.full(int(unknown.sum()), -weight))
        known = ~unknown
        np.add.at(rhs, me[known], weight * x[ii[known], :, rr[known], qq[known]])
    rows.append(np.arange(unknowns))
    cols.append(np.arange(unknowns))
    vals.append(diag)
    system = sp.csc_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(unknowns, unknowns),
    )
    solved = np.asarray(spsolve(system, rhs)).reshape(unknowns, c)
    if noise > 0:
        solved = solved + np.random.default_rng(seed).normal(0.0, noise, solved.shape)
    out[img, :, row, col] = solved
    return torch.from_numpy(out).to(images)
