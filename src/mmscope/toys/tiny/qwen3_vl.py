"""A tiny random-weight Qwen3-VL (real HF classes) for tests: built offline in well under 2 s."""

from __future__ import annotations

import torch
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from mmscope.models.qwen3_vl import ImageOnlyQwen3VLProcessor, Qwen3VLVLM
from mmscope.toys.tiny.qwen2_vl import MERGE_SIZE, QWEN_SPECIALS
from mmscope.toys.tiny.qwen2_vl import tiny_processor as qwen_processor

#: Qwen3-VL's patch side: one merged token per 32x32 pixels.
PATCH_SIZE = 16
FACTOR = PATCH_SIZE * MERGE_SIZE


def tiny_processor() -> ImageOnlyQwen3VLProcessor:
    """Qwen2-VL's tiny tokenizer and image processor (patch 16) in the image-only Qwen3-VL
    processor, with 1 to 16 merged cells: a 64x96 (w x h) image keeps its size (grid_thw
    (1, 6, 4), merged 3x2), as does a 128x64 one (merged 2x4)."""
    return qwen_processor(  # type: ignore[no-any-return]
        min_pixels=FACTOR * FACTOR,
        max_pixels=16 * FACTOR * FACTOR,
        patch_size=PATCH_SIZE,
        processor_class=ImageOnlyQwen3VLProcessor,
    )


def tiny_qwen3_vl(seed: int = 0) -> Qwen3VLVLM:
    """A random-weight tiny ``Qwen3VLForConditionalGeneration`` wrapped in its adapter.

    LM (Qwen3): hidden 32, 2 layers, 2 heads of dim 16 with q/k norms, interleaved M-RoPE
    sections 4+2+2 = 8. Vision: hidden 32, depth 3, 2 heads, GELU MLP 64, patch 16, merge 2,
    a 4x4 learned position grid; DeepStack levels read vision layers 0 and 1 and are added
    after LM layers 0 and 1. Deterministic in ``seed``.
    """
    processor = tiny_processor()
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 10000.0,
            "mrope_section": [4, 2, 2],
            "mrope_interleaved": True,
        },
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": ids["<|im_end|>"],
    }
    vision = {
        "depth": 3,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 32,  # the mergers' output size: the LM's hidden size
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": 2,
        "num_position_embeddings": 16,
        "deepstack_visual_indexes": [0, 1],
    }
    config = Qwen3VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    config.architectures = ["Qwen3VLForConditionalGeneration"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen3VLForConditionalGeneration(config)
    model.eval()
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = tok.pad_token_id, ids["<|im_end|>"], None
    return Qwen3VLVLM(model, processor, name="tiny-qwen3-vl")
