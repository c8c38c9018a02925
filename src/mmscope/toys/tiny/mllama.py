"""A tiny random-weight Llama 3.2 Vision (``MllamaForConditionalGeneration``): 32 px tiles of
4x4 patches, at most 2 tiles per image, 2 local + 1 global vision layers, and 3 LM layers of
which layer 1 is a cross-attention layer; built offline in well under a second."""

from __future__ import annotations

import torch
from transformers import (
    MllamaConfig,
    MllamaForConditionalGeneration,
    MllamaImageProcessorPil,
    MllamaProcessor,
)

from mmscope.models.mllama import MllamaVLM
from mmscope.toys import build
from mmscope.toys.tiny.common import seeded_model
from mmscope.toys.tokenizer import build_tokenizer

TILE, PATCH, MAX_TILES = 32, 8, 2
#: LM layers that cross-attend to the image (the others self-attend).
CROSS_LAYERS = (1,)
#: Llama 3's specials: pad, unk, bos, eos (the toy tokenizer's order), then the image token,
#: the chat headers and the python tag (``MllamaProcessor`` looks it up).
SPECIALS: tuple[str, ...] = (
    "<|finetune_right_pad_id|>",
    "<unk>",
    "<|begin_of_text|>",
    "<|eot_id|>",
    "<|image|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|python_tag|>",
)
#: Llama 3.2 Vision Instruct's chat template, cut down: BOS, one header per turn, ``<|image|>``
#: for each image before the turn's text.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}"
    "<|end_header_id|>\n\n{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'image' %}<|image|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def tiny_processor(tile: int = TILE, max_tiles: int = MAX_TILES) -> MllamaProcessor:
    """The toy words as a Llama 3 tokenizer (no automatic BOS: the chat template writes it)
    and ``MllamaImageProcessorPil`` with ``tile`` px tiles, at most ``max_tiles`` per image,
    mean and std 0.5 (so the processor's zero padding becomes -1, black)."""
    words = [*build.words(), "user", "assistant"]
    tokenizer = build_tokenizer(words, SPECIALS, add_bos=False)
    image_processor = MllamaImageProcessorPil(
        size={"height": tile, "width": tile},
        max_image_tiles=max_tiles,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    return MllamaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE
    )


def tiny_config(vocab_size: int, image_token_id: int, pad: int, bos: int, eos: int) -> MllamaConfig:
    """Vision: hidden 32, 2 heads, 2 local layers (layer 0's output also read: vision output
    32 * 2 = 64) and 1 global layer. LM: hidden 32, 3 layers, 2 heads, cross-attention at 1."""
    vision = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "attention_heads": 2,
        "num_hidden_layers": 2,
        "num_global_layers": 1,
        "intermediate_layers_indices": [0],
        "vision_output_dim": 64,
        "image_size": TILE,
        "patch_size": PATCH,
        "max_num_tiles": MAX_TILES,
        "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
    }
    text = {
        "vocab_size": vocab_size,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "cross_attention_layers": list(CROSS_LAYERS),
        "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "pad_token_id": pad,
        "bos_token_id": bos,
        "eos_token_id": eos,
    }
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=image_token_id)
    config.architectures = ["MllamaForConditionalGeneration"]
    return config


def tiny_mllama(seed: int = 0) -> MllamaVLM:
    """A seeded random ``MllamaForConditionalGeneration`` with its processor, in eval mode
    (the global random state is left as it was).

    Transformers initialises every tanh gate (cross-attention, tile embeddings) at zero,
    which would cut the image off the language model; they are drawn in (0.5, 1) here so that
    the image reaches the answer, as in a trained checkpoint.
    """
    processor = tiny_processor()
    tok = processor.tokenizer
    config = tiny_config(
        len(tok), processor.image_token_id, tok.pad_token_id, tok.bos_token_id, tok.eos_token_id
    )

    def open_gates(model: MllamaForConditionalGeneration) -> None:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("gate") or "_gate" in name.rsplit(".", 1)[-1]:
                    param.uniform_(0.5, 1.0)

    model = seeded_model(
        MllamaForConditionalGeneration,
        config,
        seed,
        open_gates,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )
    return MllamaVLM(model, processor, name="tiny-mllama")
