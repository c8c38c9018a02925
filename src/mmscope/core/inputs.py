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

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> Inputs:
        """A copy on ``device``; floating tensors are cast to ``dtype`` when given."""
        moved: dict[str, Any] = {}
        for key, value in self.tensors.items():
            if dtype is not None and torch.is_floating_point(value):
                moved[key] = value.to(device=device, dtype=dtype)
            else:
                moved[key] = value.to(device)
        return replace(self, tensors=moved)
