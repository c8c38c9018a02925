"""A tiny random-weight Idefics3 / SmolVLM (64 px longest edge split into 32 px sub-images,
4x4 patches of 8 px shuffled 2x2 into 2x2 tokens per view, 2+2 layers), built offline."""

from __future__ import annotations

from transformers import (
    AddedToken,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    Idefics3VisionConfig,
    LlamaConfig,
)

from mmscope.models.idefics3 import Idefics3VLM
from mmscope.toys import build
from mmscope.toys.tiny.common import seeded_model, small_lm, small_tower
from mmscope.toys.tokenizer import build_tokenizer

#: Longest edge every image is resized to, side of a sub-image (the tower's input), patch.
LONGEST, TILE, PATCH, SCALE = 64, 32, 8, 2
#: Image tokens per view: (32 / 8 / 2) ** 2.
SEQ_LEN = (TILE // PATCH // SCALE) ** 2
#: pad, unk, bos, eos (the toy tokenizer's order), then every token ``Idefics3Processor``
#: writes: the image token, the fake token around each view, the global view's tag and the
#: sub-image markers ``<row_r_col_c>`` for the 6x6 grid it knows.
SPECIALS: tuple[str, ...] = (
    "<|endoftext|>",
    "<unk>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)),
)
#: SmolVLM's chat template, without its leading BOS (the tokenizer adds it).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def tiny_processor(
    longest_edge: int = LONGEST, tile: int = TILE, splitting: bool = True
) -> Idefics3Processor:
    """The toy words as a SmolVLM-style tokenizer (adds BOS ``<|im_start|>``; ``\\n`` is a
    token of its own, as in the real vocabularies) and ``Idefics3ImageProcessorPil`` resizing
    each image's longest edge to ``longest_edge`` and splitting it into ``tile`` px squares
    (``splitting=False``: one ``tile`` px global view), mean and std 0.5."""
    tokenizer = build_tokenizer([*build.words(), "User:", "Assistant:"], SPECIALS, add_bos=True)
    tokenizer.add_tokens([AddedToken("\n", normalized=False, special=False)])
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": longest_edge},
        max_image_size={"longest_edge": tile},
        do_image_splitting=splitting,
        image_mean=[0.5] * 3,
        image_std=[0.5] * 3,
    )
    return Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )


def tiny_idefics3(seed: int = 0, splitting: bool = True) -> Idefics3VLM:
    """A seeded random ``Idefics3ForConditionalGeneration`` in eval mode (the global random
    state is left as it was). Vision: SigLIP-style, hidden 32, 2 layers, 2 heads, 32 px input,
    patch 8; connector: pixel shuffle 2 and a linear map to 32. LM: Llama, hidden 32, 2
    layers, 2 heads."""
    processor = tiny_processor(splitting=splitting)
    tok = processor.tokenizer
    eos = tok.convert_tokens_to_ids("<end_of_utterance>")
    vision = small_tower(Idefics3VisionConfig, TILE, PATCH)
    text = small_lm(LlamaConfig, len(tok), 512, tok.pad_token_id, tok.bos_token_id, eos)
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        scale_factor=SCALE,
        image_token_id=processor.image_token_id,
    )
    model = seeded_model(
        Idefics3ForConditionalGeneration,
        config,
        seed,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=eos,
    )
    return Idefics3VLM(model, processor, name="tiny-idefics3")
