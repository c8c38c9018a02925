"""A tiny random-weight Qwen2-VL (real HF classes) for tests: built offline in well under 2 s."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from transformers import (
    PretrainedConfig,
    PreTrainedModel,
    ProcessorMixin,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
)

from mmscope.models.qwen2_vl import ImageOnlyQwen2VLProcessor, Qwen2VLVLM
from mmscope.toys.tiny.common import seeded_model, turn_template
from mmscope.toys.tokenizer import build_tokenizer

M = TypeVar("M", bound=PreTrainedModel)

PATCH_SIZE = 14
MERGE_SIZE = 2
#: Side of one merged token in pixels: smart-resize rounds both sides to a multiple of it.
FACTOR = PATCH_SIZE * MERGE_SIZE
#: Qwen's special tokens after pad, unk, bos, eos (``<|video_pad|>`` too: without it the
#: processor's video id would fall back to ``<unk>`` and mark unknown words as video).
QWEN_SPECIALS: tuple[str, ...] = (
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|image_pad|>",
    "<|vision_end|>",
    "<|video_pad|>",
)
SPECIALS: tuple[str, ...] = ("<|endoftext|>", "<unk>", "<s>", "</s>", *QWEN_SPECIALS)
WORDS: tuple[str, ...] = tuple(
    (
        "a an the is are what which where how many colour color shape object objects image "
        "picture in on of and left right top bottom red green blue yellow purple circle square "
        "triangle cross one two three four yes no there describe user assistant . , ?"
    ).split()
)
#: Qwen-style chat: "<|im_start|>user\n{images}{text}<|im_end|>\n<|im_start|>assistant\n", each
#: image as "<|vision_start|><|image_pad|><|vision_end|>".
CHAT_TEMPLATE = turn_template(
    "<|im_start|>", "<|im_end|>", "<|vision_start|><|image_pad|><|vision_end|>"
)


def tiny_processor(
    min_pixels: int = FACTOR * FACTOR,
    max_pixels: int = 16 * FACTOR * FACTOR,
    patch_size: int = PATCH_SIZE,
    processor_class: type[ProcessorMixin] = ImageOnlyQwen2VLProcessor,
) -> Any:
    """Word-level tokenizer + ``Qwen2VLImageProcessorPil`` with a small pixel budget, in
    ``processor_class`` (Qwen2.5-VL and Qwen3-VL pass their image-only processors).

    With the defaults a 56x84 (w x h) image keeps its size: grid_thw (1, 6, 4), merged 3x2.
    """
    tokenizer = build_tokenizer(WORDS, SPECIALS, add_bos=False)
    image_processor = Qwen2VLImageProcessorPil(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        patch_size=patch_size,
        merge_size=MERGE_SIZE,
        temporal_patch_size=2,
    )
    return processor_class(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )


def qwen_text(tok: Any, ids: dict[str, int], rope: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """The LM's config of the tiny Qwen models: hidden 32, MLP 64, 2 layers, 2 heads each with
    its own key/value head, ``rope`` added to the default rotary parameters, ``<|im_end|>``
    ending a turn; ``extra`` on top."""
    return {
        "vocab_size": len(tok),
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, **rope},
        "pad_token_id": tok.pad_token_id,
        "eos_token_id": ids["<|im_end|>"],
        **extra,
    }


def qwen_model(
    config_class: Callable[..., PretrainedConfig],
    model_class: type[M],
    text: dict[str, Any],
    vision: dict[str, Any],
    ids: dict[str, int],
    seed: int,
) -> M:
    """A seeded tiny Qwen-VL model: ``config_class`` of ``text`` and ``vision`` with the vision
    tokens of ``ids`` (``QWEN_SPECIALS``' ids), generation padding with ``text``'s pad and
    stopping at ``<|im_end|>``, no BOS."""
    config = config_class(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    return seeded_model(
        model_class,
        config,
        seed,
        pad_token_id=text["pad_token_id"],
        eos_token_id=ids["<|im_end|>"],
        bos_token_id=None,
    )


def tiny_qwen2_vl(seed: int = 0) -> Qwen2VLVLM:
    """A random-weight tiny ``Qwen2VLForConditionalGeneration`` wrapped in its adapter.

    LM: hidden 32, 2 layers, 2 heads (head dim 16, M-RoPE sections 2+3+3 = 8). Vision: embed
    32, depth 2, 2 heads, patch 14, spatial merge 2, temporal patch 2. Deterministic in ``seed``.
    """
    processor = tiny_processor()
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = qwen_text(tok, ids, {"mrope_section": [2, 3, 3]}, bos_token_id=None)
    vision = {
        "depth": 2,
        "embed_dim": 32,
        "hidden_size": 32,  # the merger's output size: the LM's hidden size
        "num_heads": 2,
        "mlp_ratio": 2,
        "patch_size": PATCH_SIZE,
        "spatial_merge_size": MERGE_SIZE,
        "temporal_patch_size": 2,
    }
    model = qwen_model(Qwen2VLConfig, Qwen2VLForConditionalGeneration, text, vision, ids, seed)
    return Qwen2VLVLM(model, processor, name="tiny-qwen2-vl")
