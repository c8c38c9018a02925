"""LLaVA-1.5-style models: CLIP vision tower, MLP projector, LLaMA-family language model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from mmscope.core.registry import register
from mmscope.models.decoder import DecoderVLM
from mmscope.models.roles import decoder_lm_roles, layer_lists, vision_tower_roles
from mmscope.models.spans import resize_crop_box


@register("llava", kind="adapter", hf_classes=("LlavaForConditionalGeneration",))
class LlavaVLM(DecoderVLM):
    """Adapter for ``LlavaForConditionalGeneration`` (Liu et al. 2023, LLaVA-1.5)."""

    family = "llava"
    CLASS_TOKEN = True  # CLIP's tower (the projector drops it with the "default" strategy)
    ROLES = {
        **vision_tower_roles("model.vision_tower"),
        "projector": "model.multi_modal_projector",
        **decoder_lm_roles(),
    }
    LAYER_LISTS = layer_lists(ROLES)

    @property
    def CAM_SITE(self) -> str:  # type: ignore[override]  # noqa: N802  (the base's class constant)
        """The vision layer the projector reads (LLaVA-1.5: the penultimate)."""
        layer = self.model.config.vision_feature_layer
        layer = layer[-1] if isinstance(layer, (list, tuple)) else layer
        if layer >= 0:  # hidden_states[0] is the embeddings: hidden_states[k] is layer k - 1
            return f"vision.layer[{layer - 1}]" if layer > 0 else "vision.embed"
        return f"vision.layer[{layer}]"

    def _grids(self, tensors: dict[str, Any], n_images: int) -> list[tuple[int, int]]:
        height, width = tensors["pixel_values"].shape[-2:]
        patch = self.model.config.vision_config.patch_size
        return [(height // patch, width // patch)] * n_images

    def _crop(self, image: Image.Image) -> tuple[float, float, float, float]:
        ip = self.processor.image_processor
        size = ip.size or {}
        edge = size.get("shortest_edge") if getattr(ip, "do_resize", True) else None
        crop_size = ip.crop_size or {}
        crop = (
            (crop_size["height"], crop_size["width"])
            if getattr(ip, "do_center_crop", False) and crop_size
            else (edge, edge)
            if edge
            else None
        )
        if edge is None and "height" in size:  # resized straight to a fixed size: whole image
            return (0.0, 0.0, float(image.width), float(image.height))
        return resize_crop_box(image.width, image.height, edge, crop)

    def _template(self, n_images: int, prompt: str) -> str:
        return self._chat_text(n_images, prompt, fallback="USER: {images}\n{prompt} ASSISTANT:")

    def _placeholder(self) -> str:
        return str(getattr(self.processor, "image_token", "<image>"))

    def _process(self, images: Sequence[Image.Image], texts: list[str]) -> dict[str, Any]:
        return dict(
            self.processor(
                images=list(images) or None, text=texts, return_tensors="pt", padding=True
            )
        )
