"""The baselines every hallucination-mitigating decoder is compared with: greedy search,
multinomial sampling and beam search, as Hugging Face's ``generate`` runs them."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mmscope.core.errors import InputError
from mmscope.core.registry import register
from mmscope.core.validate import integer, number, positive_int, valid_seed
from mmscope.decoding.base import KIND, LEVEL, Decoder, hf_generate, seeded

if TYPE_CHECKING:
    from mmscope.core.inputs import Inputs
    from mmscope.models.base import VLM


@register("greedy", kind=KIND, family="decoding/baseline", paper="", level=LEVEL)
class Greedy(Decoder):
    """The most probable token at every step."""

    def decode(self, vlm: VLM, inputs: Inputs, max_new_tokens: int) -> torch.Tensor:
        return hf_generate(vlm, inputs, max_new_tokens, do_sample=False, num_beams=1)


@register("sampling", kind=KIND, family="decoding/baseline", paper="", level=LEVEL)
class Sampling(Decoder):
    """Multinomial sampling with temperature, top-k (0: off) and nucleus top-p (1: off).

    Args:
        temperature: softmax temperature (VCD's comparisons use 1).
        top_k: keep the k most probable tokens (0 keeps all).
        top_p: keep the smallest set of tokens whose probability reaches p.
        seed: seed of the decoder's own random draws.
    """

    def __init__(
        self, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0
    ) -> None:
        self.temperature = number("temperature", temperature)
        self.top_p = number("top_p", top_p)
        if self.temperature <= 0 or not 0 < self.top_p <= 1:
            raise InputError("temperature must be positive and top_p in (0, 1]")
        self.top_k = integer("top_k", top_k, minimum=0)
        self.seed = valid_seed(seed)

    @property
    def draws(self) -> bool:
        return True

    def decode(self, vlm: VLM, inputs: Inputs, max_new_tokens: int) -> torch.Tensor:
        with seeded(self.seed, vlm.device):
            return hf_generate(
                vlm,
                inputs,
                max_new_tokens,
                do_sample=True,
                temperature=self.temperature,
                top_k=self.top_k or None,
                top_p=self.top_p,
            )


@register("beam", kind=KIND, family="decoding/baseline", paper="", level=LEVEL)
class Beam(Decoder):
    """Beam search with ``num_beams`` beams (5, as OPERA's baseline)."""

    def __init__(self, num_beams: int = 5) -> None:
        self.num_beams = positive_int("num_beams", num_beams)

    def decode(self, vlm: VLM, inputs: Inputs, max_new_tokens: int) -> torch.Tensor:
        return hf_generate(vlm, inputs, max_new_tokens, do_sample=False, num_beams=self.num_beams)
