"""Contrastive dual encoders: CLIP (Radford et al. 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmscope.core.errors import InputError
from mmscope.core.images import ImageLike, load_images
from mmscope.core.inputs import ImageSpan, Inputs
from mmscope.core.registry import register
from mmscope.models.base import VLM
from mmscope.models.roles import CLIP_LAYER, layer_lists, stack_roles, vision_tower_roles
from mmscope.models.spans import resize_crop_box

_T = "text_model.encoder.layers"


@register("clip", kind="adapter", hf_classes=("CLIPModel",))
class ClipVLM(VLM):
    """Adapter for ``CLIPModel``. Image tokens live in the vision tower's own sequence:
    position 0 is the class token, the patches follow in raster order."""

    family = "clip"
    contrastive = True
    CLASS_TOKEN = True
    IMAGES_IN = "none"
    IMAGE_TOKENS_SITE = "vision.embed"
    TEXT_EMBED_SITE = "text.embed"
    #: The last block's patch outputs never reach the pooled class token (pytorch-grad-cam
    #: also takes the penultimate block of a ViT).
    CAM_SITE = "vision.layer[-2]"
    ATTENTION_ROLES = ("vision.layer.attn", "text.layer.attn")
    ROLES = {
        **vision_tower_roles("vision_model", norm="post_layernorm"),
        # what a decomposition per token reads (textspan_decompose): the LayerNorm before the
        # attention and the values it projects
        "vision.layer.attn.norm": "vision_model.encoder.layers.{i}.layer_norm1",
        "vision.layer.attn.values": "vision_model.encoder.layers.{i}.self_attn.v_proj",
        "vision.proj": "visual_projection",
        "text.embed": "text_model.embeddings",
        **stack_roles("text.layer", _T, CLIP_LAYER),
        "text.norm": "text_model.final_layer_norm",
        "text.proj": "text_projection",
    }
    LAYER_LISTS = layer_lists(ROLES)

    def _texts(self, prompt: str | Sequence[str]) -> list[str]:
        """The texts to compare images with, checked: none empty, none past the text tower's
        context."""
        from mmscope.core.context import check_prompts

        texts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not texts or any(not isinstance(t, str) or not t.strip() for t in texts):
            raise InputError("the prompt is empty; give the text(s) to compare the images with")
        check_prompts(self, texts)
        return texts

    def prepare(
        self, images: ImageLike | Sequence[ImageLike] | None, prompt: str | Sequence[str]
    ) -> Inputs:
        """Images (one batch item each) and the texts to compare them with."""
        texts = self._texts(prompt)
        imgs = load_images(images) if images is not None else []
        if not imgs:
            raise InputError("CLIP needs at least one image")
        try:
            tensors = dict(
                self.processor(images=imgs, text=texts, return_tensors="pt", padding=True)
            )
        except (ValueError, TypeError) as err:
            raise InputError(f"the processor refused these inputs: {err}") from None
        height, width = tensors["pixel_values"].shape[-2:]
        patch = self.model.config.vision_config.patch_size
        grid = (height // patch, width // patch)
        ip = self.processor.image_processor
        edge = (ip.size or {}).get("shortest_edge")
        crop = ip.crop_size or {}
        spans = tuple(
            (
                ImageSpan(
                    1,
                    1 + grid[0] * grid[1],
                    grid,
                    "vision",
                    resize_crop_box(
                        im.width, im.height, edge, (crop["height"], crop["width"]) if crop else None
                    ),
                ),
            )
            for im in imgs
        )
        prompt_spans, prompt_tokens = [], []
        for row, mask in zip(tensors["input_ids"], tensors["attention_mask"]):
            n = int(mask.sum())
            prompt_spans.append((1, n - 1))
            prompt_tokens.append(
                tuple(self.tokenizer.convert_ids_to_tokens(row[1 : n - 1].tolist()))
            )
        return Inputs(
            tensors=tensors,
            images=tuple((im,) for im in imgs),
            image_spans=spans,
            prompts=tuple(texts),
            prompt_spans=tuple(prompt_spans),
            prompt_tokens=tuple(prompt_tokens),
        )

    def __init__(self, model: Any, processor: Any, name: str = "") -> None:
        super().__init__(model, processor, name)
        # CLIP's text tower uses absolute positions and pools at the end-of-text token: texts
        # must be padded on the right (the spans below assume it too).
        self.tokenizer.padding_side = "right"

    def image_tokens(self, value: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        """Patch embeddings (class token dropped) as ``(all patches, dim)``."""
        return value[:, 1:].reshape(-1, value.shape[-1])

    def with_image_tokens(
        self, value: torch.Tensor, tokens: torch.Tensor, inputs: Inputs
    ) -> torch.Tensor:
        patches = tokens.reshape(value.shape[0], -1, value.shape[-1])
        return torch.cat([value[:, :1], patches], dim=1)

    @torch.no_grad()
    def similarity(self, inputs: Inputs) -> torch.Tensor:
        """Scaled cosine similarities, images x texts (``logits_per_image``)."""
        return self.forward(inputs).logits_per_image
