"""A tiny random-weight LLaVA-OneVision (SigLIP tower, 32 px tiles, 4x4 patches a tile, Qwen2
LM, 2+2 layers), built offline.

The grid pinpoints are LLaVA-NeXT's tiny ones (``mmscope.toys.tiny.llava_next``): a 48x48
image is 16 + 4 * (4 + 1) = 36 image tokens, a 64x32 (w x h) one 16 + 4 * (8 + 1) = 52, an image
of a two-image prompt 16 + 1. ``max_tiles=1`` (``anyres_max_1``) makes the model shrink a
two-tile grid (4x8 kept patches: ratio sqrt(2) > 1.1) to 2x5 cells.
"""

from __future__ import annotations

from transformers import (
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    LlavaOnevisionImageProcessorPil,
    Qwen2Config,
    SiglipVisionConfig,
)

from mmscope.models.llava_onevision import ImageOnlyLlavaOnevisionProcessor, LlavaOnevisionVLM
from mmscope.toys import build
from mmscope.toys.tiny.common import seeded_model, small_lm, small_tower
from mmscope.toys.tiny.llava_next import PATCH, PINPOINTS, SIZE
from mmscope.toys.tokenizer import SPECIALS, build_tokenizer


def tiny_processor(max_tiles: int = 9) -> ImageOnlyLlavaOnevisionProcessor:
    """The toy words with ``<video>`` as a special token, the toy chat template and
    ``LlavaOnevisionImageProcessorPil`` (32 px tiles and base view, mean and std 0.5)."""
    tokenizer = build_tokenizer(build.words(), (*SPECIALS, "<video>"), add_bos=True)
    image_processor = LlavaOnevisionImageProcessorPil(
        size={"height": SIZE, "width": SIZE},
        image_grid_pinpoints=PINPOINTS,
        image_mean=list(build.MEAN),
        image_std=list(build.STD),
    )
    return ImageOnlyLlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_image_tokens=(SIZE // PATCH) ** 2,
        vision_feature_select_strategy="full",
        chat_template=build.CHAT_TEMPLATE,
        vision_aspect_ratio=f"anyres_max_{max_tiles}",
    )


def tiny_llava_onevision(seed: int = 0, max_tiles: int = 9) -> LlavaOnevisionVLM:
    """A seeded random ``LlavaOnevisionForConditionalGeneration`` with its image-only processor,
    in eval mode (the global random state is left as it was): SigLIP tower and Qwen2 LM,
    hidden 32, 2 layers, 2 heads; the projector reads the last vision layer."""
    processor = tiny_processor(max_tiles)
    tok = processor.tokenizer
    vision = small_tower(SiglipVisionConfig, SIZE, PATCH, vision_use_head=False)
    text = small_lm(
        Qwen2Config, len(tok), 256, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    )
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=build.image_token_id(tok),
        video_token_index=int(tok.convert_tokens_to_ids("<video>")),
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{max_tiles}",
    )
    model = seeded_model(
        LlavaOnevisionForConditionalGeneration,
        config,
        seed,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return LlavaOnevisionVLM(model, processor, "tiny-llava-onevision")
