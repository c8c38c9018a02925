"""PaliGemma (Beyer et al. 2024): a SigLIP vision tower, one linear projector and a Gemma
language model, run as a prefix-LM.

What the rest of mmscope sees:

- The sequence is ``<image> * N <bos> prompt \\n``: the image tokens come first, one run of
  ``(image_size / patch_size)**2`` per image (consecutive images make one run, which
  ``_image_runs`` cuts per image), then BOS and the prompt. ``PaliGemmaProcessor`` inserts the
  BOS and the newline itself, so ``_template`` writes them for locating the prompt and
  ``_process`` takes them out again before calling it. Each span's grid is the patch grid.
- Prefix-LM attention: the processor's ``token_type_ids`` are 0 on the prefix (image and
  prompt), which the model makes one bidirectional block; tokens of type 1 (the suffix: what
  is generated) attend causally. So ``lm.layer[i].attn.probs`` shows image and prompt tokens
  reading later prefix tokens. ``Inputs.extend`` appends type 1 (``extend_fill``), so a
  teacher-forced answer is scored exactly as it would be generated.
- Gemma scales its token embeddings by sqrt(hidden) inside the embedding module
  (``GemmaTextScaledWordEmbedding``): ``lm.embed``'s output is the scaled embedding the LM
  reads; the projected image features replace the image positions after it, unscaled.
- PaliGemma 2 has a Gemma 2 language model that soft-caps its logits after ``lm_head``
  (``final_logit_softcap``); the logit lens applies the same cap.
- The vision tower is SigLIP's (``mmscope.models.siglip_tower``): no class token, and its last
  block is read through ``post_layernorm``, whose scale invariance makes sum(grad * act) vanish
  there, so CAMs read the block before.
- Without images the processor refuses to run; text-only prompts are tokenised directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any, ClassVar

import torch
from PIL import Image

from mmscope.core.errors import InputError
from mmscope.core.images import ImageLike
from mmscope.core.inputs import Inputs
from mmscope.core.registry import register
from mmscope.models.decoder import DecoderVLM
from mmscope.models.roles import decoder_lm_roles, layer_lists
from mmscope.models.siglip_tower import patch_grids, siglip_vision_roles
from mmscope.models.spans import image_runs

_VISION_ROLES, _VISION_LISTS = siglip_vision_roles("model.vision_tower")


@register("paligemma", kind="adapter", hf_classes=("PaliGemmaForConditionalGeneration",))
class PaliGemmaVLM(DecoderVLM):
    """Adapter for ``PaliGemmaForConditionalGeneration`` (Beyer et al. 2024, PaliGemma)."""

    family = "paligemma"
    ROLES = {
        **_VISION_ROLES,
        "projector": "model.multi_modal_projector",
        **decoder_lm_roles(),
    }
    LAYER_LISTS = layer_lists(ROLES)
    CAM_SITE = "vision.layer[-2]"
    #: ``token_type_ids`` of appended tokens: 1, the causal suffix after the prefix.
    EXTEND_FILL: ClassVar[dict[str, int]] = {"token_type_ids": 1}

    @property
    def patches_per_side(self) -> int:
        """Patches along each side of the (square) image the vision tower reads."""
        vision = self.model.config.vision_config
        return int(vision.image_size // vision.patch_size)

    @property
    def tokens_per_image(self) -> int:
        """Image tokens each image puts in the sequence."""
        return self.patches_per_side**2

    @property
    def final_logit_softcap(self) -> float | None:
        """Gemma 2's cap on the logits (PaliGemma 2; the model applies it after ``lm_head``)."""
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        return float(cap) if cap else None

    def prepare(
        self, images: ImageLike | Sequence[ImageLike] | None, prompt: str | Sequence[str]
    ) -> Inputs:
        return replace(super().prepare(images, prompt), extend_fill=dict(self.EXTEND_FILL))

    def _image_runs(self, ids: torch.Tensor) -> list[tuple[int, int]]:
        n = self.tokens_per_image
        runs: list[tuple[int, int]] = []
        for start, end in image_runs(ids, self.image_token_id):
            if (end - start) % n:
                raise InputError(f"a run of {end - start} image tokens is not {n} per image")
            runs.extend((s, s + n) for s in range(start, end, n))
        return runs

    def _grids(self, tensors: dict[str, Any], n_images: int) -> list[tuple[int, int]]:
        height, width = tensors["pixel_values"].shape[-2:]
        patch = self.model.config.vision_config.patch_size
        return [(height // patch, width // patch)] * n_images

    def vision_grid(self, value: torch.Tensor, inputs: Inputs) -> list[torch.Tensor]:
        """Every position is a patch (no class token): ``(images, side * side, dim)``."""
        return patch_grids(value, self.patches_per_side)

    def _crop(self, image: Image.Image) -> tuple[float, float, float, float]:
        # Both sides are resized to the tower's size (aspect not kept), nothing is cropped.
        return (0.0, 0.0, float(image.width), float(image.height))

    def _placeholder(self) -> str:
        return str(getattr(self.processor, "image_token", "<image>"))

    def _template(self, n_images: int, prompt: str) -> str:
        """The text as the processor makes it, before expanding each image token."""
        return f"{self._placeholder() * n_images}{self.tokenizer.bos_token}{prompt}\n"

    def _unwrap(self, text: str) -> tuple[int, str]:
        """(images, the text as ``PaliGemmaProcessor`` takes it) for a ``_template`` text."""
        image, bos = self._placeholder(), self.tokenizer.bos_token
        n = 0
        while text.startswith(image * (n + 1)):
            n += 1
        rest = text[len(image) * n :].removeprefix(bos).removesuffix("\n")
        return n, image * n + rest

    def _process(self, images: Sequence[Image.Image], texts: list[str]) -> dict[str, Any]:
        counts, plain = zip(*(self._unwrap(t) for t in texts))
        if not images:  # the processor needs images; the prefix is then the prompt alone
            out = self.tokenizer(
                list(texts), return_tensors="pt", padding=True, return_token_type_ids=True
            )
            return dict(out)
        if 0 in counts:
            raise InputError("PaliGemma needs an image for every prompt of a batch, or none")
        out = dict(
            self.processor(images=list(images), text=list(plain), return_tensors="pt", padding=True)
        )
        out.pop("labels", None)  # the processor's training labels (all -100 without a suffix)
        return out
