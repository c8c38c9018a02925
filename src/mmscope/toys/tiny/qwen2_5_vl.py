"""A tiny random-weight Qwen2.5-VL (real HF classes) for tests: built offline in well under 2 s.

The vision tower's windows are 2x2 merged cells (``window_size`` 56 pixels) and the pixel
budget is at least 3x3 merged cells, so every image, the contract suite's 48x48 scenes too,
has cells whose window order differs from the processor's order.
"""

from __future__ import annotations

from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from mmscope.models.qwen2_5_vl import ImageOnlyQwen2_5_VLProcessor, Qwen2_5_VLVLM
from mmscope.toys.tiny.qwen2_vl import (
    FACTOR,
    MERGE_SIZE,
    PATCH_SIZE,
    QWEN_SPECIALS,
    qwen_model,
    qwen_text,
)
from mmscope.toys.tiny.qwen2_vl import tiny_processor as qwen_processor

#: Window side in pixels: 2 merged cells of 28 pixels.
WINDOW_SIZE = 2 * FACTOR


def tiny_processor() -> ImageOnlyQwen2_5_VLProcessor:
    """Qwen2-VL's tiny tokenizer and image processor in the image-only Qwen2.5-VL processor,
    with a budget of 3x3 to 4x4 merged cells: an 84x84 or 140x84 (w x h) image keeps its
    size (merged grids 3x3 and 3x5); a 48x48 one grows to 84x84."""
    return qwen_processor(  # type: ignore[no-any-return]
        min_pixels=9 * FACTOR * FACTOR,
        max_pixels=16 * FACTOR * FACTOR,
        processor_class=ImageOnlyQwen2_5_VLProcessor,
    )


def tiny_qwen2_5_vl(seed: int = 0) -> Qwen2_5_VLVLM:
    """A random-weight tiny ``Qwen2_5_VLForConditionalGeneration`` wrapped in its adapter.

    LM: hidden 32, 2 layers, 2 heads (head dim 16, M-RoPE sections 2+3+3 = 8). Vision: hidden
    32, depth 2 (block 0 windowed, block 1 full attention), 2 heads, SwiGLU 64, patch 14,
    spatial merge 2, window 56 pixels. Deterministic in ``seed``.
    """
    processor = tiny_processor()
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = qwen_text(tok, ids, {"mrope_section": [2, 3, 3]}, bos_token_id=None)
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 32,  # the merger's output size: the LM's hidden size
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": 2,
        "window_size": WINDOW_SIZE,
        "fullatt_block_indexes": [1],
    }
    model = qwen_model(
        Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, text, vision, ids, seed
    )
    return Qwen2_5_VLVLM(model, processor, name="tiny-qwen2.5-vl")
