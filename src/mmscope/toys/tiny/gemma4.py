"""A tiny random-weight Gemma 4 (patch 4, 2x2 pooling, at most 70 soft tokens per image; 2+2
layers: one sliding-window and one global LM layer, both with a 4-expert MoE block beside the
dense MLP, per-layer embeddings and logit soft-capping), built offline without an audio tower.

With the image processor's settings here a 32x32 (or 48x48) image is resized to 64x64: 16x16
patches, pooled to 8x8 = 64 soft tokens; a 64x40 (w x h) one to 80x48: 20x12 patches, 10x6
= 60 soft tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    Gemma4Config,
    Gemma4ForConditionalGeneration,
    Gemma4TextConfig,
    Gemma4VisionConfig,
)
from transformers.models.gemma4 import Gemma4ImageProcessorPil

from mmscope.models.gemma4 import Gemma4VLM, ImageOnlyGemma4Processor
from mmscope.toys import build
from mmscope.toys.tiny.common import named_tokenizer, seeded_model, turn_template

PATCH, POOL = 4, 2
#: The image processor's smallest budget (it accepts 70, 140, 280, 560 or 1120).
MAX_SOFT_TOKENS = 70
#: Sliding-window layers see this many positions back: fewer than an image's soft tokens.
SLIDING_WINDOW = 24
#: Patch positions along a side the patch embedder has embeddings for: the widest image the
#: processor makes is 70 soft tokens in one row, 70 * POOL = 140 patches.
POSITIONS = MAX_SOFT_TOKENS * POOL + 4
SOFTCAP = 30.0
#: The global layers' head size (512 by default), a keyword the config takes through **kwargs.
GLOBAL_HEAD_DIM: dict[str, Any] = {"global_head_dim": 16}
IMAGE_TOKENS = {
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "image_token": "<|image|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
    "audio_token": "<|audio|>",
}
#: ``<|video|>`` is in the vocabulary (the processor adds it otherwise, growing the tokenizer).
SPECIALS: tuple[str, ...] = (
    "<pad>",
    "<unk>",
    "<bos>",
    "<eos>",
    "<|turn>",
    "<turn|>",
    *IMAGE_TOKENS.values(),
    "<|video|>",
)
#: Gemma 4's chat template, cut down: BOS, turns, ``<|image|>`` for each image.
CHAT_TEMPLATE = turn_template("<|turn>", "<turn|>", "<|image|>", "model", bos=True)


def tiny_processor() -> ImageOnlyGemma4Processor:
    """The toy words as a Gemma 4 tokenizer (adds BOS; names its image and audio tokens as
    Gemma 4's does) and ``Gemma4ImageProcessorPil`` (patch 4, pooling 2, 70 soft tokens)."""
    tokenizer = named_tokenizer(
        [*build.words(), "user", "model"],
        SPECIALS,
        IMAGE_TOKENS,
        add_bos=True,
        pad="<pad>",
        bos="<bos>",
        eos="<eos>",
    )
    image_processor = Gemma4ImageProcessorPil(
        patch_size=PATCH, pooling_kernel_size=POOL, max_soft_tokens=MAX_SOFT_TOKENS
    )
    return ImageOnlyGemma4Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=MAX_SOFT_TOKENS,
    )


def tiny_gemma4(seed: int = 0) -> Gemma4VLM:
    """A seeded random ``Gemma4ForConditionalGeneration`` in eval mode (the global random
    state is left as it was). Vision: hidden 32, 2 layers, 2 heads, patch 4, 2x2 pooling.
    LM: hidden 32, 2 layers (sliding window, then global), 2 query heads of 16 sharing one
    key/value head, a dense MLP and 4 experts (top 2) per layer, per-layer embeddings of 8,
    image tokens bidirectional in sliding layers, logits soft-capped at 30."""
    processor = tiny_processor()
    tok = processor.tokenizer
    vision = Gemma4VisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=16,
        patch_size=PATCH,
        pooling_kernel_size=POOL,
        position_embedding_size=POSITIONS,
    )
    text = Gemma4TextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=512,
        final_logit_softcapping=SOFTCAP,
        use_bidirectional_attention="vision",
        vocab_size_per_layer_input=len(tok),
        hidden_size_per_layer_input=8,
        enable_moe_block=True,
        num_experts=4,
        top_k_experts=2,
        moe_intermediate_size=16,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        **GLOBAL_HEAD_DIM,
    )
    ids = {name: tok.convert_tokens_to_ids(token) for name, token in IMAGE_TOKENS.items()}
    config = Gemma4Config(
        vision_config=vision,
        text_config=text,
        audio_config=None,
        boi_token_id=ids["boi_token"],
        eoi_token_id=ids["eoi_token"],
        image_token_id=ids["image_token"],
        video_token_id=tok.convert_tokens_to_ids("<|video|>"),
        boa_token_id=ids["boa_token"],
        eoa_token_index=ids["eoa_token"],
        audio_token_id=ids["audio_token"],
    )

    def draw_positions(model: Gemma4ForConditionalGeneration) -> None:
        # transformers fills the patch position table with ones (checkpoints overwrite it),
        # which would give every patch the same position embedding: draw it like the rest
        table = model.model.vision_tower.patch_embedder.position_embedding_table
        torch.nn.init.normal_(table.data, std=vision.initializer_range)

    model = seeded_model(
        Gemma4ForConditionalGeneration,
        config,
        seed,
        draw_positions,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<turn|>")],
    )
    return Gemma4VLM(model, processor, name="tiny-gemma4")
