"""The model's context window: sequences longer than it are refused, never run silently.

A decoder's language model (or a dual encoder's text tower) has a fixed number of positions
(``max_position_embeddings``). ``check_prompts`` refuses prompts whose words alone do not fit,
before any processing; ``check_length`` refuses a prepared sequence (image tokens included)
that does not fit with what a target appends; ``fit_new_tokens`` shortens a generation that
would run past the context, with a warning that says so.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mmscope.core.errors import InputError

if TYPE_CHECKING:
    from mmscope.core.inputs import Inputs


def context_length(vlm: Any) -> int | None:
    """Positions of the model's text side, from its config; ``None`` where it says none."""
    config = getattr(getattr(vlm, "model", None), "config", None)
    if config is None:
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for source in (text, config):
        value = getattr(source, "max_position_embeddings", None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _refuse(vlm: Any, what: str, length: int, limit: int) -> InputError:
    return InputError(
        f"{what} is {length:,} tokens, longer than the {limit:,}-token context of "
        f"{getattr(vlm, 'name', 'the model')}; shorten it"
    )


def check_prompts(vlm: Any, prompts: Sequence[str]) -> None:
    """Refuse a prompt whose own tokens exceed the context (before any image is processed)."""
    limit = context_length(vlm)
    if limit is None:
        return
    tokenizer: Any = vlm.tokenizer
    for prompt in prompts:
        if len(prompt) < limit // 4:  # too few characters to need counting
            continue
        n = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if n > limit:
            raise _refuse(vlm, "the prompt", n, limit)


def check_length(vlm: Any, inputs: Inputs, extra: int = 0, what: str = "") -> None:
    """Refuse ``inputs`` (plus ``extra`` appended tokens) when longer than the context."""
    limit = context_length(vlm)
    length = int(inputs.input_ids.shape[1]) + extra
    if limit is not None and length > limit:
        appended = f" with {extra} appended tokens" if extra else ""
        raise _refuse(vlm, what or f"the prepared sequence{appended}", length, limit)


def fit_new_tokens(vlm: Any, inputs: Inputs, max_new_tokens: int) -> int:
    """``max_new_tokens``, shortened with a warning where the answer would run past the
    context; a sequence that leaves no room for one new token is refused."""
    limit = context_length(vlm)
    if limit is None:
        return max_new_tokens
    check_length(vlm, inputs, 1, "the prepared sequence with one new token")
    room = limit - int(inputs.input_ids.shape[1])
    if max_new_tokens > room:
        warnings.warn(
            f"generating {room} new tokens, not {max_new_tokens}: the {limit}-token context "
            f"of {getattr(vlm, 'name', 'the model')} ends there",
            stacklevel=3,
        )
        return room
    return max_new_tokens
