"""Perturbation attributions: remove input features and watch the target move.

The *features* of a batch are its image cells (each image's span grid: a patch for LLaVA and
CLIP, a merged 2x2 cell for Qwen2-VL) and its prompt tokens. ``Features`` lays them out flat
(every image's cells in raster order, image by image, then every prompt's tokens) and
``masked_forwards`` runs the model on ``M`` keep masks over them, ``batch_size`` masked copies
of the batch per forward (``Inputs.tile``), returning the target's scores ``(M, batch, k)``:
every explained output from each forward, so each output gets its own map for free.

Removing: an image cell is blended towards ``fill`` in pixel space by ``1 - keep``
(``vlm.mask_pixels``; fill 0 is the processor's mean colour); a prompt token's embedding at
``vlm.TEXT_EMBED_SITE`` is multiplied by ``keep`` (zeroed when removed).

Items of a batch never see each other's features, so one mask may remove features of several
items and each item's score is read only against its own. A prompt that several items read (CLIP
with one text for several images) is scored against all of them and its map is the sum, as
the gradient methods' text maps are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from mmscope.core.errors import InputError
from mmscope.core.hooks import patch
from mmscope.core.inputs import Inputs
from mmscope.core.registry import register
from mmscope.core.targets import BoundTarget
from mmscope.core.validate import number, positive_int, valid_seed
from mmscope.methods.attribution.base import Attribution, Maps

if TYPE_CHECKING:
    from mmscope.models.base import VLM

LEVEL = "model/architecture"
FAMILY = "attribution/perturbation"
#: What removed cells become: a pixel value, or a function of the (tiled) ``pixel_values``
#: and the keep grids giving a tensor shaped like ``pixel_values`` (ROAD's imputation).
Fill = float | Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, eq=False)
class Features:
    """The removable features of a batch, flat: image cells, then prompt tokens.

    Attributes:
        grids: per image (item order, then image order) its ``(rows, cols)``.
        image_items: per image, the batch item it belongs to.
        prompt_lengths: per prompt (``inputs.prompt_spans``), its number of tokens.
        owners: ``(batch, features)``, 1 where item ``b``'s score reads feature ``f``.
    """

    grids: tuple[tuple[int, int], ...]
    image_items: tuple[int, ...]
    prompt_lengths: tuple[int, ...]
    owners: torch.Tensor = field(repr=False)

    @classmethod
    def of(cls, vlm: VLM, inputs: Inputs) -> Features:
        grids = tuple(tuple(s.grid) for s in vlm.flat_spans(inputs))
        items = tuple(b for b, item in enumerate(inputs.image_spans) for _ in item)
        lengths = tuple(end - start for start, end in inputs.prompt_spans)
        batch, rows = inputs.batch_size, len(lengths)
        sizes = [r * c for r, c in grids] + list(lengths)
        owners = torch.zeros(batch, sum(sizes))
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        for j, b in enumerate(items):
            owners[b, starts[j] : starts[j] + sizes[j]] = 1
        for b in range(batch if rows else 0):  # item b reads prompt b * rows // batch
            r = len(grids) + b * rows // batch  # (CLIP with one text: every item reads it)
            owners[b, starts[r] : starts[r] + sizes[r]] = 1
        return cls(grids, items, lengths, owners)  # type: ignore[arg-type]

    @property
    def size(self) -> int:
        return int(self.owners.shape[1])

    @property
    def image_slices(self) -> list[slice]:
        return _slices([r * c for r, c in self.grids], 0)

    @property
    def text_slices(self) -> list[slice]:
        return _slices(list(self.prompt_lengths), sum(r * c for r, c in self.grids))

    def of_item(self, b: int) -> torch.Tensor:
        """Item ``b``'s features: its images' cells, then its prompt's tokens (flat indices)."""
        return self.owners[b].nonzero().flatten()

    def combine(self, per_item: torch.Tensor) -> torch.Tensor:
        """``(batch, k, features)`` per-item values -> ``(k, features)``: each feature from
        the items that read it (summed where several do)."""
        return (per_item * self.owners[:, None, :]).sum(0)

    def maps(self, values: torch.Tensor) -> Maps:
        """``(k, features)`` -> one ``(k, rows, cols)`` per image and ``(k, tokens)`` per prompt."""
        image = [values[:, s].reshape(-1, *g) for s, g in zip(self.image_slices, self.grids)]
        return Maps(image, [values[:, s] for s in self.text_slices])


def _slices(sizes: Sequence[int], start: int) -> list[slice]:
    out = []
    for n in sizes:
        out.append(slice(start, start + n))
        start += n
    return out


