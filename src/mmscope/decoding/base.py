"""Decoders: how a vision-language model turns its next-token distributions into text.

A decoder takes its settings in ``__init__`` and the data in ``__call__(vlm, inputs,
max_new_tokens)``, returns one string per batch item, and leaves the model as it found it
(random draws come from its own seeded generator, never the global one).
``mmscope.generate(vlm, inputs, decoder="vcd", **settings)`` is the shortcut.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from mmscope.core.context import fit_new_tokens
from mmscope.core.registry import REGISTRY
from mmscope.core.validate import MAX_NEW_TOKENS, count
from mmscope.models.capabilities import require_entry

if TYPE_CHECKING:
    from mmscope.core.inputs import Inputs
    from mmscope.models.base import VLM

KIND = "decoder"
LEVEL = "inference/decoding"


class Decoder:
    """Base of decoders: subclasses implement ``decode`` (ids of the new tokens per item)."""

    @property
    def draws(self) -> bool:
        """Whether the decoder samples (its items' texts then depend on their batch)."""
        return False

    def __call__(self, vlm: VLM, inputs: Inputs, max_new_tokens: int = 24) -> list[str]:
        """The continuation of each batch item, decoded without special tokens; an answer
        that would run past the model's context is shortened, with a warning."""
        require_entry(vlm, self, KIND)
        max_new_tokens = count("max_new_tokens", max_new_tokens, MAX_NEW_TOKENS)
        max_new_tokens = fit_new_tokens(vlm, inputs, max_new_tokens)
        with torch.no_grad():
            new = self.decode(vlm, inputs.to(vlm.device), max_new_tokens)
        texts = vlm.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [t.strip() for t in texts]

    def decode(self, vlm: VLM, inputs: Inputs, max_new_tokens: int) -> torch.Tensor:
        """``(batch, new tokens)`` ids, padded after an item's end of sequence."""
        raise NotImplementedError


def hf_generate(vlm: VLM, inputs: Inputs, max_new_tokens: int, **kwargs: Any) -> torch.Tensor:
    """The new tokens of Hugging Face's ``generate`` (left-padded prompts)."""
    kwargs.setdefault("pad_token_id", vlm.tokenizer.pad_token_id)
    out = vlm.model.generate(**inputs.tensors, max_new_tokens=max_new_tokens, **kwargs)
    return out[:, inputs.input_ids.shape[1] :]


@contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Draw from a generator seeded with ``seed`` and give the global one back as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def decoders() -> list[str]:
    """Keys of every registered decoder, sorted."""
    import mmscope.decoding  # noqa: F401  (registers them)

    return sorted(REGISTRY.keys(KIND))


def make_decoder(key: str, **settings: Any) -> Decoder:
    """A registered decoder from its key and settings (bad settings raise InputError)."""
    import mmscope.decoding  # noqa: F401  (registers them)

    return REGISTRY.make(key, KIND, **settings)  # type: ignore[no-any-return]


def generate(
    vlm: VLM,
    inputs: Inputs,
    decoder: str | Decoder = "greedy",
    max_new_tokens: int = 24,
    **settings: Any,
) -> list[str]:
    """Decode ``inputs`` with a registered decoder (or a ``Decoder`` instance).

    >>> mmscope.generate(vlm, inputs, decoder="vcd", alpha=1.0)
    """
    chosen = make_decoder(decoder, **settings) if isinstance(decoder, str) else decoder
    return chosen(vlm, inputs, max_new_tokens)
