"""A tiny random-weight CLIP (32 px images, 4x4 patch grid, 2+2 layers)."""

from __future__ import annotations

import torch
from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig

from mmscope.models.clip import ClipVLM
from mmscope.toys import build
from mmscope.toys.tiny.common import small_tower

SIZE, PATCH = 32, 8


def tiny_clip(seed: int = 0) -> ClipVLM:
    """A seeded random CLIP with the toy tokenizer and processor, in eval mode."""
    torch.manual_seed(seed)
    tok = build.toy_tokenizer(for_clip=True)
    text = CLIPTextConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        projection_dim=16,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    vision = small_tower(CLIPVisionConfig, SIZE, PATCH, projection_dim=16)
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision.to_dict(), projection_dim=16
    )
    config.architectures = ["CLIPModel"]
    return ClipVLM(CLIPModel(config).eval(), build.clip_processor(SIZE), "tiny-clip")