def masked_forwards(
    vlm: VLM,
    bound: BoundTarget,
    masks: torch.Tensor,
    batch_size: int = 16,
    fill: Fill = 0.0,
) -> torch.Tensor:
    """Target scores ``(M, batch, k)`` (float32, CPU) of the batch under each keep mask.

    Args:
        masks: ``(M, features)`` keep values in [0, 1] over ``Features.of(vlm, bound.inputs)``
            (1 keeps a feature, 0 removes it, values between blend).
        batch_size: masked copies of the batch per forward.
        fill: the pixel value removed image cells are blended to (0: the mean colour), or
            a function ``(pixel_values, keep grids) -> values`` to blend them to.
    """
    features = Features.of(vlm, bound.inputs)
    if masks.dim() != 2 or masks.shape[1] != features.size:
        raise InputError(f"masks must be (M, {features.size}), not {tuple(masks.shape)}")
    chunks = masks.detach().float().cpu().split(positive_int("batch_size", batch_size))
    out = [_forward(vlm, bound, features, chunk, fill) for chunk in chunks]
    return torch.cat(out) if out else torch.zeros(0, bound.inputs.batch_size, bound.k)


def _forward(
    vlm: VLM, bound: BoundTarget, features: Features, chunk: torch.Tensor, fill: Fill
) -> torch.Tensor:
    inputs = bound.inputs
    n = len(chunk)
    tiled = inputs.tile(n)
    tensors = dict(tiled.tensors)
    if features.grids:  # per image of the tiled batch (copy-major): its keep grid
        keep = [
            chunk[i, s].reshape(g)
            for i in range(n)
            for s, g in zip(features.image_slices, features.grids)
        ]
        stacked: Any = torch.stack(keep) if len(set(features.grids)) == 1 else keep
        values = tiled.pixel_values
        filled = fill(values, stacked) if callable(fill) else fill
        tensors["pixel_values"] = vlm.mask_pixels(values, tiled, stacked, filled)
    hooks = {}
    if any(features.prompt_lengths):
        rows = len(inputs.prompt_spans)
        text = torch.ones(n, rows, tiled.input_ids.shape[1])
        for r, ((start, end), s) in enumerate(zip(inputs.prompt_spans, features.text_slices)):
            text[:, r, start:end] = chunk[:, s]
        text = text.reshape(n * rows, -1, 1)
        hooks[vlm.TEXT_EMBED_SITE] = lambda out: out * text.to(out)
    with torch.no_grad(), patch(vlm, hooks):
        got = bound(vlm.forward(replace(tiled, tensors=tensors)))
    return got.float().cpu().reshape(n, inputs.batch_size, -1)


class Perturbation(Attribution):
    """Shared settings: ``batch_size`` masked copies per forward, ``fill`` pixel value."""

    def __init__(self, batch_size: int = 16, fill: float = 0.0) -> None:
        self.batch_size = positive_int("batch_size", batch_size)
        self.fill = number("fill", fill)

    def run(self, vlm: VLM, bound: BoundTarget, masks: torch.Tensor) -> torch.Tensor:
        return masked_forwards(vlm, bound, masks, self.batch_size, self.fill)


@register("occlusion", family=FAMILY, paper="Zeiler & Fergus 2014", level=LEVEL)
class Occlusion(Perturbation):
    """score = f(x) - f(x with a window removed), averaged over the windows covering a cell.

    A ``window`` x ``window`` square of cells slides over each image grid with ``stride``
    (positions 0, stride, ... as captum's ``Occlusion``: with a stride that does not divide
    the grid, the last cells may be covered by no window and score 0; a window larger than a
    grid shrinks to it); each prompt token is removed on its own.
    """

    def __init__(
        self, window: int = 1, stride: int = 1, batch_size: int = 16, fill: float = 0.0
    ) -> None:
        super().__init__(batch_size, fill)
        self.window = positive_int("window", window)
        self.stride = positive_int("stride", stride)

    def masks(self, features: Features) -> torch.Tensor:
        """``(M, features)``: window ``m`` of every item at once, then token ``t`` of every
        prompt at once (items never see each other's features)."""
        windows: list[list[torch.Tensor]] = [[] for _ in range(features.owners.shape[0])]
        for b, s, (rows, cols) in zip(features.image_items, features.image_slices, features.grids):
            h, w = min(self.window, rows), min(self.window, cols)
            for top in range(0, rows - h + 1, self.stride):
                for left in range(0, cols - w + 1, self.stride):
                    cells = torch.arange(top, top + h)[:, None] * cols + left + torch.arange(w)
                    windows[b].append(s.start + cells.flatten())
        n_img = max((len(ws) for ws in windows), default=0)
        n_txt = max(features.prompt_lengths, default=0)
        masks = torch.ones(n_img + n_txt, features.size)
        for ws in windows:
            for m, cells in enumerate(ws):
                masks[m, cells] = 0
        for s in features.text_slices:
            for t in range(s.stop - s.start):
                masks[n_img + t, s.start + t] = 0
        return masks

    def attribute(self, vlm: VLM, bound: BoundTarget) -> Maps:
        features = Features.of(vlm, bound.inputs)
        masks = self.masks(features)
        got = self.run(vlm, bound, torch.cat([torch.ones(1, features.size), masks]))
        delta = got[:1] - got[1:]  # (M, batch, k): f(x) - f(x without the window)
        removed = 1 - masks
        total = torch.einsum("mbk,mf->bkf", delta, removed)
        return features.maps(features.combine(total) / removed.sum(0).clamp(min=1))


