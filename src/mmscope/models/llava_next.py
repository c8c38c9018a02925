"""LLaVA-NeXT (Liu et al. 2024, LLaVA-1.6): LLaVA's CLIP tower, MLP projector and language
model, with any-res images: a base view of the whole image and the tiles of a best-fit grid.

What differs from LLaVA (whose roles and module paths it shares):

- The processor's ``pixel_values`` is ``(images, 1 + tiles, 3, size, size)`` (tiles padded to
  the batch's most) with ``image_sizes`` ``(images, 2)``; ``prepare`` keeps the rows the model
  uses, concatenated: ``(sum of 1 + tiles, 3, size, size)``, which the model takes as it is (the
  tower and the projector run on exactly these rows: ``(sum of 1 + tiles, patches, dim)``), so
  that ``pixel_rows`` (1 + tiles per image) are the tower's rows too.
- Each image is one run of image tokens holding two *views* (``mmscope.models.anyres``): the
  base view's patches, then the stitched tiles unpadded back to the image's aspect ratio, each
  row followed by the learned ``image_newline``. ``prepare`` makes one ``ImageSpan`` per view;
  the tiles view's ``cells`` skip the newlines. Every hook (``image_tokens``, ``pixel_grid``,
  ``mask_pixels``, ``vision_grid``) works per view through the layout; the projector's rows for
  patches that unpadding drops are in no view and are left as they are.
- A processor whose tiles differ from the model's packing (other ``image_grid_pinpoints``) is
  refused in one line before the model would fail.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from mmscope.core.errors import InputError
from mmscope.core.images import ImageLike
from mmscope.core.inputs import ImageSpan, Inputs
from mmscope.core.registry import register
from mmscope.models import anyres
from mmscope.models.llava import LlavaVLM
from mmscope.models.spans import image_runs


def used_rows(pixel_values: torch.Tensor, layouts: list[anyres.Layout]) -> torch.Tensor:
    """The processor's ``(images, rows, 3, size, size)`` as the used rows, concatenated."""
    if pixel_values.dim() == 4:
        return pixel_values
    if len(layouts) == 1:  # one image: a view of its rows, no copy
        return pixel_values[0, : layouts[0].rows]
    return torch.cat([image[: lay.rows] for image, lay in zip(pixel_values, layouts)])


