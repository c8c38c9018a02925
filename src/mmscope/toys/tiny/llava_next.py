"""A tiny random-weight LLaVA-NeXT (32 px tiles, 4x4 patches a tile, 2+2 layers), built offline.

The grid pinpoints (height, width) 32x32, 32x64 and 64x32 give a square image one tile, a wide
one a row of two and a tall one a column of two: with the base view, a 48x48 image is
16 + 4 * (4 + 1) = 36 image tokens, a 64x32 (w x h) one 16 + 4 * (8 + 1) = 52.
"""

from __future__ import annotations

from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)

from mmscope.models.llava_next import LlavaNextVLM
from mmscope.toys import build
from mmscope.toys.tiny.common import seeded_model, small_lm, small_tower

SIZE, PATCH = 32, 8
PINPOINTS = [[32, 32], [32, 64], [64, 32]]


def tiny_processor(
    pinpoints: list[list[int]] | None = None, size: int = SIZE, patch: int = PATCH
) -> LlavaNextProcessor:
    """The toy tokenizer and chat template with ``LlavaNextImageProcessorPil`` (32 px tiles,
    mean and std 0.5) and the CLIP tower's class token counted and dropped ("default")."""
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=pinpoints or PINPOINTS,
        image_mean=list(build.MEAN),
        image_std=list(build.STD),
    )
    return LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=build.toy_tokenizer(),
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=build.CHAT_TEMPLATE,
        image_token="<image>",
    )


def tiny_llava_next(
    seed: int = 0,
    size: int = SIZE,
    patch: int = PATCH,
    pinpoints: list[list[int]] | None = None,
    context: int = 256,
) -> LlavaNextVLM:
    """A seeded random ``LlavaNextForConditionalGeneration`` with its processor, in eval mode
    (the global random state is left as it was). CLIP tower and Llama LM: hidden 32, 2
    layers, 2 heads; the projector reads the last vision layer. ``size``, ``patch``,
    ``pinpoints`` and ``context`` give other geometries (LLaVA-1.6's: 336, 14, its
    pinpoints)."""
    processor = tiny_processor(pinpoints, size, patch)
    tok = processor.tokenizer
    vision = small_tower(CLIPVisionConfig, size, patch, projection_dim=16)
    text = small_lm(
        LlamaConfig, len(tok), context, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    )
    config = LlavaNextConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=build.image_token_id(tok),
        image_grid_pinpoints=pinpoints or PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    model = seeded_model(
        LlavaNextForConditionalGeneration,
        config,
        seed,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlavaNextVLM(model, processor, "tiny-llava-next")
