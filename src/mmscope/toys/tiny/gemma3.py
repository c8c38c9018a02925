"""A tiny random-weight Gemma 3 (32 px images, 8x8 patches pooled to 4x4 soft tokens, 2+2
layers: one sliding-window and one global LM layer), built offline."""

from __future__ import annotations

import torch
from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    Gemma3TextConfig,
    SiglipVisionConfig,
)

from mmscope.models.gemma3 import Gemma3VLM
from mmscope.toys import build
from mmscope.toys.tiny.common import named_tokenizer, seeded_model, small_tower, turn_template

SIZE, PATCH, TOKENS_PER_SIDE = 32, 4, 4
#: Sliding-window layers see this many positions back: fewer than a prompt's sequence.
SLIDING_WINDOW = 24
IMAGE_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}
SPECIALS: tuple[str, ...] = (
    "<pad>",
    "<unk>",
    "<bos>",
    "<eos>",
    "<start_of_turn>",
    "<end_of_turn>",
    *IMAGE_TOKENS.values(),
)
#: Gemma 3's chat template, cut down: BOS, turns, ``<start_of_image>`` for each image.
CHAT_TEMPLATE = turn_template(
    "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "model", bos=True
)


def tiny_processor(size: int = SIZE, tokens: int = TOKENS_PER_SIDE**2) -> Gemma3Processor:
    """The toy words as a Gemma 3 tokenizer (adds BOS; names its image tokens ``boi_token``,
    ``eoi_token``, ``image_token``, as Gemma 3's does) and ``Gemma3ImageProcessorPil``
    resizing to ``size`` square, with ``tokens`` soft tokens per image."""
    tokenizer = named_tokenizer(
        [*build.words(), "user", "model"],
        SPECIALS,
        IMAGE_TOKENS,
        add_bos=True,
        pad="<pad>",
        bos="<bos>",
        eos="<eos>",
    )
    image_processor = Gemma3ImageProcessorPil(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
        image_seq_length=tokens,
    )


def tiny_gemma3(seed: int = 0) -> Gemma3VLM:
    """A seeded random ``Gemma3ForConditionalGeneration`` in eval mode (the global random
    state is left as it was). Vision: SigLIP, hidden 32, 2 layers, 2 heads, patch 4 (8x8
    patches, pooled 2x2 -> 4x4 soft tokens). LM: hidden 32, 2 layers (sliding window, then
    global), 2 query heads of 16 sharing one key/value head."""
    processor = tiny_processor()
    tok = processor.tokenizer
    vision = small_tower(SiglipVisionConfig, SIZE, PATCH, vision_use_head=False)
    text = Gemma3TextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=TOKENS_PER_SIDE**2,
        boi_token_index=tok.boi_token_id,
        eoi_token_index=tok.eoi_token_id,
        image_token_index=tok.image_token_id,
    )

    def draw_projection(model: Gemma3ForConditionalGeneration) -> None:
        # transformers initialises the projection to zeros (checkpoints overwrite it), which
        # would hide the image from the LM: draw it like the other weights
        projection = model.model.multi_modal_projector.mm_input_projection_weight
        torch.nn.init.normal_(projection.data, std=text.initializer_range)

    model = seeded_model(
        Gemma3ForConditionalGeneration,
        config,
        seed,
        draw_projection,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")],
    )
    return Gemma3VLM(model, processor, name="tiny-gemma3")
