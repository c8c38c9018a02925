"""A tiny random-weight LLaVA (32 px images, 4x4 patch grid, 2+2 layers)."""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

from mmscope.models.llava import LlavaVLM
from mmscope.toys import build
from mmscope.toys.tiny.common import small_lm, small_tower

SIZE, PATCH = 32, 8


def tiny_llava(seed: int = 0) -> LlavaVLM:
    """A seeded random LLaVA with the toy tokenizer and processor, in eval mode."""
    torch.manual_seed(seed)
    tok = build.toy_tokenizer()
    vision = small_tower(CLIPVisionConfig, SIZE, PATCH, projection_dim=16)
    text = small_lm(
        LlamaConfig, len(tok), 128, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=build.image_token_id(tok),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    return LlavaVLM(model, build.llava_processor(SIZE, PATCH), "tiny-llava")
