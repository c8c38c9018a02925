"""OPERA (Huang et al. 2024, "OPERA: Alleviating hallucination in multi-modal large language
models via over-trust penalty and retrospection-allocation").

Beam search in which each beam's top ``num_attn_candidates`` tokens are re-scored by the last
layer's self-attention (max over heads) of the candidate: the over-trust penalty is the largest
column product of ``scale_factor`` times that attention over the response window, times 1e-7
(the "knowledge aggregation" pattern, ``opera_state.knowledge_aggregation``); for the first 10
response tokens it is minus the candidate's attention on the image tokens instead. A beam's step
scores are the log-softmax over its candidates of ``logit - penalty_weights * penalty`` (the
paper's ``Softmax[H(h_t) - alpha phi(w_<=t)]`` over the candidate set Y); other tokens are
excluded. Beam bookkeeping follows Hugging Face's beam search (``opera_state.Beams``).

Retrospection-allocation: each step records, per beam, the most common argmax column of its
candidates; when the current one (most common over beams) is, for every beam, the most common
location of more than ``threshold`` recorded steps (and not one of the first 10 tokens),
decoding rolls back to the token right after it (at most ``num_attn_candidates`` times per
position, then the position before) and re-selects that token among the candidates without the
(beam, token) pairs chosen there before, as the paper describes (OPERA's code re-selects over
the whole vocabulary with the raw logits).

Items are decoded one at a time (unpadded), as OPERA's code does; see ``opera_search`` for the
fast path (one batched forward per step).

Hybrid models (Qwen3.5) read the last layer that has softmax attention (``opera_search.site``),
with a warning when that is not the last layer.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from mmscope.core.errors import InputError
from mmscope.core.registry import register
from mmscope.core.state import preserved
from mmscope.core.validate import integer, number, positive_int
from mmscope.decoding.base import KIND, LEVEL, Decoder
from mmscope.decoding.opera_search import (
    SITE,
    Search,
    Settings,
    eos_ids,
    kept_rope_deltas,
    site,
    split_items,
)

if TYPE_CHECKING:
    from mmscope.core.inputs import Inputs
    from mmscope.models.base import VLM

FAMILY = "decoding/attention-penalty"
PAPER = "Huang et al. 2024"


@register(
    "opera", kind=KIND, family=FAMILY, paper=PAPER, level=LEVEL, needs=("lm_image_tokens",)
)
class OPERA(Decoder):
    """OPERA (Huang et al. 2024): beam search with the over-trust penalty and rollbacks.

    Args:
        num_beams: beams of the search (5).
        num_attn_candidates: candidates per beam that are scored (5); also the most rollbacks
            to one position.
        scale_factor: attention is multiplied by this before the column products (50).
        threshold: a location must be the most common more than this many times (15).
        window_size: steps of history kept for rollbacks (512).
        penalty_weights: weight of the penalty on the logits (1; 0 is beam search over the
            candidates).
    """

    def __init__(
        self,
        num_beams: int = 5,
        num_attn_candidates: int = 5,
        scale_factor: float = 50.0,
        threshold: int = 15,
        window_size: int = 512,
        penalty_weights: float = 1.0,
    ) -> None:
        scale = number("scale_factor", scale_factor)
        if scale <= 0:
            raise InputError("scale_factor must be positive")
        self.settings = Settings(
            num_beams=positive_int("num_beams", num_beams),
            num_attn_candidates=positive_int("num_attn_candidates", num_attn_candidates),
            scale_factor=scale,
            threshold=integer("threshold", threshold, minimum=0),
            window_size=positive_int("window_size", window_size),
            penalty_weights=number("penalty_weights", penalty_weights),
        )

    def decode(self, vlm: VLM, inputs: Inputs, max_new_tokens: int) -> torch.Tensor:
        positive_int("max_new_tokens", max_new_tokens)
        where = site(vlm)
        if where != SITE:
            later = vlm.non_softmax_layers("lm.layer")
            warnings.warn(
                f"OPERA reads {where} of {vlm.name}, its last softmax-attention layer: the "
                f"layers after it have none ({'; '.join(sorted(set(later.values())))})",
                stacklevel=2,
            )
        items = split_items(vlm, inputs)
        outs = []
        with preserved(vlm.model), kept_rope_deltas(vlm.model), vlm.attention("eager"):
            with torch.no_grad():
                for item in items:
                    outs.append(Search(vlm, item, self.settings, max_new_tokens).run())
        pad = vlm.tokenizer.pad_token_id
        pad = int(eos_ids(vlm)[0]) if pad is None else int(pad)
        width = max(len(o) for o in outs)
        new = torch.full((len(outs), width), pad, dtype=torch.long, device=inputs.input_ids.device)
        for b, tokens in enumerate(outs):
            new[b, : len(tokens)] = tokens
        return new


@register(
    "opera_fast", kind=KIND, family=FAMILY, paper=PAPER, level=LEVEL, needs=("lm_image_tokens",)
)
class OPERAFast(OPERA):
    """OPERA with 2 attention candidates per beam instead of 5 (the setting follow-up code
    runs): the candidate forward has 2 x num_beams rows instead of 5 x. Two is the fewest that
    keeps beam search's 2 x num_beams continuations per step within the candidates (with one
    end-of-sequence id); the other hyperparameters are the paper's."""

    def __init__(
        self,
        num_beams: int = 5,
        num_attn_candidates: int = 2,
        scale_factor: float = 50.0,
        threshold: int = 15,
        window_size: int = 512,
        penalty_weights: float = 1.0,
    ) -> None:
        super().__init__(
            num_beams, num_attn_candidates, scale_factor, threshold, window_size, penalty_weights
        )
