"""The any-res layout of LLaVA-NeXT (Liu et al. 2024) and LLaVA-OneVision (Li et al. 2024),
in one place for both: which sequence positions hold which view of an image, and which rows of
the tower's patches and of ``pixel_values`` feed each cell.

The processor picks the best-fit resolution from ``image_grid_pinpoints``, resizes the image onto
it (aspect kept), pads it (centred) and cuts it into tiles of the tower's size, after a *base
view*: the whole image resized to one tile. The model (``pack_image_features``,
``unpad_image``, ``get_anyres_image_grid_shape`` in transformers' ``modeling_llava_next.py``)
packs each image as the base view's patches in raster order, then the tiles' patch grids
stitched into one grid and *unpadded* back to the image's aspect ratio (OneVision then shrinks
it bilinearly past ``anyres_max_N`` tiles' worth of patches), the learned ``image_newline``
after each row. OneVision shows each image of a multi-image prompt as its base view alone
(padded to a square), then one newline. The processor writes one image token per packed
vector, newlines included: one image is one run of image tokens.

Views: ``"base"`` (the base view's patches, contiguous) and ``"tiles"`` (the unpadded stitched
grid, its ``cells`` skipping the newlines), with boxes in the original image's pixels: the base
view covers the whole image (or, padded to a square, more), the tiles view the image as
unpadded (which may pass its edges by a fraction of a patch).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from mmscope.core.errors import InputError
from mmscope.core.inputs import ImageSpan

Box = tuple[float, float, float, float]
Pinpoints = tuple[tuple[int, int], ...]


def best_resolution(height: int, width: int, pinpoints: Pinpoints) -> tuple[int, int]:
    """``select_best_resolution`` of transformers: the (height, width) pinpoint keeping most
    of the image's pixels, then wasting least."""
    best, most, waste = (0, 0), 0, math.inf
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > most or (effective == most and wasted < waste):
            best, most, waste = (int(h), int(w)), effective, wasted
    return best


