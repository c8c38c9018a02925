"""Idefics3 and SmolVLM (Laurençon et al. 2024; Marafioti et al. 2025): a SigLIP-style tower
run on sub-images, a connector (pixel shuffle, then one linear map), a Llama-family LM.

What the rest of mmscope sees:

- **Views.** The image processor resizes each image's longest edge to ``size["longest_edge"]``
  (upscaling small images), stretches it to multiples of the tile ``max_image_size`` and cuts
  ``rows x cols`` sub-images, then adds the whole image downscaled to one tile (the *global*
  view; alone when the image fits one tile or with ``do_image_splitting=False``). Each view is
  an ``ImageSpan`` (``view`` ``"sub r,c"``, 0-based, or ``"global"``); the resizes stretch the
  whole image, so sub-image ``(r, c)``'s ``crop`` is its ``1 / rows x 1 / cols`` share.
- **Sequence.** Per sub-image ``<fake_token_around_image><row_{r+1}_col_{c+1}>`` and its image
  tokens, a newline after each row, then ``\n<fake_token_around_image><global-img>``, the
  global tokens, ``<fake_token_around_image>``: an image is several runs, each matched to its
  view by the marker before it.
- **Tokens.** The connector's ``pixel_shuffle`` folds each ``s x s`` block of patches into one
  token, raster order over the view's ``patches / s`` a side grid; ``projector``
  (``IMAGE_TOKENS_SITE``) gives ``(views, tokens, hidden)``, which ``inputs_merger`` scatters
  into the image positions in order: span order.
- **Pixels.** The processor's ``(batch, most views of an item, 3, t, t)``, padded with all-zero
  frames that the model drops, is laid out one row per view, ``(views, 1, 3, t, t)`` in span
  order (the model flattens its first two axes: same forward); an all-ones
  ``pixel_attention_mask`` is dropped. A batch is then its items one after another and an
  image's ``pixel_rows`` its views. The model would also drop a *real* view whose pixels are all
  exactly 0 (the mean colour: a fully masked view, a zero baseline), so ``forward`` and
  ``generate`` set one of its values to the dtype's smallest normal number.
- **Vision sites** (``siglip_tower`` roles) are ``(views, patches, dim)``, raster order over the
  view's patch grid, ``s`` times finer than its token grid: ``vision_grid``. No class token;
  the last block is read through ``post_layernorm``, so CAMs read the block before.
- Typed refusals: a tile grid beyond the processor's 6 x 6 ``<row_r_col_c>`` markers, and an
  image so small that a view's token cells would cover less than one of its pixels.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch
from PIL import Image
from transformers.models.idefics3 import image_processing_pil_idefics3 as hf_image

from mmscope.core.errors import ImageError, InputError
from mmscope.core.images import ImageLike
from mmscope.core.inputs import ImageSpan, Inputs
from mmscope.core.registry import register
from mmscope.models.decoder import DecoderVLM
from mmscope.models.roles import decoder_lm_roles, layer_lists
from mmscope.models.siglip_tower import patch_grids, siglip_vision_roles
from mmscope.models.spans import image_runs

_VISION_ROLES, _VISION_LISTS = siglip_vision_roles("model.vision_model")
FALLBACK = "User:{images}{prompt}<end_of_utterance>\nAssistant:"


class TooManyTilesError(InputError):
    """An image the processor would split into more sub-images a side than it has markers for."""


class ImageTooSmallError(ImageError):
    """An image whose views' token cells would each cover less than one of its pixels."""


