"""InternVL 2.5 / 3 (Chen et al. 2024, ``InternVLForConditionalGeneration``): an InternViT
vision tower, a projector that pixel-shuffles 2x2 patches into one token and applies an MLP,
and a Qwen2 (or Llama) language model.

What the rest of mmscope sees:

- Tiles (dynamic high resolution). The processor (``GotOcr2ImageProcessor`` with
  ``crop_to_patches``) picks the grid of ``cols x rows`` tiles whose aspect ratio is closest to
  the image's, among grids of ``min_patches`` to ``max_patches`` tiles (a tie goes to more
  tiles while the image's area exceeds half of theirs), resizes the whole image to that canvas
  (each axis linearly, the aspect ratio not kept) and cuts it into tiles of ``size`` pixels in
  raster order; with more than one tile, a thumbnail (the whole image resized to one tile)
  follows. ``pixel_values`` is ``(tiles of the batch, 3, size, size)``: item by item, image by
  image, tile by tile (``pixel_rows`` = tiles per image).
- Text: each image is ``<img>`` + ``<IMG_CONTEXT>`` x (tokens per tile x tiles) + ``</img>``,
  its tiles' tokens one after the other in ``pixel_values`` order.
- Views: one ``ImageSpan`` per tile, ``"tile r,c"``, whose ``crop`` is the tile's box in the
  original image (``(c W / cols, r H / rows, (c + 1) W / cols, (r + 1) H / rows)``), then
  ``"thumbnail"`` (the whole image) when there are several tiles; each a contiguous run of the
  image's tokens with grid ``(k, k)``, ``k = size / patch * downsample_ratio``.
- The pixel shuffle (``InternVLModel.pixel_shuffle``): a tile's ``(2k)^2`` patches (after the
  tower's class token, which the projector drops) in raster order become ``k^2`` tokens in
  raster order, token ``(i, j)`` the channels of patches ``(2i + m, 2j + n)``, ``m`` major.
  So token cell ``(i, j)`` is the tile's pixel block ``(i, j)`` of a ``k x k`` cut: the base
  ``pixel_grid`` and ``mask_pixels`` work per tile row, and the projector's output
  ``(tiles, k^2, hidden)`` lists the span cells in span order (the base ``image_tokens``).
- ``vision_grid`` gives a tile's ``2k x 2k`` patch grid (twice finer than its span's grid), in
  the tower's raster order, before the shuffle.
- ``CAM_SITE`` is the block before the one the projector reads: the projector layer-normalises
  each 2x2 group of that block's patches, which makes sum(grad * act) over a group vanish.
- Refused with a typed error before any work: an image so small that a token cell of its tiles
  would cover less than one of its pixels (``ImageError``), and a tile grid outside the
  processor's ``min_patches`` .. ``max_patches`` (``InputError``; the processor itself falls
  back to one tile when no grid fits).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from PIL import Image
from transformers import InternVLProcessor
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

from mmscope.core.errors import ImageError, InputError
from mmscope.core.images import ImageLike
from mmscope.core.inputs import ImageSpan, Inputs
from mmscope.core.registry import register
from mmscope.models.decoder import DecoderVLM
from mmscope.models.qwen2_vl import ImageOnlyProcessor
from mmscope.models.roles import decoder_lm_roles, layer_lists, stack_roles

_V = "model.vision_tower.encoder.layer"
#: InternViT's layer: ``attention.projection_layer``, ``mlp.activation_fn``.
INTERN_VIT_LAYER = {
    "attn": "attention",
    "heads": "attention.projection_layer",
    "act": "mlp.activation_fn",
}
FALLBACK = "<|im_start|>user\n{images}\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


class ImageOnlyInternVLProcessor(ImageOnlyProcessor, InternVLProcessor):
    """``InternVLProcessor`` without its video processor (see ``ImageOnlyProcessor``); its
    ``image_seq_length`` (tokens per tile) is a named argument, so it is saved and loaded."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        image_seq_length: int = 256,
        chat_template: Any = None,
        **kw: Any,
    ) -> None:
        super().__init__(
            image_processor,
            tokenizer,
            chat_template=chat_template,
            image_seq_length=image_seq_length,
            **kw,
        )


