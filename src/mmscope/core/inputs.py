"""The prepared model inputs and where each image and prompt sits in the sequence."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image


@dataclass(frozen=True)
class ImageSpan:
    """Where one image's tokens sit and how they tile the image.

    Attributes:
        start: first token position of the image in ``sequence``.
        end: one past the last position.
        grid: (rows, cols) of the image's tokens after any merging; rows * cols == end - start.
        sequence: ``"lm"`` for the language model's sequence, ``"vision"`` for the vision
            tower's own sequence (contrastive encoders have no joint sequence).
        crop: the box (left, top, right, bottom) of the original image, in its pixels, that the
            grid covers after the processor's resize and crop.
    """

    start: int
    end: int
    grid: tuple[int, int]
    sequence: str = "lm"
    crop: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    @property
    def positions(self) -> range:
        return range(self.start, self.end)


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

    @property
    def batch_size(self) -> int:
        return len(self.images)

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
        (``mm_token_type_ids``) are extended with zeros.
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
                out[key] = torch.cat([value, torch.zeros_like(ids).to(value)], dim=1)
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
