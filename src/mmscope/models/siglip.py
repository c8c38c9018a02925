"""Sigmoid-loss dual encoders: SigLIP (Zhai et al. 2023, "Sigmoid loss for language image
pre-training").

Like CLIP, two towers score image-text pairs, but the vision tower has no class token: every
position of its sequence is a patch (raster order), and the image embedding is pooled from
all of them by a multihead-attention probe (``vision.head``). The text tower is pooled at its
last position, so texts are padded to the tower's full length (as the reference processor is
called), which also makes every text of a batch the same length.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from mmscope.core.errors import InputError
from mmscope.core.hooks import capture
from mmscope.core.images import ImageLike, load_images
from mmscope.core.inputs import ImageSpan, Inputs
from mmscope.core.registry import register
from mmscope.models.clip import ClipVLM
from mmscope.models.roles import CLIP_LAYER, layer_lists, stack_roles, vision_tower_roles
from mmscope.models.spans import resize_crop_box

_T = "text_model.encoder.layers"


@register("siglip", kind="adapter", hf_classes=("SiglipModel",))
class SiglipVLM(ClipVLM):
    """Adapter for ``SiglipModel``. Image tokens live in the vision tower's own sequence, all
    of them patches; ``similarity`` gives ``logits_per_image`` (apply a sigmoid for the
    probability that a text matches an image)."""

    family = "siglip"
    CLASS_TOKEN = False
    #: The attention-pooling head reads every patch of the last block, so CAMs read it too.
    CAM_SITE = "vision.layer[-1]"
    ATTENTION_ROLES = ("vision.layer.attn", "text.layer.attn")
    ROLES = {
        **vision_tower_roles("vision_model", norm="post_layernorm"),
        # the pooled image embedding (SigLIP has no projection after it)
        "vision.head": "vision_model.head",
        "vision.head.attn": "vision_model.head.attention",
        "vision.head.mlp": "vision_model.head.mlp",
        "text.embed": "text_model.embeddings",
        **stack_roles("text.layer", _T, CLIP_LAYER),
        "text.norm": "text_model.final_layer_norm",
        "text.proj": "text_model.head",
    }
    LAYER_LISTS = layer_lists(ROLES)

    @property
    def max_text_length(self) -> int:
        """Length every text is padded to: the text tower's positions."""
        return int(self.model.config.text_config.max_position_embeddings)

    def prepare(
        self, images: ImageLike | Sequence[ImageLike] | None, prompt: str | Sequence[str]
    ) -> Inputs:
        """Images (one batch item each) and the texts to compare them with, each text padded
        to ``max_text_length``."""
        texts = self._texts(prompt)
        imgs = load_images(images) if images is not None else []
        if not imgs:
            raise InputError("SigLIP needs at least one image")
        length = self.max_text_length
        try:
            tensors = dict(
                self.processor(
                    images=imgs,
                    text=texts,
                    return_tensors="pt",
                    padding="max_length",
                    max_length=length,
                )
            )
        except (ValueError, TypeError) as err:
            raise InputError(f"the processor refused these inputs: {err}") from None
        if tensors["input_ids"].shape[1] != length:
            raise InputError(f"a text is longer than the {length} tokens SigLIP's text tower reads")
        height, width = tensors["pixel_values"].shape[-2:]
        patch = self.model.config.vision_config.patch_size
        grid = (height // patch, width // patch)
        spans = tuple(
            (ImageSpan(0, grid[0] * grid[1], grid, "vision", self._crop(im)),) for im in imgs
        )
        prompt_spans, prompt_tokens = [], []
        for row, n in zip(tensors["input_ids"], self._lengths(tensors)):
            # no start token; the end-of-text token (the last real one) is not a prompt word
            prompt_spans.append((0, n - 1))
            prompt_tokens.append(tuple(self.tokenizer.convert_ids_to_tokens(row[: n - 1].tolist())))
        return Inputs(
            tensors=tensors,
            images=tuple((im,) for im in imgs),
            image_spans=spans,
            prompts=tuple(texts),
            prompt_spans=tuple(prompt_spans),
            prompt_tokens=tuple(prompt_tokens),
        )

    def _lengths(self, tensors: dict[str, Any]) -> list[int]:
        """Real tokens per text (end-of-text included): from the attention mask, or, where
        the processor gives none, up to the first end-of-text token."""
        if "attention_mask" in tensors:
            return [int(m.sum()) for m in tensors["attention_mask"]]
        eos = self.tokenizer.eos_token_id
        out = []
        for row in tensors["input_ids"].tolist():
            out.append(row.index(eos) + 1 if eos in row else len(row))
        return out

    def _crop(self, image: Image.Image) -> tuple[float, float, float, float]:
        """Box of ``image`` the grid covers: SigLIP resizes to a fixed size (the whole image,
        aspect not kept); a processor set to resize the shortest edge and crop keeps less."""
        ip = self.processor.image_processor
        size = ip.size or {}
        crop = ip.crop_size if getattr(ip, "do_center_crop", False) and ip.crop_size else None
        if "shortest_edge" in size:
            box = (crop["height"], crop["width"]) if crop else None
            return resize_crop_box(image.width, image.height, size["shortest_edge"], box)
        if crop and "height" in size and getattr(ip, "do_resize", True):
            sx, sy = image.width / size["width"], image.height / size["height"]
            left = max(0.0, (size["width"] - crop["width"]) / 2) * sx
            top = max(0.0, (size["height"] - crop["height"]) / 2) * sy
            return (left, top, image.width - left, image.height - top)
        return (0.0, 0.0, float(image.width), float(image.height))

    @torch.no_grad()
    def vision_pooling(self, inputs: Inputs) -> torch.Tensor:
        """``(images, patches)``: the attention probe's weights (mean over its heads) over the
        last layer's patches, from a forward of the vision tower."""
        site = "vision.head.attn.probs"
        with capture(self, site) as cap:
            self.model.vision_model(pixel_values=inputs.pixel_values.to(self.device, self.dtype))
        return cap[site][:, 0].float().cpu()

    def text_pooling(self, inputs: Inputs) -> list[int]:
        """SigLIP's text tower reads its last position (padding after a short text)."""
        return [int(inputs.input_ids.shape[1]) - 1] * inputs.batch_size

    def image_tokens(self, value: torch.Tensor, inputs: Inputs) -> torch.Tensor:
        """Patch embeddings (every position is a patch) as ``(all patches, dim)``."""
        return value.reshape(-1, value.shape[-1])

    def with_image_tokens(
        self, value: torch.Tensor, tokens: torch.Tensor, inputs: Inputs
    ) -> torch.Tensor:
        return tokens.reshape(value.shape)
