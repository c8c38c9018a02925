"""The prepared model inputs and where each image and prompt sits in the sequence."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image


@dataclass(frozen=True)
class ImageSpan:
    """One *view* of an image: where its tokens sit and which part of the image they tile.

    Most families show each image once (one view, its tokens one contiguous run). Tiling
    families show an image several times, each view with its own grid and box: a base view of
    the whole image and the tiles stitched into one grid (LLaVA-NeXT), sub-images and a global
    view (Idefics3), frames of a video. Every map, mask and token set goes through the views:
    ``grid`` and ``positions`` say which sequence position holds which cell, ``crop`` where the
    cells lie in the original image's pixels.

    Attributes:
        start: first token position of the view in ``sequence``.
        end: one past its last position (``start``..``end`` may also hold separator tokens,
            such as LLaVA-NeXT's row newlines, when ``cells`` is given).
        grid: (rows, cols) of the view's tokens after any merging.
        sequence: ``"lm"`` for the language model's sequence, ``"vision"`` for the vision
            tower's own sequence (contrastive encoders have no joint sequence; Mllama's
            language model reads the image through cross-attention, and its ``start``..``end``
            index the item's image cells in ``vlm.image_tokens`` order).
        crop: the box (left, top, right, bottom) of the original image, in its pixels, that the
            grid covers after the processor's resize, crop or tiling.
        image: which of its item's images the view shows; -1 (default) for the span's own
            index (one view per image).
        view: the view's name (``""`` for the only view of an image; ``"base"``, ``"tiles"``,
            ``"global"``, ``"tile 0,1"``, ``"frame 3"``).
        cells: the sequence positions of the grid's cells in raster order, when they are not
            ``start``..``end`` in order.
    """

    start: int
    end: int
    grid: tuple[int, int]
    sequence: str = "lm"
    crop: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)
    image: int = -1
    view: str = ""
    cells: tuple[int, ...] = ()

    @property
    def positions(self) -> Sequence[int]:
        """The sequence position of each grid cell, in raster order (``rows * cols`` of them)."""
        return self.cells if self.cells else range(self.start, self.end)

    @property
    def size(self) -> int:
        """Number of cells: ``rows * cols``."""
        return self.grid[0] * self.grid[1]

    def image_index(self, k: int) -> int:
        """The image this view shows, given that it is its item's ``k``-th span."""
        return k if self.image < 0 else self.image


@dataclass(frozen=True)
class Inputs:
    """Tensors for the model plus the spans that say what each position is.

    Made by ``vlm.prepare(images, prompt)``. Batch item ``b`` has ``images[b]`` (its original
    images), ``image_spans[b]`` (one span per image), ``prompt_spans[b]`` (the positions of the
    user's prompt tokens) and ``prompts[b]``.
    """

    tensors: Mapping[str, torch.Tensor]
    images: tuple[tuple[Image.Image, ...], ...]
    image_spans: tuple[tuple[ImageSpan, ...], ...]
    prompts: tuple[str, ...]
    prompt_spans: tuple[tuple[int, int], ...]
    prompt_tokens: tuple[tuple[str, ...], ...] = field(default=())
    #: Value ``extend`` gives appended positions of a per-token tensor (default 0); PaliGemma
    #: marks the tokens after its prefix with ``token_type_ids`` 1 (causal, as generated).
    extend_fill: Mapping[str, int] = field(default_factory=dict)
    #: Per-token tensors ``(batch, sequence, ...)`` whose appended positions repeat the last
    #: position (Mllama's ``cross_attention_mask``: a new token reads the images the last reads).
    extend_repeat: tuple[str, ...] = ()

    @property
    def batch_size(self) -> int:
        return len(self.images)

    def views(self, item: int, image: int) -> list[int]:
        """Indices into ``image_spans[item]`` of the views of the item's ``image``-th image."""
        spans = self.image_spans[item]
        return [k for k, span in enumerate(spans) if span.image_index(k) == image]

    @property
    def input_ids(self) -> torch.Tensor:
        return self.tensors["input_ids"]

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.tensors["attention_mask"]

    @property
    def pixel_values(self) -> torch.Tensor:
        return self.tensors["pixel_values"]

    def tile(self, n: int) -> Inputs:
        """The whole batch repeated ``n`` times (item order b0, b1, ..., b0, b1, ...).

        Every tensor is tiled along its first axis, which keeps per-image tensors (LLaVA's
        ``(images, 3, H, W)``, Qwen2-VL's flattened patches and grids) in step with the items.
        """
        if n < 1:
            raise ValueError("tile needs n >= 1")
        tiled = {k: v.repeat(n, *([1] * (v.dim() - 1))) for k, v in self.tensors.items()}
        return replace(
            self,
            tensors=tiled,
            images=self.images * n,
            image_spans=self.image_spans * n,
            prompts=self.prompts * n,
            prompt_spans=self.prompt_spans * n,
            prompt_tokens=self.prompt_tokens * n,
        )

    def extend(self, ids: torch.Tensor, keep: torch.Tensor | None = None) -> Inputs:
        """Teacher forcing: ``ids`` ``(batch, k)`` appended to every item's sequence.

        ``keep`` (bool, same shape) marks real tokens; the rest are padding after the item's
        end, which causal attention never lets earlier positions see. Other per-token tensors
        (``mm_token_type_ids``) are extended with zeros, or with their ``extend_fill``.
        """
        seq = self.input_ids
        if ids.dim() != 2 or ids.shape[0] != seq.shape[0]:
            raise ValueError(
                f"extend needs ids of shape ({seq.shape[0]}, k), got {tuple(ids.shape)}"
            )
        keep = torch.ones_like(ids, dtype=torch.bool) if keep is None else keep
        out: dict[str, Any] = dict(self.tensors)
        for key, value in self.tensors.items():
            if key == "input_ids":
                out[key] = torch.cat([value, ids.to(value)], dim=1)
            elif key == "attention_mask":
                out[key] = torch.cat([value, keep.to(value)], dim=1)
            elif value.shape == seq.shape:
                fill = torch.full_like(ids, self.extend_fill.get(key, 0))
                out[key] = torch.cat([value, fill.to(value)], dim=1)
            elif key in self.extend_repeat:
                last = value[:, -1:].expand(-1, ids.shape[1], *value.shape[2:])
                out[key] = torch.cat([value, last], dim=1)
        return replace(self, tensors=out)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Inputs:
        """A copy on ``device``; floating tensors are cast to ``dtype`` when given."""
        moved: dict[str, Any] = {}
        for key, value in self.tensors.items():
            if dtype is not None and torch.is_floating_point(value):
                moved[key] = value.to(device=device, dtype=dtype)
            else:
                moved[key] = value.to(device)
        return replace(self, tensors=moved)
