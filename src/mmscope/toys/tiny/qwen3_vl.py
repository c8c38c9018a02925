"""A tiny random-weight Qwen3-VL (real HF classes) for tests: built offline in well under 2 s."""

from __future__ import annotations

from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from mmscope.models.qwen3_vl import ImageOnlyQwen3VLProcessor, Qwen3VLVLM
from mmscope.toys.tiny.qwen2_vl import MERGE_SIZE, QWEN_SPECIALS, qwen_model, qwen_text
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
    rope = {"mrope_section": [4, 2, 2], "mrope_interleaved": True}
    text = qwen_text(tok, ids, rope, head_dim=16)
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
    model = qwen_model(Qwen3VLConfig, Qwen3VLForConditionalGeneration, text, vision, ids, seed)
    return Qwen3VLVLM(model, processor, name="tiny-qwen3-vl")
