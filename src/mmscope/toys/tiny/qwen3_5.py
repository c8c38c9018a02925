"""A tiny random-weight Qwen3.5 (real HF classes) for tests: built offline in well under 2 s."""

from __future__ import annotations

from transformers import Qwen3_5Config, Qwen3_5ForConditionalGeneration

from mmscope.models.qwen3_5 import Qwen3_5VLM
from mmscope.toys.tiny.qwen2_vl import QWEN_SPECIALS, qwen_model, qwen_text
from mmscope.toys.tiny.qwen3_vl import PATCH_SIZE, tiny_processor

#: The LM's layer types: softmax, linear (gated delta net), softmax. A linear layer between two
#: softmax ones, so that skipping it shows in rollout, knockout windows and FastV's pruning.
LAYER_TYPES: tuple[str, ...] = ("full_attention", "linear_attention", "full_attention")


def tiny_qwen3_5(seed: int = 0) -> Qwen3_5VLM:
    """A random-weight tiny ``Qwen3_5ForConditionalGeneration`` wrapped in its adapter.

    LM: hidden 32, 3 layers (``LAYER_TYPES``): softmax layers with 2 heads of dim 16 (q/k norms,
    output gate, half of each head rotary: interleaved M-RoPE sections 2+1+1 = 4), the
    linear layer a gated delta net with 2 key and 2 value heads of dim 16, convolution kernel 4.
    Vision: Qwen3-VL's tiny tower without DeepStack (hidden 32, depth 2, 2 heads, patch 16,
    merge 2, a 4x4 learned position grid); the processor is Qwen3-VL's tiny one (one token per
    32x32 pixels). Deterministic in ``seed``.
    """
    processor = tiny_processor()
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    rope = {"partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1], "mrope_interleaved": True}
    text = qwen_text(
        tok,
        ids,
        rope,
        num_hidden_layers=len(LAYER_TYPES),
        layer_types=list(LAYER_TYPES),
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        linear_conv_kernel_dim=4,
    )
    vision = {
        "depth": 2,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_heads": 2,
        "out_hidden_size": 32,  # the merger's output size: the LM's hidden size
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 16,
    }
    model = qwen_model(Qwen3_5Config, Qwen3_5ForConditionalGeneration, text, vision, ids, seed)
    return Qwen3_5VLM(model, processor, name="tiny-qwen3.5")
