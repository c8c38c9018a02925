"""A tiny random-weight SigLIP (32 px images, 4x4 patch grid, 2+2 layers, texts of 24)."""

from __future__ import annotations

import torch
from transformers import (
    SiglipConfig,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
    SiglipTextConfig,
    SiglipVisionConfig,
)

from mmscope.models.siglip import SiglipVLM
from mmscope.toys import build
from mmscope.toys.tiny.common import seeded_model, small_tower
from mmscope.toys.tokenizer import SPECIALS, build_tokenizer

SIZE, PATCH, TEXT_LENGTH = 32, 8, 24
EMBED_SCALE = 0.2


def tiny_processor(size: int = SIZE, length: int = TEXT_LENGTH) -> SiglipProcessor:
    """The toy words with SigLIP's conventions: no start token, ``</s>`` appended, padded on
    the right to ``length``; images resized to ``size`` square, normalised with mean and std
    0.5 (as ``google/siglip-*``)."""
    tokenizer = build_tokenizer(
        build.words(), SPECIALS, add_bos=False, add_eos=True, padding_side="right"
    )
    tokenizer.model_max_length = length
    image_processor = SiglipImageProcessorPil(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return SiglipProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_siglip(seed: int = 0) -> SiglipVLM:
    """A seeded random ``SiglipModel`` (hidden 32, 2 heads, 2 layers per tower, attention
    pooling head) with its processor, in eval mode; the global random state is left as it was."""
    processor = tiny_processor()
    tok = processor.tokenizer
    text = SiglipTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TEXT_LENGTH,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    vision = small_tower(SiglipVisionConfig, SIZE, PATCH)
    config = SiglipConfig(text_config=text.to_dict(), vision_config=vision.to_dict())
    model = seeded_model(SiglipModel, config, seed)
    # SigLIP's init (LeCun patch convolution, Flax embeddings) is large at width 32: a patch or
    # word scaled towards a baseline swings its LayerNorm input through zero within a few
    # per cent of the path, and integrated gradients need hundreds of steps. Smaller input
    # embeddings keep the random function smooth, as the tiny CLIP's are.
    with torch.no_grad():
        model.vision_model.embeddings.patch_embedding.weight.mul_(EMBED_SCALE)
        model.text_model.embeddings.token_embedding.weight.mul_(EMBED_SCALE)
        model.text_model.embeddings.position_embedding.weight.mul_(EMBED_SCALE)
    return SiglipVLM(model, processor, "tiny-siglip")
