"""Qwen2-VL: a ViT with 2-D rotary positions over dynamic-resolution patches, a patch merger
(2x2 neighbouring patches -> one token) as projector, and a Qwen2 language model with M-RoPE.

Differences from LLaVA that the rest of mmscope sees:

- ``pixel_values`` is not ``(B, C, H, W)`` but the flattened patches of all images of the
  batch, ``(sum_i t_i * h_i * w_i, C * temporal_patch * patch * patch)``, with
  ``image_grid_thw`` ``(n_images, 3)`` giving each image's patch grid. Grids differ per image
  and are rarely square; each ``ImageSpan.grid`` is the merged grid ``(h / merge, w / merge)``.
- The vision tower runs all images of the batch as one sequence (separated by
  ``cu_seqlens``), so vision activations are ``(n_patches_total, embed_dim)`` and the
  projector's output is ``(n_image_tokens_total, hidden)`` without a batch axis. Its rows are in
  the order of the image tokens in ``input_ids`` (item by item, left to right); the merger
  visits each image's patches in 2x2 blocks, so its rows are in row-major merged-grid order.
- The processor returns ``mm_token_type_ids`` (0 text, 1 image, 2 video) and the model needs
  it with images: it computes the M-RoPE position ids from it. ``prepare`` passes every
  tensor the processor returns through.
- Attention probabilities: the LM's ``self_attn`` returns ``(output, probs)`` under eager
  attention, ``probs`` ``(B, heads, T, T)``. The vision blocks' ``attn`` (``VisionAttention``)
  runs eager attention per image but returns only the output tensor and drops the
  probabilities, so ``vision.layer.attn`` is not an attention role here: reading vision
  attention needs recomputing softmax(q k^T) from a hook on ``vision.layer[i].attn`` input.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from transformers import ProcessorMixin, Qwen2VLProcessor

from mmscope.core.errors import InputError
from mmscope.core.inputs import Inputs
from mmscope.core.registry import register
from mmscope.models.decoder import DecoderVLM
from mmscope.models.roles import decoder_lm_roles, layer_lists, stack_roles

_V = "model.visual.blocks"
_L = "model.language_model.layers"
#: A Qwen2-VL vision block: ``attn.proj``, ``mlp.act``.
QWEN_VISION_LAYER = {"attn": "attn", "heads": "attn.proj", "act": "mlp.act"}


class ImageOnlyProcessor(ProcessorMixin):
    """Mixin that drops the video processor of a Qwen-style processor, for machines without
    torchvision: ``class ImageOnlyX(ImageOnlyProcessor, XProcessor)``.

    Transformers' Qwen-VL video processors need torchvision, and without torchvision the
    processor's type check of a ``video_processor`` argument (``None`` included) raises, as does
    ``AutoProcessor.from_pretrained`` on such a folder. A processor's parts are the parameters
    of its ``__init__``, so leaving ``video_processor`` out of it gives an image and text
    processor that behaves exactly like ``XProcessor`` on images (its ``from_pretrained`` loads
    the saved image processor, ``Qwen2VLImageProcessorPil``, and the tokenizer). It saves itself
    as a plain ``XProcessor``.
    """

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: Any = None,
        **kw: Any,
    ) -> None:
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kw)

    def to_dict(self) -> dict[str, Any]:
        stock = next(
            c
            for c in type(self).__mro__
            if issubclass(c, ProcessorMixin) and not issubclass(c, ImageOnlyProcessor)
        )
        return {**super().to_dict(), "processor_class": stock.__name__}


class ImageOnlyQwen2VLProcessor(ImageOnlyProcessor, Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without its video processor (see ``ImageOnlyProcessor``)."""


