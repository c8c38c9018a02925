"""A tiny random-weight PaliGemma (32 px images, 4x4 patch grid, 2+2 layers), built offline."""

from __future__ import annotations

from transformers import (
    PaliGemmaConfig,
    PaliGemmaForConditionalGeneration,
    PaliGemmaProcessor,
    SiglipImageProcessorPil,
    SiglipVisionConfig,
)

from mmscope.models.paligemma import PaliGemmaVLM
from mmscope.toys import build
from mmscope.toys.tiny.common import seeded_model, small_tower
from mmscope.toys.tokenizer import build_tokenizer

SIZE, PATCH = 32, 8
#: Gemma's special tokens: pad, unk, bos, eos (the toy tokenizer's order) and the image token.
SPECIALS: tuple[str, ...] = ("<pad>", "<unk>", "<bos>", "<eos>", "<image>")


def tiny_processor(size: int = SIZE, patch: int = PATCH) -> PaliGemmaProcessor:
    """The toy words as a Gemma-style tokenizer (which adds BOS, as Gemma's does, until the
    processor turns that off) and ``SiglipImageProcessorPil`` resizing to ``size`` square
    with mean and std 0.5. ``PaliGemmaProcessor`` adds its 1024 location and 128
    segmentation tokens to the tokenizer, as for the real checkpoints."""
    tokenizer = build_tokenizer(build.words(), SPECIALS, add_bos=True)
    image_processor = SiglipImageProcessorPil(
        size={"height": size, "width": size},
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
        image_seq_length=(size // patch) ** 2,
    )
    return PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)


def tiny_config(vocab_size: int, image_token_id: int, text_model: str = "gemma") -> PaliGemmaConfig:
    """SigLIP tower (hidden 32, 2 layers, 2 heads, patch 8) and a Gemma LM (hidden 32, 2
    layers, 2 query heads of 16 sharing one key/value head, as PaliGemma's multi-query
    attention). ``text_model="gemma2"`` gives PaliGemma 2's LM, logits soft-capped at 30."""
    vision = small_tower(SiglipVisionConfig, SIZE, PATCH, vision_use_head=False)
    text = {
        "model_type": text_model,
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "max_position_embeddings": 256,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 3,
    }
    if text_model == "gemma2":
        text.update(final_logit_softcapping=30.0, query_pre_attn_scalar=16, sliding_window=16)
    config = PaliGemmaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_token_id,
        projection_dim=32,
        hidden_size=32,
    )
    config.architectures = ["PaliGemmaForConditionalGeneration"]
    return config


def tiny_paligemma(seed: int = 0, text_model: str = "gemma") -> PaliGemmaVLM:
    """A seeded random ``PaliGemmaForConditionalGeneration`` with its processor, in eval mode
    (the global random state is left as it was)."""
    processor = tiny_processor()
    tok = processor.tokenizer
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 2, 3)
    config = tiny_config(len(tok), processor.image_token_id, text_model)
    model = seeded_model(
        PaliGemmaForConditionalGeneration,
        config,
        seed,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    return PaliGemmaVLM(model, processor, name="tiny-paligemma")