@register("idefics3", kind="adapter", hf_classes=("Idefics3ForConditionalGeneration",))
class Idefics3VLM(DecoderVLM):
    """Adapter for ``Idefics3ForConditionalGeneration`` (Laurençon et al. 2024, Idefics3;
    SmolVLM)."""

    family = "idefics3"
    ROLES = {
        **_VISION_ROLES,
        "projector": "model.connector",
        **decoder_lm_roles("model.text_model"),
    }
    LAYER_LISTS = layer_lists(ROLES)
    CAM_SITE = "vision.layer[-2]"

    @property
    def patches_per_side(self) -> int:
        """Patches along each side of a view (the tower reads ``image_size`` px squares)."""
        vision = self.model.config.vision_config
        return int(vision.image_size // vision.patch_size)

    @property
    def tokens_per_side(self) -> int:
        """Image tokens along each side of a view, after the pixel shuffle."""
        return self.patches_per_side // int(self.model.config.scale_factor)

    @property
    def max_tiles_per_side(self) -> int:
        """Sub-images a side the processor has ``<row_r_col_c>`` markers for (6)."""
        return math.isqrt(len(getattr(self.processor, "row_col_ids", ())) or 36)

    # ----- the processor's tiling, mirrored ----------------------------------------------
    def tiles(self, image: Image.Image) -> tuple[int, int]:
        """``(rows, cols)`` of sub-images the image processor cuts ``image`` into, ``(0, 0)``
        for the global view alone (its resize arithmetic, step by step)."""
        ip = self.processor.image_processor
        height, width = image.height, image.width
        size = ip.size
        if ip.do_resize and size.get("longest_edge"):
            height, width = hf_image._resize_output_size_rescale_to_max_len(
                height, width, max_len=size["longest_edge"]
            )
            height, width = hf_image._resize_output_size_scale_below_upper_bound(
                height,
                width,
                max_len=hf_image.MAX_IMAGE_SIZE,  # type: ignore[arg-type]
            )
        elif ip.do_resize and size.get("height") and size.get("width"):
            height, width = size["height"], size["width"]
        if not ip.do_image_splitting:
            return 0, 0
        tile = int(ip.max_image_size["longest_edge"])
        aspect = width / height
        if width >= height:  # resize_for_vision_encoder
            width = math.ceil(width / tile) * tile
            height = math.ceil(int(width / aspect) / tile) * tile
        else:
            height = math.ceil(height / tile) * tile
            width = math.ceil(int(height * aspect) / tile) * tile
        if height > tile or width > tile:
            return height // tile, width // tile
        return 0, 0

    def _check(self, image: Image.Image) -> tuple[int, int]:
        """The image's tiles, refusing a grid without markers or cells under a pixel."""
        rows, cols = self.tiles(image)
        limit = self.max_tiles_per_side
        if rows > limit or cols > limit:
            raise TooManyTilesError(
                f"a {image.width}x{image.height} image would be split into {rows}x{cols} "
                f"sub-images; the Idefics3 processor has markers for {limit}x{limit} at most "
                "(lower the image processor's size['longest_edge'])"
            )
        side = self.tokens_per_side
        need_w, need_h = max(cols, 1) * side, max(rows, 1) * side
        if image.width < need_w or image.height < need_h:
            raise ImageTooSmallError(
                f"a {image.width}x{image.height} image is too small for Idefics3's views: "
                f"{max(rows, 1)}x{max(cols, 1)} view(s) of {side}x{side} tokens need at least "
                f"{need_w}x{need_h} pixels, one per token cell; upscale it first"
            )
        return rows, cols

    def _views(self, image: Image.Image, rows: int, cols: int) -> list[tuple[str, str, Any]]:
        """``(view name, marker token, crop box)`` of each view, in sequence order."""
        w, h = float(image.width), float(image.height)
        out: list[tuple[str, str, Any]] = [
            (
                f"sub {r},{c}",
                f"<row_{r + 1}_col_{c + 1}>",
                (c * w / cols, r * h / rows, (c + 1) * w / cols, (r + 1) * h / rows),
            )
            for r in range(rows)
            for c in range(cols)
        ]
        tag = str(getattr(self.processor, "global_image_tag", "<global-img>"))
        return out + [("global", tag, (0.0, 0.0, w, h))]

    def _one_image(self, rows: int, cols: int) -> str:
        """An image's text as ``Idefics3Processor`` writes it, one image token per view."""
        p = self.processor
        fake, image, tag = p.fake_image_token, p.image_token, p.global_image_tag
        text = "".join(
            "".join(f"{fake}<row_{r + 1}_col_{c + 1}>{image}" for c in range(cols)) + "\n"
            for r in range(rows)
        )
        return text + ("\n" if rows else "") + f"{fake}{tag}{image}{fake}"

    # ----- prepare -----------------------------------------------------------------------
    def _placeholder(self) -> str:
        return str(getattr(self.processor, "image_token", "<image>"))

    def _template(self, n_images: int, prompt: str) -> str:
        text = self._chat_text(n_images, prompt, fallback=FALLBACK)
        bos = self.tokenizer.bos_token
        if bos and self.tokenizer.bos_token_id in self.tokenizer("")["input_ids"]:
            text = text.removeprefix(bos)  # the tokenizer adds it
        return text

    def _process(self, images: Sequence[Image.Image], texts: list[str]) -> dict[str, Any]:
        nested = self._images_per_prompt(images, texts)
        out = self.processor(
            images=nested if images else None, text=texts, return_tensors="pt", padding=True
        )
        return dict(out)

    def prepare(
        self, images: ImageLike | Sequence[ImageLike] | None, prompt: str | Sequence[str]
    ) -> Inputs:
        items, prompts = self._batch(images, prompt)
        tiles = [[self._check(im) for im in imgs] for imgs in items]
        texts, tensors = self._processed(items, prompts)
        ids = tensors["input_ids"]
        spans = [self._spans(ids[b], imgs, tiles[b]) for b, imgs in enumerate(items)]
        collapsed = []  # each item's text with one placeholder per view, as the runs are
        for b, text in enumerate(texts):
            parts = text.split(self._placeholder())
            collapsed.append(
                parts[0] + "".join(self._one_image(*t) + p for t, p in zip(tiles[b], parts[1:]))
            )
        runs = [[(s.start, s.end) for s in item] for item in spans]
        frames = [b for b, item in enumerate(spans) if item]
        if "pixel_values" in tensors:
            tensors.update(self._per_view(tensors, [len(spans[b]) for b in frames], frames))
        return self._inputs(tensors, items, prompts, spans, collapsed, runs)

    def _spans(
        self, ids: torch.Tensor, images: Sequence[Image.Image], tiles: Sequence[tuple[int, int]]
    ) -> list[ImageSpan]:
        """One span per view of the item's images, each run matched to its marker."""
        expected = [
            (i, name, marker, crop)
            for i, (image, (rows, cols)) in enumerate(zip(images, tiles))
            for name, marker, crop in self._views(image, rows, cols)
        ]
        runs = image_runs(ids, self.image_token_id)
        if len(runs) != len(expected):
            raise InputError(f"found {len(runs)} image-token runs for {len(expected)} views")
        side, tok = self.tokens_per_side, self.tokenizer
        out = []
        for (start, end), (i, name, marker, crop) in zip(runs, expected):
            marker_id = tok.convert_tokens_to_ids(marker)
            if end - start != side * side or start == 0 or int(ids[start - 1]) != marker_id:
                raise InputError(
                    f"the image tokens at {start}..{end} are not the {side * side} tokens of "
                    f"view {name!r} after {marker} (processor and model disagree)"
                )
            out.append(ImageSpan(start, end, (side, side), "lm", crop, image=i, view=name))
        return out

    @staticmethod
    def _per_view(
        tensors: dict[str, Any], counts: list[int], items: list[int]
    ) -> dict[str, torch.Tensor]:
        """``pixel_values`` one row per view, ``(views, 1, 3, t, t)``, the padding dropped."""
        pixels = tensors["pixel_values"]
        out = {"pixel_values": torch.cat([pixels[b, :n] for b, n in zip(items, counts)])[:, None]}
        mask = tensors.pop("pixel_attention_mask", None)
        if mask is not None:
            mask = torch.cat([mask[b, :n] for b, n in zip(items, counts)])[:, None]
            if not bool(mask.all()):
                out["pixel_attention_mask"] = mask
        return out

    # ----- running -----------------------------------------------------------------------
    def _kept(self, inputs: Inputs) -> Inputs:
        """``inputs`` with every all-zero view nudged off zero, so the model keeps it."""
        pixels = inputs.tensors.get("pixel_values")
        if pixels is None:
            return inputs
        empty = (pixels == 0).flatten(1).all(1)
        if not bool(empty.any()):
            return inputs
        tiny = max(torch.finfo(pixels.dtype).tiny, torch.finfo(self.dtype).tiny)
        bump = torch.zeros_like(pixels)
        bump[empty, 0, 0, 0, 0] = tiny
        return replace(inputs, tensors={**inputs.tensors, "pixel_values": pixels + bump})

    def forward(self, inputs: Inputs, **kwargs: Any) -> Any:
        return super().forward(self._kept(inputs), **kwargs)

    def generate(self, inputs: Inputs, max_new_tokens: int = 24, **kwargs: Any) -> list[str]:
        return super().generate(self._kept(inputs), max_new_tokens, **kwargs)

    # ----- what attribution methods reach ------------------------------------------------
    def pixel_rows(self, inputs: Inputs) -> list[int]:
        """Rows of ``pixel_values`` per image: one per view."""
        return [
            len(inputs.views(b, i))
            for b, imgs in enumerate(inputs.images)
            for i in range(len(imgs))
        ]

    def pixel_values_of(self, images: Sequence[Image.Image]) -> torch.Tensor:
        ip = self.processor.image_processor
        out = ip(images=[[im] for im in images], return_tensors="pt", return_row_col_info=True)
        counts = [r[0] * c[0] + 1 if r[0] else 1 for r, c in zip(out["rows"], out["cols"])]
        frames = torch.cat([out["pixel_values"][i, :n] for i, n in enumerate(counts)])
        return frames[:, None].to(self.device, self.dtype)

    def _frames(self, values: torch.Tensor, inputs: Inputs) -> list[ImageSpan]:
        spans = self.flat_spans(inputs)
        if values.dim() != 5 or values.shape[0] != len(spans):
            raise InputError(
                f"expected pixel values of {len(spans)} views (views, 1, 3, h, w), "
                f"got {tuple(values.shape)}"
            )
        return spans

    def pixel_grid(self, values: torch.Tensor, inputs: Inputs) -> list[torch.Tensor]:
        out = []
        for frame, span in zip(values.sum(2)[:, 0], self._frames(values, inputs)):
            rows, cols = span.grid
            h, w = frame.shape[0] // rows, frame.shape[1] // cols
            out.append(frame[: rows * h, : cols * w].reshape(rows, h, cols, w).sum((1, 3)))
        return out

    def mask_pixels(
        self,
        values: torch.Tensor,
        inputs: Inputs,
        keep: torch.Tensor | Sequence[torch.Tensor],
        fill: float | torch.Tensor = 0.0,
    ) -> torch.Tensor:
        """``pixel_values`` with each view's token cells (``s x s`` patches each) blended to
        ``fill`` by ``1 - keep``; ``keep`` holds one ``(rows, cols)`` grid per view."""
        spans = self._frames(values, inputs)
        if len(keep) != len(spans):
            raise InputError(f"mask_pixels needs {len(spans)} keep grids, got {len(keep)}")
        ups = []
        for grid, span in zip(keep, spans):
            rows, cols = span.grid
            h, w = values.shape[-2] // rows, values.shape[-1] // cols
            ups.append(grid.to(values).repeat_interleave(h, 0).repeat_interleave(w, 1))
        up = torch.stack(ups)[:, None, None]
        return values * up + (1 - up) * fill

    def vision_grid(self, value: torch.Tensor, inputs: Inputs) -> list[torch.Tensor]:
        """A tower layer's ``(views, patches, dim)`` as each view's patch grid (``s`` times
        finer than its token grid: token ``(i, j)`` holds patches ``(s i .. s i + s - 1,
        s j .. s j + s - 1)``)."""
        return patch_grids(value, self.patches_per_side)
