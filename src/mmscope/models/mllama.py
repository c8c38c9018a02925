"""Llama 3.2 Vision (Meta 2024, ``MllamaForConditionalGeneration``): a tiled two-stage ViT, a
linear projector and a Llama language model that reads the image through cross-attention
layers interleaved with its self-attention layers.

What the rest of mmscope sees:

- The image is not in the language model's sequence. The text holds one ``<|image|>`` token
  per image; the language model's cross-attention layers (``cross_attention_layers`` in the
  text config) read the projected vision features as keys and values, gated by the
  processor's ``cross_attention_mask`` ``(batch, sequence, images, max tiles)``: a token reads
  the tiles of the images from the last ``<|image|>`` at or before it on. (Positions before
  the first ``<|image|>`` have no tile to read; transformers then lets them attend to every
  key unmasked and zeroes only their MLP output, so the image reaches them too.)
  Self-attention layers have ``lm.layer.attn``, cross-attention layers
  ``lm.layer.cross_attn`` (its ``.probs``: ``(batch, heads, sequence, images * tiles *
  (p * p + 1))``); asking a layer for the other raises ``SiteError``, and
  ``non_softmax_layers("lm.layer")`` names the cross-attention layers, which methods that
  read or mask self-attention over many layers skip (and record).
- Tiles: each image is resized (aspect kept) into the best canvas of ``th x tw`` tiles of
  ``tile`` px (at most ``max_image_tiles``), zero-padded bottom and right, and cut into tiles
  in raster order; ``pixel_values`` is ``(batch, images, max tiles, 3, tile, tile)``, unused
  tiles zero. Each tile is ``p x p`` patches plus a class token in front: the vision tower's
  layers see ``(batch * images, tiles * S, dim)`` with ``S = p * p + 1`` padded to a multiple
  of 8; the projector's output is ``(batch, images, tiles, p * p + 1, hidden)``.
- An ``ImageSpan`` is the image's patch grid over the tiles stitched back into one canvas,
  cut to the cells the resized image covers (``ceil(new_h / patch) x ceil(new_w / patch)``);
  its ``crop`` box is that region in the original image's pixels (at most a patch past the
  image's bottom and right edges, where the canvas is padding). ``sequence`` is
  ``"vision"`` and ``start``/``end`` index the item's image cells (image by image, raster
  order inside each), the order of ``image_tokens``: they are not sequence positions. Class
  tokens, pure padding cells and unused tiles are outside every span (they stay as they are
  when tokens are edited).
- What the inside-the-model tools mean here (``IMAGES_IN = "cross_attention"``): token-space
  methods (integrated gradients with ``space="tokens"``, token ablation, causal tracing's
  noise) edit the projected patch tokens, i.e. what cross-attention reads from each cell;
  causal tracing restores the text positions (``positions="image"`` is refused), its
  ``"attn"`` preset restores a cross-attention layer's ``cross_attn``, its ``"head"`` preset
  the self-attention heads only; the logit lens reads the text positions (no image map);
  head importance scores the LM's self-attention heads and the local and global vision heads.
  Entries that need image tokens in the language model's sequence (attention knockout, FastV,
  OPERA, MINER, raw attention, rollout, Chefer's relevance, anisotropy) declare
  ``lm_image_tokens`` or ``image_positions`` and are refused with that reason; activations at
  image positions are read at ``vision.*`` sites (``vision_rows``), never at LM sites.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
from PIL import Image
from transformers import MllamaProcessor
from transformers.models.mllama.image_processing_pil_mllama import (
    get_all_supported_aspect_ratios,
    get_image_size_fit_to_canvas,
    get_optimal_tiled_canvas,
)

from mmscope.core.errors import InputError, NotApplicableError, SiteError
from mmscope.core.images import ImageLike
from mmscope.core.inputs import ImageSpan, Inputs
from mmscope.core.registry import register
from mmscope.models.base import parse_site
from mmscope.models.decoder import DecoderVLM
from mmscope.models.roles import decoder_lm_roles, layer_lists, stack_roles

_V = "model.vision_model"
_LOCAL = _V + ".transformer.layers"
_GLOBAL = _V + ".global_transformer.layers"
_L = "model.language_model.layers"
FALLBACK = "{images}<|begin_of_text|>{prompt}"


#: Mllama's vision layers: ``self_attn.o_proj``, ``mlp.activation_fn``.
VISION_LAYER = {"attn": "self_attn", "heads": "self_attn.o_proj", "act": "mlp.activation_fn"}


@dataclass(frozen=True)
class TileLayout:
    """How the processor lays one image out: ``tiles`` (rows, cols) of tiles on its canvas,
    the resized image's ``size`` (height, width) there, its patch ``grid`` (rows, cols), the
    ``patch`` size in pixels and ``side``, the patches along a tile's side."""

    tiles: tuple[int, int]
    size: tuple[int, int]
    grid: tuple[int, int]
    patch: int
    side: int

    def cells(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per grid cell (raster order) its tile and its position in the tile's sequence
        (1 + the patch's raster index in the tile: the class token comes first)."""
        p = self.side
        r = torch.arange(self.grid[0])[:, None].expand(self.grid)
        c = torch.arange(self.grid[1])[None, :].expand(self.grid)
        tile = (r // p) * self.tiles[1] + c // p
        return tile.flatten(), (1 + (r % p) * p + c % p).flatten()


@register("mllama", kind="adapter", hf_classes=("MllamaForConditionalGeneration",))
class MllamaVLM(DecoderVLM):
    """Adapter for ``MllamaForConditionalGeneration`` (Meta 2024, Llama 3.2 Vision)."""

    family = "mllama"
    IMAGES_IN = "cross_attention"
    CLASS_TOKEN = True  # every tile starts with one; the projector keeps it (outside spans)
    ROLES = {
        "vision.embed": _V + ".patch_embedding",
        **stack_roles("vision.layer", _LOCAL, VISION_LAYER),
        "vision.norm": _V + ".layernorm_post",  # after the local layers, before the global
        **stack_roles("vision.global.layer", _GLOBAL, VISION_LAYER),
        "projector": "model.multi_modal_projector",
        **decoder_lm_roles(),
        "lm.layer.cross_attn": _L + ".{i}.cross_attn",
        "lm.layer.cross_attn.heads": _L + ".{i}.cross_attn.o_proj",
    }
    LAYER_LISTS = layer_lists(ROLES)
    ATTENTION_ROLES = (
        "lm.layer.attn",
        "lm.layer.cross_attn",
        "vision.layer.attn",
        "vision.global.layer.attn",
    )
    #: The last global layer: its patches go to the projector (with local layers' features).
    CAM_SITE = "vision.global.layer[-1]"
    #: Per-token tensors whose appended positions repeat the last one (teacher forcing).
    EXTEND_REPEAT: ClassVar[tuple[str, ...]] = ("cross_attention_mask",)

    @property
    def cross_attention_layers(self) -> tuple[int, ...]:
        """The LM layers that cross-attend to the image."""
        return tuple(int(i) for i in self.model.config.text_config.cross_attention_layers)

    @classmethod
    def load_processor(cls, source: Any, trust_remote_code: bool = False) -> Any:
        """``MllamaProcessor`` with its saved PIL image processor."""
        return MllamaProcessor.from_pretrained(source)

    # ----- roles: self- and cross-attention layers ------------------------------------------
    def non_softmax_layers(self, stack: str) -> dict[int, str]:
        """The cross-attention layers: no attention over the sequence (``.attn``) to read or
        mask; their softmax runs over the image (``lm.layer[i].cross_attn``)."""
        if stack != "lm.layer":
            return {}
        return {
            i: f"cross-attention to the image (lm.layer[{i}].cross_attn), no self-attention"
            for i in self.cross_attention_layers
        }

    def resolve(self, site: str) -> torch.nn.Module:
        """As the base, and ``lm.layer[i].attn`` / ``.cross_attn`` only where layer ``i``
        has that kind of attention (else a ``SiteError`` saying which it has)."""
        role, index = parse_site(site)
        kind = role.removesuffix(".probs").removeprefix("lm.layer.").split(".")[0]
        if role.startswith("lm.layer.") and kind in ("attn", "cross_attn") and index is not None:
            n = self.num_layers("lm.layer")
            if -n <= index < n:
                cross = index % n in self.cross_attention_layers
                if cross != (kind == "cross_attn"):
                    has, other = ("cross", "cross_attn") if cross else ("self", "attn")
                    raise SiteError(
                        f"lm.layer[{index}] of {self.name} is a {has}-attention layer: it has "
                        f"no {kind}, read lm.layer[{index}].{other} (cross-attention layers: "
                        f"{list(self.cross_attention_layers)}; the others self-attend)"
                    )
        return super().resolve(site)

    # ----- preparing ---------------------------------------------------------------------
    def layout(self, image: Image.Image) -> TileLayout:
        """The processor's tiling of ``image`` (its own canvas and resize arithmetic)."""
        ip = self.processor.image_processor
        tile = int(ip.size["height"])
        canvas_h, canvas_w = get_optimal_tiled_canvas(
            image.height, image.width, int(ip.max_image_tiles), tile
        )
        new_h, new_w = get_image_size_fit_to_canvas(
            image.height, image.width, int(canvas_h), int(canvas_w), tile
        )
        patch = int(self.model.config.vision_config.patch_size)
        return TileLayout(
            tiles=(int(canvas_h) // tile, int(canvas_w) // tile),
            size=(int(new_h), int(new_w)),
            grid=(math.ceil(new_h / patch), math.ceil(new_w / patch)),
            patch=patch,
            side=tile // patch,
        )

    def _crop(self, image: Image.Image) -> tuple[float, float, float, float]:
        lay = self.layout(image)
        (rows, cols), (h, w) = lay.grid, lay.size
        return (0.0, 0.0, cols * lay.patch * image.width / w, rows * lay.patch * image.height / h)

    def prepare(
        self, images: ImageLike | Sequence[ImageLike] | None, prompt: str | Sequence[str]
    ) -> Inputs:
        """As decoders do, then each image's span moved to its patch grid (module docstring)."""
        inputs = super().prepare(images, prompt)
        ids = inputs.tensors.get("aspect_ratio_ids")
        ratios = get_all_supported_aspect_ratios(
            int(self.processor.image_processor.max_image_tiles)
        )
        spans = []
        for b, item in enumerate(inputs.images):
            start, item_spans = 0, []
            for m, image in enumerate(item):
                lay = self.layout(image)
                if ids is None or tuple(ratios[int(ids[b, m]) - 1]) != lay.tiles:
                    raise InputError(f"the processor tiled image {m} of item {b} unexpectedly")
                n = lay.grid[0] * lay.grid[1]
                item_spans.append(
                    ImageSpan(start, start + n, lay.grid, "vision", self._crop(image))
                )
                start += n
            spans.append(tuple(item_spans))
        return replace(inputs, image_spans=tuple(spans), extend_repeat=self.EXTEND_REPEAT)

    def _grids(self, tensors: dict[str, Any], n_images: int) -> list[tuple[int, int]]:
        return [(1, 1)] * n_images  # placeholders: ``prepare`` sets each image's grid

    def _image_runs(self, ids: torch.Tensor) -> list[tuple[int, int]]:
        """One ``<|image|>`` token per image (consecutive ones are separate images)."""
        return [(p, p + 1) for p in (ids == self.image_token_id).nonzero().view(-1).tolist()]

    def _template(self, n_images: int, prompt: str) -> str:
        return self._chat_text(n_images, prompt, fallback=FALLBACK)

    def _placeholder(self) -> str:
        return str(getattr(self.processor, "image_token", "<|image|>"))

    def _process(self, images: Sequence[Image.Image], texts: list[str]) -> dict[str, Any]:
        nested = self._images_per_prompt(images, texts)
        if images and not all(nested):
            raise InputError("Mllama needs an image for every prompt of a batch, or none")
        out = self.processor(
            images=nested if images else None, text=texts, return_tensors="pt", padding=True
        )
        return dict(out)

    # ----- where attribution methods reach the image ---------------------------------------
    def _placed(self, inputs: Inputs) -> list[tuple[int, int, TileLayout]]:
        """Per image (span order): its batch item, its index in the item, its layout."""
        return [
            (b, m, self.layout(image))
            for b, item in enumerate(inputs.images)
            for m, image in enumerate(item)
        ]

    def _stitch(self, tiles: torch.Tensor, lay: TileLayout) -> torch.Tensor:
        """``(tiles, p, p, ...)`` -> the canvas ``(th * p, tw * p, ...)`` cut to the grid."""
        th, tw = lay.tiles
        p = lay.side
        rest = tiles.shape[3:]
        canvas = tiles[: th * tw].reshape(th, tw, p, p, *rest).transpose(1, 2)
        canvas = canvas.reshape(th * p, tw * p, *rest)
        return canvas[: lay.grid[0], : lay.grid[1]]

    def pixel_rows(self, inputs: Inputs) -> list[int]:
        """``pixel_values`` rows are batch items: each item's first image owns its row."""
        return [1 if m == 0 else 0 for _, m, _ in self._placed(inputs)]

    def pixel_values_of(self, images: Sequence[Image.Image]) -> torch.Tensor:
        out = self.processor.image_processor(images=[[im] for im in images], return_tensors="pt")
        return out["pixel_values"].to(self.device, self.dtype)

    def pixel_grid(self, values: torch.Tensor, inputs: Inputs) -> list[torch.Tensor]:
        """Sum over channels and each patch, tiles stitched: one ``(rows, cols)`` per image."""
        out = []
        for b, m, lay in self._placed(inputs):
            tiles = values[b, m].sum(1)  # (tiles, tile, tile)
            t, size = tiles.shape[0], tiles.shape[-1]
            p, k = lay.side, size // lay.side
            per_patch = tiles.reshape(t, p, k, p, k).sum((2, 4))
            out.append(self._stitch(per_patch, lay))
        return out

    def mask_pixels(
        self,
        values: torch.Tensor,
        inputs: Inputs,
        keep: torch.Tensor | Sequence[torch.Tensor],
        fill: float | torch.Tensor = 0.0,
    ) -> torch.Tensor:
        """``pixel_values`` with each grid cell blended to ``fill`` by ``1 - keep`` (one keep
        grid per image; cells outside the grid and unused tiles are kept)."""
        up = torch.ones(values.shape[:3] + values.shape[-2:], dtype=values.dtype)
        for i, (b, m, lay) in enumerate(self._placed(inputs)):
            th, tw = lay.tiles
            p = lay.side
            k = values.shape[-1] // p
            canvas = torch.ones(th * p, tw * p, dtype=values.dtype)
            canvas[: lay.grid[0], : lay.grid[1]] = keep[i].to(canvas)
            tiles = canvas.reshape(th, p, tw, p).transpose(1, 2).reshape(th * tw, p, p)
            up[b, m, : th * tw] = tiles.repeat_interleave(k, 1).repeat_interleave(k, 2)
        up = up.to(values.device).unsqueeze(3)
        return values * up + (1 - up) * fill

    def vision_grid(self, value: torch.Tensor, inputs: Inputs) -> list[torch.Tensor]:
        """A local or global vision layer's output ``(batch * images, tiles * S, dim)`` as
        one stitched ``(rows, cols, dim)`` patch grid per image."""
        images, tiles = inputs.pixel_values.shape[1:3]
        per_tile = value.reshape(value.shape[0], tiles, -1, value.shape[-1])
        out = []
        for b, m, lay in self._placed(inputs):
            p = lay.side
            patches = per_tile[b * images + m, :, 1 : 1 + p * p]
            out.append(self._stitch(patches.reshape(tiles, p, p, -1), lay))
        return out

    def vision_rows(self, inputs: Inputs, item: int, length: int) -> list[tuple[int, str, int]]:
        """The first image's tokens in a vision layer's ``tiles * S`` positions: each used
        tile's class token, then every grid cell (tile ``t``, patch ``j``: ``t * S + 1 + j``)."""
        if inputs.pixel_values.shape[1] != 1:
            raise NotApplicableError(
                f"{self.name}'s vision tower runs one sequence per image, not per item"
            )
        tiles = inputs.pixel_values.shape[2]
        per_tile = length // tiles
        lay = self.layout(inputs.images[item][0])
        tile, pos = lay.cells()
        used = lay.tiles[0] * lay.tiles[1]
        rows = [(t * per_tile, "class", -1) for t in range(used)]
        cells = (tile * per_tile + pos).tolist()
        return rows + [(p, "image", j) for j, p in enumerate(cells)]

    def image_tokens(self, value: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        """The projector's output ``(batch, images, tiles, p * p + 1, hidden)`` at every span
        cell, as ``(all cells, hidden)`` in span order."""
        parts = []
        for b, m, lay in self._placed(inputs):
            tile, pos = lay.cells()
            parts.append(value[b, m][tile, pos])
        return torch.cat(parts) if parts else value.new_zeros(0, value.shape[-1])

    def with_image_tokens(
        self, value: torch.Tensor, tokens: torch.Tensor, inputs: Inputs
    ) -> torch.Tensor:
        """``value`` with its span cells replaced by ``tokens`` (class tokens, padding cells
        and unused tiles as they were)."""
        out, start = value.clone(), 0
        for b, m, lay in self._placed(inputs):
            tile, pos = lay.cells()
            n = len(tile)
            bb, mm = torch.full_like(tile, b), torch.full_like(tile, m)
            out = out.index_put((bb, mm, tile, pos), tokens[start : start + n].to(out))
            start += n
        return out