@dataclass(frozen=True)
class Tiling:
    """How the processor shows one image: ``tiles`` (rows, cols), whether a ``thumbnail``
    follows them, and ``side``, the tokens along a tile's side."""

    tiles: tuple[int, int]
    thumbnail: bool
    side: int

    @property
    def count(self) -> int:
        """Rows of ``pixel_values`` (tiles, thumbnail included)."""
        return self.tiles[0] * self.tiles[1] + int(self.thumbnail)

    def views(self, start: int, image: int, size: tuple[int, int]) -> list[ImageSpan]:
        """The image's views from sequence position ``start``: tiles, then the thumbnail."""
        (rows, cols), (width, height), n = self.tiles, size, self.side * self.side
        w, h = width / cols, height / rows
        out = []
        for t in range(rows * cols):
            r, c = divmod(t, cols)
            box = (c * w, r * h, (c + 1) * w, (r + 1) * h)
            pos = start + t * n
            out.append(ImageSpan(pos, pos + n, (self.side,) * 2, "lm", box, image, f"tile {r},{c}"))
        if self.thumbnail:
            pos = start + rows * cols * n
            whole = (0.0, 0.0, float(width), float(height))
            out.append(ImageSpan(pos, pos + n, (self.side,) * 2, "lm", whole, image, "thumbnail"))
        return out