@register("qwen2_vl", kind="adapter", hf_classes=("Qwen2VLForConditionalGeneration",))
class Qwen2VLVLM(DecoderVLM):
    """Adapter for ``Qwen2VLForConditionalGeneration`` (Wang et al. 2024, Qwen2-VL)."""

    family = "qwen2_vl"
    ROLES = {
        "vision.embed": "model.visual.patch_embed",
        **stack_roles("vision.layer", _V, QWEN_VISION_LAYER),
        "projector": "model.visual.merger",
        **decoder_lm_roles(),
    }
    LAYER_LISTS = layer_lists(ROLES)
    #: Only the LM returns probabilities; the vision attention returns a bare tensor.
    ATTENTION_ROLES = ("lm.layer.attn",)
    #: The merger layer-normalises the last block's patches, which makes sum(grad * act) vanish
    #: there: CAMs read the block before.
    CAM_SITE = "vision.layer[-2]"

    @property
    def merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    @classmethod
    def load_processor(cls, source: Any, trust_remote_code: bool = False) -> Any:
        """The image-only processor: the stock one needs torchvision for its video half."""
        return ImageOnlyQwen2VLProcessor.from_pretrained(source)

    def _grids(self, tensors: dict[str, Any], n_images: int) -> list[tuple[int, int]]:
        thw = tensors["image_grid_thw"].tolist()
        if len(thw) != n_images:
            raise InputError(f"the processor made {len(thw)} image grids for {n_images} images")
        m = self.merge_size
        return [(int(h) // m, int(w) // m) for _, h, w in thw]

    def _blocks(self, values: torch.Tensor, inputs: Inputs) -> list[torch.Tensor]:
        """Flattened patch rows per image as ``(t, rows, cols, merge * merge, ...)``: the
        processor orders each image's patches by merged cell, then within the 2x2 block."""
        out, start = [], 0
        m = self.merge_size
        for t, h, w in inputs.tensors["image_grid_thw"].tolist():
            n = t * h * w
            out.append(values[start : start + n].reshape(t, h // m, w // m, m * m, -1))
            start += n
        return out

    def pixel_rows(self, inputs: Inputs) -> list[int]:
        return [t * h * w for t, h, w in inputs.tensors["image_grid_thw"].tolist()]

    def pixel_grid(self, values: torch.Tensor, inputs: Inputs) -> list[torch.Tensor]:
        return [block.sum((0, 3, 4)) for block in self._blocks(values, inputs)]

    def mask_pixels(
        self,
        values: torch.Tensor,
        inputs: Inputs,
        keep: torch.Tensor,
        fill: float | torch.Tensor = 0.0,
    ) -> torch.Tensor:
        per_row = [
            keep[i]
            .to(values)[None, :, :, None, None]
            .expand_as(block)
            .reshape(-1, values.shape[-1])
            for i, block in enumerate(self._blocks(values, inputs))
        ]
        up = torch.cat(per_row)
        return values * up + (1 - up) * fill

    def vision_grid(self, value: torch.Tensor, inputs: Inputs) -> list[torch.Tensor]:
        m = self.merge_size
        grids = []
        for block in self._blocks(value, inputs):
            t, rows, cols = block.shape[:3]
            cells = block.reshape(t, rows, cols, m, m, -1).mean(0)
            grids.append(cells.permute(0, 2, 1, 3, 4).reshape(rows * m, cols * m, -1))
        return grids

    def _crop(self, image: Image.Image) -> tuple[float, float, float, float]:
        # Smart-resize scales the whole image to multiples of patch * merge (a slight change
        # of aspect ratio at most) and never crops: the grid covers the full image.
        return (0.0, 0.0, float(image.width), float(image.height))

    def _template(self, n_images: int, prompt: str) -> str:
        return self._chat_text(
            n_images,
            prompt,
            fallback="<|im_start|>user\n{images}{prompt}<|im_end|>\n<|im_start|>assistant\n",
        )

    def _placeholder(self) -> str:
        token = str(getattr(self.processor, "image_token", "<|image_pad|>"))
        return f"<|vision_start|>{token}<|vision_end|>"

    def _process(self, images: Sequence[Image.Image], texts: list[str]) -> dict[str, Any]:
        return dict(
            self.processor(
                images=list(images) or None, text=texts, return_tensors="pt", padding=True
            )
        )
