"""A tiny random-weight InternVL (tiles of 32 px, patch 8, 2x2 tokens per tile after the pixel
shuffle, at most 4 tiles plus a thumbnail; 2-layer InternViT and Qwen2 LM), built offline."""

from __future__ import annotations

import torch
from transformers import (
    GotOcr2ImageProcessorPil,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLVisionConfig,
    Qwen2Config,
)

from mmscope.models.internvl import ImageOnlyInternVLProcessor, InternVLVLM
from mmscope.toys import build
from mmscope.toys.tiny.common import (
    named_tokenizer,
    seeded_model,
    small_lm,
    small_tower,
    turn_template,
)

TILE, PATCH, MAX_TILES = 32, 8, 4
#: Tokens per tile: (32 / 8)^2 = 16 patches, pixel-shuffled 2x2 -> 4.
TOKENS_PER_TILE = (TILE // PATCH // 2) ** 2
#: The names ``InternVLProcessor`` reads off its tokenizer, as InternVL's tokenizer has them.
IMAGE_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
SPECIALS: tuple[str, ...] = (
    "<|endoftext|>",
    "<unk>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    *IMAGE_TOKENS.values(),
)
#: InternVL's chat template, cut down: Qwen-style turns, "<IMG_CONTEXT>\n" for each image.
CHAT_TEMPLATE = turn_template("<|im_start|>", "<|im_end|>", "<IMG_CONTEXT>\n")


def tiny_processor(max_tiles: int = MAX_TILES) -> ImageOnlyInternVLProcessor:
    """The toy words as an InternVL tokenizer (no BOS; ``<img>``, ``</img>``,
    ``<IMG_CONTEXT>`` and ``<video>`` named as InternVL's are) and ``GotOcr2ImageProcessorPil``
    cutting an image into 1 to ``max_tiles`` tiles of 32 px (ImageNet mean and std).

    With the defaults a 32x32 image is one tile (4 tokens); a 64x32 (w x h) image 2x1 tiles
    and a thumbnail (12 tokens); the contract's 48x48 scenes 2x2 tiles and a thumbnail (20).
    """
    tokenizer = named_tokenizer(
        [*build.words(), "user", "assistant"],
        SPECIALS,
        IMAGE_TOKENS,
        add_bos=False,
        pad="<|endoftext|>",
        bos="<s>",
        eos="<|im_end|>",
    )
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": TILE, "width": TILE},
        crop_to_patches=True,
        min_patches=1,
        max_patches=max_tiles,
        image_mean=[0.485, 0.456, 0.406],
        image_std=[0.229, 0.224, 0.225],
    )
    return ImageOnlyInternVLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=TOKENS_PER_TILE,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_internvl(seed: int = 0) -> InternVLVLM:
    """A seeded random ``InternVLForConditionalGeneration`` in eval mode (the global random
    state is left as it was). Vision: InternViT, hidden 32, 2 layers, 2 heads, 32 px tiles of
    8 px patches (4x4 + a class token), pixel shuffle 0.5 -> 2x2 tokens. LM: Qwen2, hidden 32,
    2 layers, 2 heads; embeddings tied to ``lm_head`` as InternVL's are."""
    processor = tiny_processor()
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    vision = small_tower(InternVLVisionConfig, TILE, PATCH)
    text = small_lm(Qwen2Config, len(tok), 256, tok.pad_token_id, None, end)
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tok.context_image_token_id,
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=0.5,
    )

    def draw_embeddings(model: InternVLForConditionalGeneration) -> None:
        # transformers zeroes the class token and position embeddings (checkpoints overwrite
        # them), which would make every patch position alike: draw them like the other weights
        embeddings = model.model.vision_tower.embeddings
        for param in (embeddings.cls_token, embeddings.position_embeddings):
            torch.nn.init.normal_(param.data, std=vision.initializer_range)

    model = seeded_model(
        InternVLForConditionalGeneration,
        config,
        seed,
        draw_embeddings,
        pad_token_id=tok.pad_token_id,
        eos_token_id=end,
        bos_token_id=None,
    )
    return InternVLVLM(model, processor, name="tiny-internvl")