@register("llava_next", kind="adapter", hf_classes=("LlavaNextForConditionalGeneration",))
class LlavaNextVLM(LlavaVLM):
    """Adapter for ``LlavaNextForConditionalGeneration`` (Liu et al. 2024, LLaVA-NeXT)."""

    family = "llava_next"

    # ----- the layout ---------------------------------------------------------------------
    @property
    def pinpoints(self) -> anyres.Pinpoints:
        """The model's ``image_grid_pinpoints`` as (height, width) pairs."""
        return tuple((int(h), int(w)) for h, w in self.model.config.image_grid_pinpoints)

    @property
    def max_tiles(self) -> int | None:
        """Tiles' worth of patches above which the model shrinks the tiles grid (none here)."""
        return None

    def _patched(self, tensors: dict[str, Any], n_images: int) -> list[bool]:
        """Per image, whether it is tiled (always, for LLaVA-NeXT)."""
        return [True] * n_images

    def layouts(self, tensors: Any) -> list[anyres.Layout]:
        """Each image's layout (flat over the batch), from ``image_sizes`` and the config."""
        if "image_sizes" not in tensors:
            return []
        vision = self.model.config.vision_config
        sizes = tensors["image_sizes"].tolist()
        patched = self._patched(dict(tensors), len(sizes))
        return [
            anyres.layout(
                int(h),
                int(w),
                pinpoints=self.pinpoints,
                tile=int(vision.image_size),
                patch=int(vision.patch_size),
                max_tiles=self.max_tiles,
                patched=p,
            )
            for (h, w), p in zip(sizes, patched)
        ]

    def _check_tiles(self, tensors: dict[str, Any], layouts: list[anyres.Layout]) -> None:
        """Refuse a processor whose tiles the model would pack otherwise (or fail on)."""
        tile = int(self.model.config.vision_config.image_size)
        size = int(tensors["pixel_values"].shape[-1])
        if size != tile:
            raise InputError(f"the processor makes {size} px tiles; {self.name} reads {tile} px")
        pins = getattr(self.processor.image_processor, "image_grid_pinpoints", None)
        limit = max((h // tile) * (w // tile) for h, w in self.pinpoints)
        for i, lay in enumerate(layouts):
            if not lay.n_tiles or pins is None:
                continue
            best_h, best_w = anyres.best_resolution(lay.height, lay.width, pins)
            n = math.ceil(best_h / tile) * math.ceil(best_w / tile)
            if n == lay.n_tiles:
                continue
            cut = f"image {i} ({lay.width}x{lay.height}) is cut into {n} tiles by the processor"
            if n > limit:
                raise InputError(
                    f"{cut}, over the {limit} that {self.name}'s image_grid_pinpoints allow; "
                    "give the processor the model's pinpoints"
                )
            raise InputError(
                f"{cut}, where {self.name} packs {lay.n_tiles}; give the processor the model's "
                "image_grid_pinpoints"
            )

    # ----- prepare: one span per view -----------------------------------------------------
    def prepare(
        self, images: ImageLike | Sequence[ImageLike] | None, prompt: str | Sequence[str]
    ) -> Inputs:
        items, prompts = self._batch(images, prompt)
        texts, tensors = self._processed(items, prompts)
        flat = [im for imgs in items for im in imgs]
        layouts = self.layouts(tensors) if flat else []
        if flat:
            self._check_tiles(tensors, layouts)
            tensors["pixel_values"] = used_rows(tensors["pixel_values"], layouts)
        spans, all_runs = [], []
        k = 0
        for b, imgs in enumerate(items):
            mine = layouts[k : k + len(imgs)]
            runs = anyres.split_runs(
                image_runs(tensors["input_ids"][b], self.image_token_id),
                [lay.length for lay in mine],
            )
            views: list[ImageSpan] = []
            for j, ((start, _), lay) in enumerate(zip(runs, mine)):
                views.extend(lay.views(start, j))
            spans.append(views)
            all_runs.append(runs)
            k += len(imgs)
        return self._inputs(tensors, items, prompts, spans, texts, all_runs)

    # ----- what attribution methods reach, per view ---------------------------------------
    def _rows(self, value: torch.Tensor, inputs: Inputs, what: str) -> list[anyres.Layout]:
        layouts = self.layouts(inputs.tensors)
        rows = sum(lay.rows for lay in layouts)
        if value.dim() != 3 or value.shape[0] != rows:
            raise InputError(
                f"{what} gives {tuple(value.shape)}, not ({rows} tower rows, patches, dim)"
            )
        return layouts

    def pixel_rows(self, inputs: Inputs) -> list[int]:
        """Rows of ``pixel_values`` (and of the tower) per image: its base view and tiles."""
        return [lay.rows for lay in self.layouts(inputs.tensors)]

    def pixel_values_of(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = self.processor.image_processor(images=list(images), return_tensors="pt")
        pixels = used_rows(out["pixel_values"], self.layouts(out))
        return pixels.to(self.device, self.dtype)

    def pixel_grid(self, values: torch.Tensor, inputs: Inputs) -> list[torch.Tensor]:
        out, row = [], 0
        for lay in self.layouts(inputs.tensors):
            out.extend(anyres.pixel_grids(values[row : row + lay.rows], lay))
            row += lay.rows
        return out

    def mask_pixels(
        self,
        values: torch.Tensor,
        inputs: Inputs,
        keep: torch.Tensor,
        fill: float | torch.Tensor = 0.0,
    ) -> torch.Tensor:
        """``keep``: per view (span order) its ``(rows, cols)`` grid in [0, 1]; each pixel is
        blended to ``fill`` by 1 - its cell's keep (patches unpadding drops are kept)."""
        keeps = list(keep)
        ups, k = [], 0
        for lay in self.layouts(inputs.tensors):
            n = 2 if lay.n_tiles else 1
            ups.append(anyres.pixel_keep([g.to(values) for g in keeps[k : k + n]], lay))
            k += n
        if k != len(keeps):
            raise InputError(f"mask_pixels got {len(keeps)} keep grids for {k} views")
        up = torch.cat(ups)
        return values * up + (1 - up) * fill

    def vision_grid(self, value: torch.Tensor, inputs: Inputs) -> list[torch.Tensor]:
        layouts = self.layouts(inputs.tensors)
        if value.dim() != 3 or value.shape[0] != sum(lay.rows for lay in layouts):
            raise RuntimeError(f"expected one tower row per tile, got {tuple(value.shape)}")
        out, row = [], 0
        for lay in layouts:
            out.extend(anyres.vision_grids(value[row : row + lay.rows], lay))
            row += lay.rows
        return out

    def image_tokens(self, value: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        """The projector's output as every view's cells in span order (the base view's
        patches, then the tiles view's unpadded cells), newlines and dropped patches left out."""
        return anyres.image_tokens(value, self._rows(value, inputs, "the projector"))

    def with_image_tokens(
        self, value: torch.Tensor, tokens: torch.Tensor, inputs: Inputs
    ) -> torch.Tensor:
        layouts = self._rows(value, inputs, "the projector")
        return anyres.with_image_tokens(value, tokens, layouts)
