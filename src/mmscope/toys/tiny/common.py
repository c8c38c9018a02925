"""What the tiny builders share: the small tower and LM configs, a tokenizer naming its special
tokens, and the seeded build that leaves the global random state as it was."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast

from mmscope.toys.tokenizer import build_tokenizer

C = TypeVar("C", bound=PretrainedConfig)
M = TypeVar("M", bound=PreTrainedModel)


def small_tower(
    config_class: Callable[..., C], image_size: int, patch_size: int, **extra: Any
) -> C:
    """A vision tower's config: hidden 32, MLP 64, 2 layers, 2 heads (``extra`` on top)."""
    return config_class(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        **extra,
    )


def small_lm(
    config_class: Callable[..., C],
    vocab_size: int,
    max_positions: int,
    pad: int | None,
    bos: int | None,
    eos: int | None,
) -> C:
    """A Llama-style LM's config (Llama, Qwen2): hidden 32, MLP 64, 2 layers, 2 heads, each
    with its own key/value head."""
    return config_class(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=pad,
        bos_token_id=bos,
        eos_token_id=eos,
    )


def named_tokenizer(
    words: Iterable[str],
    specials: tuple[str, ...],
    named: dict[str, str],
    *,
    add_bos: bool,
    pad: str,
    bos: str,
    eos: str,
) -> PreTrainedTokenizerFast:
    """The toy word-level tokenizer over ``words`` and ``specials``, padding on the left, with
    ``named`` (attribute -> token, e.g. ``image_token``) readable off it as a family's
    processor expects (``tokenizer.image_token``, ``tokenizer.image_token_id``)."""
    core = build_tokenizer(list(words), specials, add_bos=add_bos)
    return PreTrainedTokenizerFast(
        tokenizer_object=core.backend_tokenizer,
        pad_token=pad,
        unk_token="<unk>",
        bos_token=bos,
        eos_token=eos,
        extra_special_tokens=dict(named),
        padding_side="left",
    )


def seeded_model(
    model_class: type[M],
    config: PretrainedConfig,
    seed: int,
    init: Callable[[M], None] | None = None,
    **generation: Any,
) -> M:
    """``model_class(config)`` drawn under ``torch.manual_seed(seed)`` (then ``init(model)``,
    which may draw too) with the global random state left as it was, in eval mode;
    ``config.architectures`` names the class and ``generation`` (e.g. ``pad_token_id``) is set
    on the model's generation config."""
    config.architectures = [model_class.__name__]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
        if init is not None:
            init(model)
    model.eval()
    for key, value in generation.items():
        setattr(model.generation_config, key, value)
    return model


def turn_template(
    start: str, end: str, image: str, model: str = "assistant", bos: bool = False
) -> str:
    """A chat template of turns ``{start}{role}\\n{content}{end}\\n`` (the assistant's role
    written ``model``), each image of a turn's content as ``image``; the generation prompt
    opens the ``model`` turn; ``bos``: ``{{ bos_token }}`` first."""
    role = "message['role']"
    if model != "assistant":
        role = f"'{model}' if message['role'] == 'assistant' else {role}"
    return (
        ("{{ bos_token }}" if bos else "")
        + "{% for message in messages %}"
        + start
        + "{{ "
        + role
        + " }}\n{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
        + image
        + "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}"
        + end
        + "\n{% endfor %}{% if add_generation_prompt %}"
        + start
        + model
        + "\n{% endif %}"
    )
