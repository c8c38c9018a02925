"""Qwen2.5-VL: Qwen2-VL with a windowed-attention vision tower (Bai et al. 2025, Qwen2.5-VL
Technical Report).

What differs from Qwen2-VL (``models/qwen2_vl.py``), and what the rest of mmscope sees:

- The vision blocks use RMSNorm and a SwiGLU MLP (``gate_proj``/``up_proj``/``down_proj``
  with ``act_fn``, so ``vision.layer.mlp.act`` is ``mlp.act_fn``). Most blocks attend within
  windows of ``window_size`` pixels (``window_size // patch // merge`` merged cells a side);
  the blocks of ``fullatt_block_indexes`` attend over the whole image.
- **Window order.** Right after ``patch_embed`` the tower reorders each image's patches
  window by window (whole 2x2 merge blocks move; inside a block the order stays), runs every
  block and the merger in that order, and restores the processor's order only *after* the
  merger (``merged[argsort(window_index)]``). So the output of every ``vision.layer*`` site
  and of ``projector`` is in window order, while ``pixel_values`` and ``vision.embed`` are in
  the processor's order. The adapter undoes the permutation with the model's own window index
  (``get_window_index`` of the tower where it has one, else ``transformers.vision_utils.
  get_vision_window_index`` with the tower's settings): ``vision_grid`` maps a vision block's
  output back onto the patch grid (it assumes window order: do not pass it ``vision.embed``),
  and ``image_tokens``/``with_image_tokens`` turn the merger's rows into span order and back.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen2_5_VLProcessor

from mmscope.core.errors import InputError
from mmscope.core.inputs import Inputs
from mmscope.core.registry import register
from mmscope.models.qwen2_vl import _L, _V, ImageOnlyProcessor, Qwen2VLVLM


class ImageOnlyQwen2_5_VLProcessor(ImageOnlyProcessor, Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without its video processor (see ``ImageOnlyProcessor``)."""


@register("qwen2_5_vl", kind="adapter", hf_classes=("Qwen2_5_VLForConditionalGeneration",))
class Qwen2_5_VLVLM(Qwen2VLVLM):
    """Adapter for ``Qwen2_5_VLForConditionalGeneration`` (Bai et al. 2025, Qwen2.5-VL)."""

    family = "qwen2_5_vl"
    ROLES = {**Qwen2VLVLM.ROLES, "vision.layer.mlp.act": _V + ".{i}.mlp.act_fn"}
    LAYER_LISTS = {"vision.layer": _V, "lm.layer": _L}

    @classmethod
    def load_processor(cls, source: Any, trust_remote_code: bool = False) -> Any:
        """The image-only processor: the stock one needs torchvision for its video half."""
        return ImageOnlyQwen2_5_VLProcessor.from_pretrained(source)

    # ----- the window permutation -------------------------------------------------------
    def window_index(self, grid_thw: torch.Tensor) -> torch.Tensor:
        """For each merged cell of the tower's (window-ordered) sequence, its index in the
        processor's order, over all images of ``grid_thw`` (the model's own window index)."""
        visual = self.model.model.visual
        own = getattr(visual, "get_window_index", None)
        if own is not None:
            index = own(grid_thw)[0]
        else:
            from transformers.vision_utils import get_vision_window_index

            index, _ = get_vision_window_index(
                grid_thw,
                spatial_merge_size=visual.spatial_merge_size,
                window_size=visual.window_size,
                patch_size=visual.patch_size,
            )
        return index.long().cpu()

    def _patch_order(self, inputs: Inputs) -> torch.Tensor:
        """For each patch row of a vision block's output, its row in ``pixel_values``."""
        unit = self.merge_size**2
        cells = self.window_index(inputs.tensors["image_grid_thw"])
        return (cells[:, None] * unit + torch.arange(unit)).reshape(-1)

    def vision_grid(self, value: torch.Tensor, inputs: Inputs) -> list[torch.Tensor]:
        """A vision block's (window-ordered) output as one ``(2 rows, 2 cols, dim)`` grid per
        image: the rows are put back in the processor's order, then laid out as Qwen2-VL's."""
        order = self._patch_order(inputs)
        if order.numel() != value.shape[0]:
            raise InputError(f"{tuple(value.shape)} does not have one row per patch")
        restored = value[torch.argsort(order).to(value.device)]
        return super().vision_grid(restored, inputs)

    def _window_for(self, value: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        window = self.window_index(inputs.tensors["image_grid_thw"])
        if window.numel() != value.shape[0]:
            raise InputError(
                f"{value.shape[0]} image tokens do not match the {window.numel()} merged cells "
                "of these inputs' grids"
            )
        return window.to(value.device)

    def image_tokens(self, value: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        """The merger's output (window order) in span order, as the model itself restores it."""
        return value[torch.argsort(self._window_for(value, inputs))]

    def with_image_tokens(
        self, value: torch.Tensor, tokens: torch.Tensor, inputs: Inputs
    ) -> torch.Tensor:
        """Span-ordered ``tokens`` back in the merger's window order."""
        return tokens[self._window_for(value, inputs)].reshape(value.shape)
