"""Architectures, tokenizers and processors of the toy models (real HF classes, tiny sizes)."""

from __future__ import annotations

from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTextConfig,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from mmscope.toys.tokenizer import SPECIALS, build_tokenizer
from mmscope.world import DESCRIBE_PROMPT, vocabulary

IMAGE_SIZE = 48
PATCH_SIZE = 8
GRID = IMAGE_SIZE // PATCH_SIZE
NUM_IMAGE_TOKENS = GRID * GRID
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
ANSWER_CUE = "answer :"
#: The toy's chat template: "<image> {prompt} answer :" (the tokenizer adds <s>).
CHAT_TEMPLATE = (
    "{% for message in messages %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image> {% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endfor %}{% if add_generation_prompt %} "
    + ANSWER_CUE
    + "{% endif %}"
)
#: The question-first template, "{prompt} <image> answer :": the image tokens then see the
#: question (as an instruction-aware Q-Former does), so a patch can tell whether it is the
#: object asked about; the recipe's ``question_first`` trains with it.
QUESTION_FIRST_TEMPLATE = (
    "{% for message in messages %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }} {% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>{% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %} "
    + ANSWER_CUE
    + "{% endif %}"
)


def words() -> list[str]:
    """Every word the toys read or write: the world's vocabulary plus the prompt cue."""
    return sorted(set(vocabulary()) | set(ANSWER_CUE.split()) | set(DESCRIBE_PROMPT.split()))


def toy_tokenizer(for_clip: bool = False) -> PreTrainedTokenizerFast:
    """The word-level tokenizer; CLIP's appends </s> (its pooled position)."""
    return build_tokenizer(
        words(),
        SPECIALS,
        add_bos=True,
        add_eos=for_clip,
        padding_side="right" if for_clip else "left",
    )


def image_token_id(tokenizer: PreTrainedTokenizerFast) -> int:
    """Id of the ``<image>`` placeholder."""
    return int(tokenizer.get_vocab()["<image>"])


def image_processor(size: int = IMAGE_SIZE) -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        do_center_crop=True,
        image_mean=list(MEAN),
        image_std=list(STD),
    )


def vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=96,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        projection_dim=64,
        hidden_act="gelu",
    )


def build_clip(vocab_size: int) -> CLIPModel:
    """toy-clip: a CLIP dual encoder (Radford et al. 2021) of about 1M parameters."""
    tok = toy_tokenizer(for_clip=True)
    text = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=24,
        projection_dim=64,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    config = CLIPConfig(
        text_config=text.to_dict(), vision_config=vision_config().to_dict(), projection_dim=64
    )
    config.architectures = ["CLIPModel"]
    return CLIPModel(config)


def build_llava(vocab_size: int, vision_feature_layer: int = -2) -> LlavaForConditionalGeneration:
    """toy-llava: CLIP vision tower + 2-layer MLP projector + LLaMA language model.

    Like LLaVA-1.5 it reads the tower's penultimate layer: CLIP trains only the last layer's
    class token, whose attention reads the patch tokens of the layer before.
    """
    tok = toy_tokenizer()
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision_config(),
        text_config=text,
        image_token_index=image_token_id(tok),
        vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    config.architectures = ["LlavaForConditionalGeneration"]
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    return model


def llava_processor(
    size: int = IMAGE_SIZE, patch: int = PATCH_SIZE, question_first: bool = False
) -> LlavaProcessor:
    """The toy's processor; ``question_first`` puts the prompt before the image tokens."""
    return LlavaProcessor(
        image_processor=image_processor(size),
        tokenizer=toy_tokenizer(),
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=QUESTION_FIRST_TEMPLATE if question_first else CHAT_TEMPLATE,
        image_token="<image>",
    )


def clip_processor(size: int = IMAGE_SIZE) -> CLIPProcessor:
    return CLIPProcessor(
        image_processor=image_processor(size), tokenizer=toy_tokenizer(for_clip=True)
    )