@register("rise", family=FAMILY, paper="Petsiuk et al. 2018", level=LEVEL)
class RISE(Perturbation):
    """saliency = sum_i (f(x * M_i) - mean_j f(x * M_j)) M_i / (N p) over N random masks.

    The paper's estimator sum_i f(x * M_i) M_i / (N p), centred by the mean score: with
    log-probability targets every uncentred cell sits near that mean (a flat map), while the
    centred one is positive where keeping a region raises the target. The ranking of the cells
    is the paper's up to the sampling noise of sum_i M_i / (N p) around 1.

    Image side: a ``cells`` x ``cells`` grid of Bernoulli(``p``) keeps, bilinearly upsampled to
    (cells + 1) cell sizes and cropped to the image's patch grid at a random shift of less than
    one cell (soft keep values, as the paper, at patch rather than pixel resolution). Text
    side: each prompt token kept with probability ``p``. Image cells and prompt tokens are
    masked together, so one set of N forwards explains both. The default N = 500 is for speed:
    the paper uses 2000-6000 masks (4000 for ResNet-50 on ImageNet). Seeded by ``seed``; each
    item draws its masks from its own stream, so an item gets the same masks in any batch.
    """

    def __init__(
        self,
        masks: int = 500,
        cells: int = 4,
        p: float = 0.5,
        seed: int = 0,
        batch_size: int = 16,
        fill: float = 0.0,
    ) -> None:
        super().__init__(batch_size, fill)
        self.masks = positive_int("masks", masks)
        self.cells = positive_int("cells", cells)
        self.p = number("p", p)
        if not 0 < self.p <= 1:
            raise InputError(f"p must be in (0, 1], not {p!r}")
        self.seed = valid_seed(seed)

    def draw(self, features: Features) -> torch.Tensor:
        """``(masks, features)`` keep values; item ``b``'s from a generator seeded ``seed``
        (its prompt first, then its images)."""
        n = self.masks
        out = torch.ones(n, features.size)
        text = features.text_slices
        for b in range(features.owners.shape[0]):
            gen = torch.Generator().manual_seed(self.seed)
            for s in text:
                if features.owners[b, s.start : s.stop].all():
                    out[:, s] = (torch.rand(n, s.stop - s.start, generator=gen) < self.p).float()
            for j, s in enumerate(features.image_slices):
                if features.image_items[j] == b:
                    out[:, s] = self.grid(gen, features.grids[j]).reshape(n, -1)
        return out

    def grid(self, gen: torch.Generator, shape: tuple[int, int]) -> torch.Tensor:
        """``(masks, rows, cols)`` soft keeps: the paper's upsample-and-shift on the grid."""
        n, s = self.masks, self.cells
        rows, cols = shape
        ch, cw = math.ceil(rows / s), math.ceil(cols / s)
        coarse = (torch.rand(n, 1, s, s, generator=gen) < self.p).float()
        up = F.interpolate(coarse, size=((s + 1) * ch, (s + 1) * cw), mode="bilinear")[:, 0]
        dy = torch.randint(0, ch, (n, 1, 1), generator=gen) + torch.arange(rows)[:, None]
        dx = torch.randint(0, cw, (n, 1, 1), generator=gen) + torch.arange(cols)
        return up[torch.arange(n)[:, None, None], dy, dx]

    def attribute(self, vlm: VLM, bound: BoundTarget) -> Maps:
        features = Features.of(vlm, bound.inputs)
        masks = self.draw(features)
        got = self.run(vlm, bound, masks)
        centred = got - got.mean(0, keepdim=True)
        saliency = torch.einsum("nbk,nf->bkf", centred, masks) / (self.masks * self.p)
        return features.maps(features.combine(saliency))