@register("internvl", kind="adapter", hf_classes=("InternVLForConditionalGeneration",))
class InternVLVLM(DecoderVLM):
    """Adapter for ``InternVLForConditionalGeneration`` (Chen et al. 2024, InternVL 2.5/3)."""

    family = "internvl"
    CLASS_TOKEN = True  # InternViT's; the projector drops it ("default" feature strategy)
    ROLES = {
        "vision.embed": "model.vision_tower.embeddings",
        **stack_roles("vision.layer", _V, INTERN_VIT_LAYER),
        "projector": "model.multi_modal_projector",
        **decoder_lm_roles(),
    }
    LAYER_LISTS = layer_lists(ROLES)

    @property
    def CAM_SITE(self) -> str:  # type: ignore[override]  # noqa: N802  (the base's class constant)
        """The block before the one the projector reads (module docstring)."""
        layer = self.model.config.vision_feature_layer
        layer = layer[-1] if isinstance(layer, (list, tuple)) else layer
        n = self.num_layers("vision.layer")
        read = layer - 1 if layer >= 0 else n + layer  # hidden_states[0] is the embeddings
        return f"vision.layer[{read - 1}]" if read > 0 else "vision.embed"

    @classmethod
    def load_processor(cls, source: Any, trust_remote_code: bool = False) -> Any:
        """The image-only processor: the stock one needs torchvision for its video half."""
        return ImageOnlyInternVLProcessor.from_pretrained(source)

    # ----- tiling --------------------------------------------------------------------------
    @property
    def tile_size(self) -> int:
        return int(self.processor.image_processor.size["height"])

    @property
    def tokens_per_side(self) -> int:
        """Tokens along a tile's side after the pixel shuffle."""
        patch = self.model.config.vision_config.patch_size
        patch = patch[0] if isinstance(patch, (list, tuple)) else patch
        return int(self.tile_size // int(patch) * float(self.model.config.downsample_ratio))

    def _crops(self) -> bool:
        """Whether the processor tiles (its ``crop_to_patches`` default beats the image
        processor's own setting, as ``InternVLProcessor`` passes it on every call)."""
        ip = self.processor.image_processor
        default = getattr(self.processor, "images_kwargs", {}).get("crop_to_patches")
        return bool(ip.crop_to_patches if default is None else default)

    def tiling(self, image: Image.Image) -> Tiling:
        """The processor's tiling of ``image``, refused when the image is too small for it
        (``ImageError``) or the grid is outside the processor's tile limits (``InputError``)."""
        ip, side = self.processor.image_processor, self.tokens_per_side
        low, high = int(ip.min_patches), int(ip.max_patches)
        rows = cols = 1
        if self._crops() and high > 1:
            size = (self.tile_size, self.tile_size)
            cols, rows = get_optimal_tiled_canvas((image.height, image.width), size, low, high)
            if not low <= rows * cols <= high:
                raise InputError(
                    f"the processor tiles a {image.width}x{image.height} image into "
                    f"{rows * cols} tile(s), outside its limit of {low} to {high} tiles "
                    "(min_patches must not exceed max_patches)"
                )
        if image.width < cols * side or image.height < rows * side:
            raise ImageError(
                f"a {image.width}x{image.height} image is too small for {self.name}'s tiles: "
                f"{rows}x{cols} tile(s) of {side}x{side} tokens need at least "
                f"{cols * side}x{rows * side} pixels (one per token cell)"
            )
        return Tiling((rows, cols), rows * cols > 1, side)

    def _batch(
        self, images: ImageLike | Sequence[ImageLike] | None, prompt: str | Sequence[str]
    ) -> tuple[list[list[Image.Image]], list[str]]:
        items, prompts = super()._batch(images, prompt)
        for item in items:  # refuse before the processor runs
            for image in item:
                self.tiling(image)
        return items, prompts

    # ----- preparing -----------------------------------------------------------------------
    def prepare(
        self, images: ImageLike | Sequence[ImageLike] | None, prompt: str | Sequence[str]
    ) -> Inputs:
        """As decoders do, then each image's run of tokens cut into its views (tiles, then
        the thumbnail; module docstring)."""
        seq = int(getattr(self.processor, "image_seq_length", 0))
        if seq != self.tokens_per_side**2:
            raise InputError(
                f"the processor gives {seq} tokens per tile, the model {self.tokens_per_side**2}"
            )
        inputs = super().prepare(images, prompt)
        spans, tiles = [], 0
        for b, (item, runs) in enumerate(zip(inputs.images, inputs.image_spans)):
            views: list[ImageSpan] = []
            for m, (image, run) in enumerate(zip(item, runs)):
                tiling = self.tiling(image)
                if run.end - run.start != tiling.count * seq:
                    raise InputError(f"the processor tiled image {m} of item {b} unexpectedly")
                views.extend(tiling.views(run.start, m, image.size))
                tiles += tiling.count
            spans.append(tuple(views))
        pixels = inputs.tensors.get("pixel_values")
        if pixels is not None and pixels.shape[0] != tiles:
            raise InputError(f"the processor made {pixels.shape[0]} tiles, not {tiles}")
        return replace(inputs, image_spans=tuple(spans))

    def _grids(self, tensors: dict[str, Any], n_images: int) -> list[tuple[int, int]]:
        return [(1, 1)] * n_images  # placeholders: ``prepare`` sets each view's grid

    def _placeholder(self) -> str:
        return str(getattr(self.processor, "image_token", "<IMG_CONTEXT>"))

    def _one_image(self) -> str:
        """An image's text with one context token: tokenised, one image token per image."""
        p = self.processor
        return f"{p.start_image_token}{self._placeholder()}{p.end_image_token}"

    def _template(self, n_images: int, prompt: str) -> str:
        text = self._chat_text(n_images, prompt, fallback=FALLBACK)
        return text.replace(self._placeholder(), self._one_image())

    def _process(self, images: Sequence[Image.Image], texts: list[str]) -> dict[str, Any]:
        plain = [t.replace(self._one_image(), self._placeholder()) for t in texts]
        out = self.processor(
            images=list(images) or None, text=plain, return_tensors="pt", padding=True
        )
        return dict(out)

    # ----- where attribution methods reach the image ---------------------------------------
    def pixel_rows(self, inputs: Inputs) -> list[int]:
        """Tiles per image (thumbnail included), item by item."""
        return [
            len(inputs.views(b, m))
            for b, item in enumerate(inputs.images)
            for m in range(len(item))
        ]

    def pixel_values_of(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = self.processor.image_processor(
            images=list(images), crop_to_patches=self._crops(), return_tensors="pt"
        )
        return out["pixel_values"].to(self.device, self.dtype)

    def mask_pixels(
        self,
        values: torch.Tensor,
        inputs: Inputs,
        keep: torch.Tensor | Sequence[torch.Tensor],
        fill: float | torch.Tensor = 0.0,
    ) -> torch.Tensor:
        """``pixel_values`` with each cell of each view (one tile row each) blended to
        ``fill`` by ``1 - keep``; ``keep`` is one ``(k, k)`` grid per span, in span order."""
        grids = keep if isinstance(keep, torch.Tensor) else torch.stack(list(keep))
        return super().mask_pixels(values, inputs, grids, fill)

    def vision_grid(self, value: torch.Tensor, inputs: Inputs) -> list[torch.Tensor]:
        """A vision layer's output ``(tiles, 1 + (2k)^2, dim)`` as one ``(2k, 2k, dim)`` patch
        grid per view (the class token dropped), raster order as the tower sees the tile."""
        side = round((value.shape[1] - 1) ** 0.5) if value.dim() == 3 else 0
        if side == 0 or value.shape[1] != 1 + side * side:
            raise RuntimeError(f"expected (tiles, 1 + patches, dim), got {tuple(value.shape)}")
        return [tile[1:].reshape(side, side, -1) for tile, _ in zip(value, self.flat_spans(inputs))]