def unpad_rows_cols(h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """``(top, bottom, left, right)`` of an ``h x w`` stitched grid that ``unpad_image`` keeps
    for an original ``height x width`` image (the same float operations as the model)."""
    if width / height > w / h:
        new_h = int(round(height * (w / width), 7))
        pad = (h - new_h) // 2
        return pad, h - pad, 0, w
    new_w = int(round(width * (h / height), 7))
    pad = (w - new_w) // 2
    return 0, h, pad, w - pad


@functools.lru_cache(maxsize=256)
def bilinear(n_in: int, n_out: int) -> torch.Tensor:
    """``(n_out, n_in)``: 1-D bilinear resampling as ``F.interpolate`` does it (the model's
    pooling is separable: ``out = My @ grid @ Mx^T`` per channel)."""
    eye = torch.eye(n_in, dtype=torch.float64).reshape(1, n_in, n_in, 1)
    return F.interpolate(eye, size=[n_out, 1], mode="bilinear")[0, :, :, 0].T.contiguous()


@functools.lru_cache(maxsize=256)
def _pinv(n_in: int, n_out: int) -> torch.Tensor:
    return torch.linalg.pinv(bilinear(n_in, n_out))


@dataclass(frozen=True)
class Layout:
    """One image's any-res layout, as the model packs it.

    Attributes:
        height, width: the original image's size.
        side: patches along a tile's side; ``side**2`` patches per tile and in the base view.
        tile: a tile's side in pixels (the tower's ``image_size``).
        tiles: (rows, cols) of tiles; ``(0, 0)`` when the image is shown as its base view alone.
        keep: ``(top, bottom, left, right)`` of the stitched patch grid that unpadding keeps.
        grid: the tiles view's grid: the kept patches, or fewer cells where the model pools.
        base_box, tiles_box: each view's box in the original image's pixels.
    """

    height: int
    width: int
    side: int
    tile: int
    tiles: tuple[int, int]
    keep: tuple[int, int, int, int]
    grid: tuple[int, int]
    base_box: Box
    tiles_box: Box

    @property
    def n_tiles(self) -> int:
        return self.tiles[0] * self.tiles[1]

    @property
    def rows(self) -> int:
        """Rows of ``pixel_values`` (and of the tower's batch) this image uses."""
        return 1 + self.n_tiles

    @property
    def patches(self) -> int:
        return self.side * self.side

    @property
    def kept(self) -> tuple[int, int]:
        top, bottom, left, right = self.keep
        return bottom - top, right - left

    @property
    def pooled(self) -> bool:
        return self.n_tiles > 0 and self.grid != self.kept

    @property
    def length(self) -> int:
        """Image tokens in the sequence: the base view, then each row of cells and a newline
        (a base view alone is followed by one newline)."""
        if not self.n_tiles:
            return self.patches + 1
        return self.patches + self.grid[0] * (self.grid[1] + 1)

    def views(self, start: int, image: int) -> list[ImageSpan]:
        """The image's views for its run of image tokens at ``start``."""
        side, n = self.side, self.patches
        base = ImageSpan(start, start + n, (side, side), "lm", self.base_box, image, "base")
        if not self.n_tiles:
            return [base]
        rows, cols = self.grid
        rows_at = start + n + (cols + 1) * np.arange(rows)[:, None]  # each row's first cell
        cells = tuple((rows_at + np.arange(cols)).ravel().tolist())
        tiles = ImageSpan(
            start + n, start + self.length, self.grid, "lm", self.tiles_box, image, "tiles", cells
        )
        return [base, tiles]

    def owners(self) -> tuple[torch.Tensor, torch.Tensor]:
        """For the kept rows and columns of the stitched grid, the tiles view's row and column
        they fall in (the identity unless pooled; pooled: the cell whose box holds their
        centre)."""
        (kh, kw), (gh, gw) = self.kept, self.grid
        rows, cols = 2 * torch.arange(kh) + 1, 2 * torch.arange(kw) + 1
        return rows * gh // (2 * kh), cols * gw // (2 * kw)


@functools.lru_cache(maxsize=1024)
def layout(
    height: int,
    width: int,
    *,
    pinpoints: Pinpoints,
    tile: int,
    patch: int,
    max_tiles: int | None = None,
    patched: bool = True,
) -> Layout:
    """The layout of one ``height x width`` image.

    Args:
        pinpoints: the model's ``image_grid_pinpoints`` ((height, width) pairs).
        tile: the tower's image size; ``patch``: its patch size.
        max_tiles: OneVision's ``anyres_max_N``: above ``N`` tiles' worth of kept patches
            (by more than 10 %), the tiles grid is shrunk bilinearly; None for LLaVA-NeXT.
        patched: False for OneVision's images of multi-image prompts (base view alone).
    """
    side = tile // patch
    whole: Box = (0.0, 0.0, float(width), float(height))
    if not patched:  # padded to a square, centred, then resized: the box is that square
        edge = max(height, width)
        left, top = (width - edge) // 2, (height - edge) // 2
        square = (float(left), float(top), float(left + edge), float(top + edge))
        return Layout(height, width, side, tile, (0, 0), (0, 0, 0, 0), (0, 0), square, square)
    best_h, best_w = best_resolution(height, width, pinpoints)
    tiles = (best_h // tile, best_w // tile)
    stitched_h, stitched_w = tiles[0] * side, tiles[1] * side
    keep = unpad_rows_cols(stitched_h, stitched_w, height, width)
    top, bottom, left, right = keep
    grid = (bottom - top, right - left)
    if max_tiles is not None:
        ratio = math.sqrt(grid[0] * grid[1] / (max_tiles * side**2))
        if ratio > 1.1:
            grid = (int(grid[0] // ratio), int(grid[1] // ratio))
    # the processor's resize onto the best fit (get_patch_output_size) and centred paste
    if best_w / width < best_h / height:
        new_w, new_h = best_w, min(math.ceil(height * best_w / width), best_h)
    else:
        new_h, new_w = best_h, min(math.ceil(width * best_h / height), best_w)
    paste_y, paste_x = (best_h - new_h) // 2, (best_w - new_w) // 2
    px = best_h / stitched_h  # pixels of the padded image per stitched patch
    sx, sy = width / new_w, height / new_h
    box = (
        (left * px - paste_x) * sx,
        (top * px - paste_y) * sy,
        (right * px - paste_x) * sx,
        (bottom * px - paste_y) * sy,
    )
    return Layout(height, width, side, tile, tiles, keep, grid, whole, box)


def split_runs(runs: list[tuple[int, int]], lengths: list[int]) -> list[tuple[int, int]]:
    """One ``[start, end)`` per image from the maximal runs of image tokens of one item (images
    side by side make one run), given each image's packed length; ``InputError`` when the
    processor wrote another number of image tokens than the model packs."""
    out: list[tuple[int, int]] = []
    k = 0
    for start, end in runs:
        pos = start
        while k < len(lengths) and pos + lengths[k] <= end:
            out.append((pos, pos + lengths[k]))
            pos, k = pos + lengths[k], k + 1
        if pos != end:
            raise InputError(
                f"the processor wrote {end - start} image tokens where the model packs "
                f"{pos - start + (lengths[k] if k < len(lengths) else 0)}; its "
                "image_grid_pinpoints, patch size or vision_aspect_ratio differ from the model's"
            )
    if k != len(lengths):
        raise InputError(f"found image tokens for {k} images, not {len(lengths)}")
    return out


# ----- the projector's (and the tower's) rows -> the views' cells -------------------------
def stitch(block: torch.Tensor, lay: Layout) -> torch.Tensor:
    """One image's tile rows ``(tiles, side * side, d)`` as the stitched grid
    ``(rows * side, cols * side, d)`` (tiles in raster order, each its patches in raster order)."""
    (tr, tc), s = lay.tiles, lay.side
    return block.reshape(tr, tc, s, s, -1).permute(0, 2, 1, 3, 4).reshape(tr * s, tc * s, -1)


def unstitch(grid: torch.Tensor, lay: Layout) -> torch.Tensor:
    """Inverse of ``stitch``."""
    (tr, tc), s = lay.tiles, lay.side
    return grid.reshape(tr, s, tc, s, -1).permute(0, 2, 1, 3, 4).reshape(tr * tc, s * s, -1)


def kept_grid(block: torch.Tensor, lay: Layout) -> torch.Tensor:
    """The unpadded part ``(kept rows, kept cols, d)`` of an image's stitched tile rows."""
    top, bottom, left, right = lay.keep
    return stitch(block[1 : lay.rows], lay)[top:bottom, left:right]


def pool(grid: torch.Tensor, lay: Layout) -> torch.Tensor:
    """The model's bilinear shrinking of the kept grid ``(kh, kw, d)`` to the view's grid."""
    if not lay.pooled:
        return grid
    (kh, kw), (gh, gw) = lay.kept, lay.grid
    my, mx = bilinear(kh, gh).to(grid), bilinear(kw, gw).to(grid)
    return torch.einsum("ia,abd,jb->ijd", my, grid, mx)


def unpool(delta: torch.Tensor, lay: Layout) -> torch.Tensor:
    """The least change of the kept grid whose ``pool`` is ``delta`` (``pool`` has full row
    rank: shrinking), the identity where the model does not pool."""
    if not lay.pooled:
        return delta
    (kh, kw), (gh, gw) = lay.kept, lay.grid
    py, px = _pinv(kh, gh).to(delta), _pinv(kw, gw).to(delta)
    return torch.einsum("ai,ijd,bj->abd", py, delta, px)


def image_tokens(value: torch.Tensor, layouts: list[Layout]) -> torch.Tensor:
    """The projector's output ``(used rows, side * side, d)`` as the cells of every view, in
    span order: per image its base view, then its tiles view (as the language model gets it)."""
    out, row = [], 0
    for lay in layouts:
        block = value[row : row + lay.rows]
        out.append(block[0])
        if lay.n_tiles:
            out.append(pool(kept_grid(block, lay), lay).reshape(-1, value.shape[-1]))
        row += lay.rows
    return torch.cat(out)


def with_image_tokens(
    value: torch.Tensor, tokens: torch.Tensor, layouts: list[Layout]
) -> torch.Tensor:
    """``value`` (the projector's output) whose views' cells are ``tokens``; the cells that
    unpadding drops are left as they are."""
    blocks, row, k = [], 0, 0
    d = value.shape[-1]
    for lay in layouts:
        block = value[row : row + lay.rows]
        base = tokens[k : k + lay.patches].reshape(1, lay.patches, d).to(value)
        k += lay.patches
        rest = block[1:]
        if lay.n_tiles:
            gh, gw = lay.grid
            new = tokens[k : k + gh * gw].reshape(gh, gw, d).to(value)
            k += gh * gw
            top, bottom, left, right = lay.keep
            grid = stitch(rest, lay).clone()
            kept = grid[top:bottom, left:right].clone()
            grid[top:bottom, left:right] = (
                kept + unpool(new - pool(kept, lay), lay) if lay.pooled else new
            )
            rest = unstitch(grid, lay)
        blocks.append(torch.cat([base, rest]))
        row += lay.rows
    return torch.cat(blocks)


def _cells(kept: torch.Tensor, lay: Layout, mean: bool) -> torch.Tensor:
    """Kept patches ``(kh, kw, d)`` summed (or averaged) into the tiles view's cells."""
    rows, cols = lay.owners()
    gh, gw = lay.grid
    index = (rows[:, None] * gw + cols[None, :]).flatten().to(kept.device)
    flat = kept.reshape(-1, kept.shape[-1])
    out = flat.new_zeros(gh * gw, flat.shape[-1]).index_add(0, index, flat)
    if mean:
        count = torch.bincount(index, minlength=gh * gw).clamp(min=1).to(out)
        out = out / count[:, None]
    return out.reshape(gh, gw, -1)


def vision_grids(block: torch.Tensor, lay: Layout) -> list[torch.Tensor]:
    """A tower layer's output for one image ``(rows, positions, d)`` (a class token first, if
    any) as one ``(rows, cols, d)`` grid per view (pooled cells: the mean of their patches)."""
    patches = block[:, -lay.patches :]
    base = patches[0].reshape(lay.side, lay.side, -1)
    if not lay.n_tiles:
        return [base]
    return [base, _cells(kept_grid(patches, lay), lay, mean=lay.pooled)]


def pixel_grids(values: torch.Tensor, lay: Layout) -> list[torch.Tensor]:
    """One image's ``pixel_values`` rows ``(rows, C, size, size)`` summed over channels and
    each cell's pixels: one ``(rows, cols)`` map per view."""
    s, q = lay.side, lay.tile // lay.side
    per_patch = values.sum(1).reshape(lay.rows, s, q, s, q).sum((2, 4))
    base = per_patch[0]
    if not lay.n_tiles:
        return [base]
    flat = per_patch.reshape(lay.rows, s * s, 1)
    return [base, _cells(kept_grid(flat, lay), lay, mean=False)[..., 0]]


def pixel_keep(keeps: list[torch.Tensor], lay: Layout) -> torch.Tensor:
    """``(rows, 1, size, size)``: for each pixel of one image's ``pixel_values`` rows the keep
    value of its view's cell (1 on the patches that unpadding drops)."""
    s, q, rows = lay.side, lay.tile // lay.side, lay.rows
    base = keeps[0]
    per_patch = base.new_ones(rows, s * s, 1)
    per_patch[0] = base.reshape(s * s, 1)
    if lay.n_tiles:
        top, bottom, left, right = lay.keep
        r, c = lay.owners()
        grid = stitch(per_patch[1 : lay.rows], lay).clone()
        grid[top:bottom, left:right, 0] = keeps[1][r.to(base.device)][:, c.to(base.device)]
        per_patch[1 : lay.rows] = unstitch(grid, lay)
    grids = per_patch.reshape(rows, s, s)
    return grids.repeat_interleave(q, 1).repeat_interleave(q, 2).unsqueeze(1)
