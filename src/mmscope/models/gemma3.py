"""Gemma 3 (Gemma Team 2025): a SigLIP vision tower, a projector that average-pools the patch
grid to ``mm_tokens_per_image`` soft tokens, and a Gemma 3 language model with interleaved
sliding-window and global attention layers.

Differences from PaliGemma (whose adapter this one extends; the module paths are the same):

- Each image is the text ``\\n\\n<start_of_image><image_soft_token> * N<end_of_image>\\n\\n``
  (``Gemma3Processor.full_image_sequence``) wherever the chat template puts
  ``<start_of_image>``; the image tokens are the soft tokens. ``_template`` writes one soft
  token per image for locating the prompt, ``_process`` gives the processor back its
  placeholder. Pan-and-scan crops are switched off: one view per image.
- Each ``ImageSpan.grid`` is the *pooled* grid, ``sqrt(N)`` soft tokens a side; each soft
  token is the mean of a ``k x k`` block of patches (``k = patches a side / tokens a side``).
  The image is resized to a square without cropping, so the base ``pixel_grid`` and
  ``mask_pixels``, which cut the pixels into the span's grid, give each soft token exactly its
  block of pixels. ``vision_grid`` gives the tower's full patch grid, ``k`` times finer.
- Attention: ``token_type_ids`` 1 marks the soft tokens; the tokens of one image attend to
  each other bidirectionally, everything else causally (and, in sliding-window layers, only
  ``sliding_window`` tokens back). Appended tokens are text: type 0, ``extend``'s default.
- The logits are not soft-capped: ``Gemma3ForConditionalGeneration`` applies no
  ``final_logit_softcapping`` after ``lm_head`` (Gemma 3 replaced it by QK-norm; the released
  configs set it to None), so neither does the logit lens.
- The chat template starts with ``<bos>`` and Gemma's tokenizer adds one too; the template's
  is dropped so that the sequence has one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from PIL import Image

from mmscope.core.inputs import Inputs
from mmscope.core.registry import register
from mmscope.models.paligemma import PaliGemmaVLM
from mmscope.models.siglip_tower import patch_grids

FALLBACK = "<start_of_turn>user\n{images}{prompt}<end_of_turn>\n<start_of_turn>model\n"


@register("gemma3", kind="adapter", hf_classes=("Gemma3ForConditionalGeneration",))
class Gemma3VLM(PaliGemmaVLM):
    """Adapter for ``Gemma3ForConditionalGeneration`` (Gemma Team 2025, Gemma 3)."""

    family = "gemma3"
    #: Appended tokens are text (``token_type_ids`` 0), the default fill.
    EXTEND_FILL: ClassVar[dict[str, int]] = {}

    @property
    def tokens_per_image(self) -> int:
        return int(self.model.config.mm_tokens_per_image)

    @property
    def tokens_per_side(self) -> int:
        """Soft tokens along each side of the pooled grid."""
        return int(round(self.tokens_per_image**0.5))

    @property
    def final_logit_softcap(self) -> float | None:
        return None  # Gemma3ForConditionalGeneration caps nothing after lm_head

    def _grids(self, tensors: dict[str, Any], n_images: int) -> list[tuple[int, int]]:
        return [(self.tokens_per_side, self.tokens_per_side)] * n_images

    def vision_grid(self, value: torch.Tensor, inputs: Inputs) -> list[torch.Tensor]:
        """The tower's patch grid (finer than the pooled span grid), one per image."""
        return patch_grids(value, self.patches_per_side)

    def _crop(self, image: Image.Image) -> tuple[float, float, float, float]:
        return (0.0, 0.0, float(image.width), float(image.height))

    def _placeholder(self) -> str:
        return str(self.processor.boi_token)

    def _one_image(self) -> str:
        """An image's text with one soft token: tokenised, one image token per image."""
        soft = self.processor.tokenizer.image_token
        full = str(self.processor.full_image_sequence)
        return full.replace(soft * int(self.processor.image_seq_length), soft)

    def _template(self, n_images: int, prompt: str) -> str:
        text = self._chat_text(n_images, prompt, fallback=FALLBACK)
        bos = self.tokenizer.bos_token
        if bos and self.tokenizer.bos_token_id in self.tokenizer("")["input_ids"]:
            text = text.removeprefix(bos)  # the tokenizer adds it
        return text.replace(self._placeholder(), self._one_image())

    def _process(self, images: Sequence[Image.Image], texts: list[str]) -> dict[str, Any]:
        plain = [t.replace(self._one_image(), self._placeholder()) for t in texts]
        nested = self._images_per_prompt(images, plain)
        out = self.processor(
            images=nested if images else None,
            text=plain,
            return_tensors="pt",
            padding=True,
            do_pan_and_scan=False,
        )
        return dict(out)
