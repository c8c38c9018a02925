"""LLaVA-OneVision (Li et al. 2024): the any-res layout of LLaVA-NeXT (``mmscope.models.anyres``)
with a SigLIP tower, a Qwen2 language model and its own packing.

What differs from LLaVA-NeXT (whose adapter this one extends):

- The tower is SigLIP's (``mmscope.models.siglip_tower``): no class token ("full" features).
  The projector reads ``hidden_states[vision_feature_layer]``, the blocks' output before
  ``post_layernorm``, so ``vision.norm`` is not a role here.
- ``vision_aspect_ratio`` ``anyres_max_N``: when the unpadded tiles grid holds more than
  ``N`` tiles' worth of patches (by over 10 %), the model shrinks it bilinearly; the tiles
  view's grid is then the shrunk one. ``image_tokens`` applies the same (separable) resampling
  to the projector's output, and ``with_image_tokens`` makes the least change of the
  projector's output that gives the language model exactly the tokens asked for.
- An image of a multi-image prompt is not tiled: the processor pads it to a square (mean
  colour) and the model packs its base view alone, then one newline (``batch_num_images``).
  Its one view's box is that square, which passes the image's edges.
- Video is out of scope for now: a video passed (a 4-D array, a video file, the ``<video>``
  placeholder) is refused with ``NotApplicableError``. The processor is an image-only variant
  of ``LlavaOnevisionProcessor`` (its video processor needs torchvision).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import LlavaOnevisionProcessor

from mmscope.core.errors import NotApplicableError
from mmscope.core.images import ImageLike
from mmscope.core.inputs import Inputs
from mmscope.core.registry import register
from mmscope.models.llava import LlavaVLM
from mmscope.models.llava_next import LlavaNextVLM
from mmscope.models.qwen2_vl import ImageOnlyProcessor
from mmscope.models.siglip_tower import siglip_vision_roles

_VISION_ROLES, _VISION_LISTS = siglip_vision_roles("model.vision_tower")
_VISION_ROLES.pop("vision.norm")  # post_layernorm: not what the projector reads
_LM_ROLES = {k: v for k, v in LlavaVLM.ROLES.items() if not k.startswith("vision.")}
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg"})


class ImageOnlyLlavaOnevisionProcessor(ImageOnlyProcessor, LlavaOnevisionProcessor):
    """``LlavaOnevisionProcessor`` without its video processor (see ``ImageOnlyProcessor``);
    its own settings are spelled out so that they are saved and loaded with it."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        num_image_tokens: int | None = None,
        vision_feature_select_strategy: str | None = None,
        chat_template: Any = None,
        image_token: str = "<image>",
        video_token: str = "<video>",
        vision_aspect_ratio: str = "anyres_max_9",
        **kw: Any,
    ) -> None:
        super().__init__(
            image_processor,
            tokenizer,
            chat_template,
            num_image_tokens=num_image_tokens,
            vision_feature_select_strategy=vision_feature_select_strategy,
            image_token=image_token,
            video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio,
            **kw,
        )


def _is_video(source: Any) -> bool:
    if isinstance(source, (list, tuple)):
        return any(_is_video(s) for s in source)
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return source.ndim == 4
    if isinstance(source, (str, os.PathLike)):
        return Path(source).suffix.lower() in VIDEO_SUFFIXES
    return False


@register("llava_onevision", kind="adapter", hf_classes=("LlavaOnevisionForConditionalGeneration",))
class LlavaOnevisionVLM(LlavaNextVLM):
    """Adapter for ``LlavaOnevisionForConditionalGeneration`` (Li et al. 2024, LLaVA-OneVision)."""

    family = "llava_onevision"
    CLASS_TOKEN = False
    LAYER_LISTS = {**_VISION_LISTS, "lm.layer": LlavaVLM.LAYER_LISTS["lm.layer"]}
    ROLES = {**_VISION_ROLES, **_LM_ROLES}

    @classmethod
    def load_processor(cls, source: Any, trust_remote_code: bool = False) -> Any:
        """The image-only processor: the stock one needs torchvision for its video part."""
        return ImageOnlyLlavaOnevisionProcessor.from_pretrained(source)

    @property
    def max_tiles(self) -> int | None:
        """``N`` of the model's ``vision_aspect_ratio`` ``anyres_max_N`` (read as it does)."""
        ratio = str(self.model.config.vision_aspect_ratio)
        return int(ratio.strip("anyres_max_"))  # noqa: B005  (the model strips these characters)

    def _patched(self, tensors: dict[str, Any], n_images: int) -> list[bool]:
        """Only the images alone in their prompt are tiled (``batch_num_images``)."""
        counts = tensors.get("batch_num_images")
        if counts is None:
            return [True] * n_images
        return [int(n) == 1 for n in counts.tolist() for _ in range(int(n))]

    def prepare(
        self, images: ImageLike | Sequence[ImageLike] | None, prompt: str | Sequence[str]
    ) -> Inputs:
        video = str(getattr(self.processor, "video_token", "<video>"))
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if _is_video(images) or any(isinstance(p, str) and video in p for p in prompts):
            raise NotApplicableError(
                f"{self.name} takes video, but mmscope explains LLaVA-OneVision on images only "
                "for now; pass the frames you want explained as images"
            )
        return super().prepare(images, prompt)

    def _process(self, images: Sequence[Image.Image], texts: list[str]) -> dict[str, Any]:
        """Each prompt's images in a list of their own: the processor tiles an image only when
        it is alone in its prompt, and says so in ``batch_num_images``."""
        nested = self._images_per_prompt(images, texts)
        out = self.processor(
            images=nested if images else None, text=texts, return_tensors="pt", padding=True
        )
        return dict(out)
