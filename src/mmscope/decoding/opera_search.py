"""OPERA's search over one item with a model (Huang et al. 2024; see ``decoding.opera``).

Fast path: at each step the candidates of all beams run as ONE forward of ``num_beams x C``
rows, on the beams' KV cache repeated per candidate. The chosen candidates' rows of that cache,
their logits and their attention rows are the next step's state, so a step costs one forward
(OPERA's code runs one forward per candidate plus one for the chosen tokens). The window's
column products are kept per beam and extended by one row per step. A rollback re-runs the
prefix of the new beams in one forward.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from transformers.cache_utils import LinearAttentionCacheLayerMixin

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.hooks import capture
from mmscope.core.sites import Site
from mmscope.decoding.opera_state import (
    Beams,
    Retrospection,
    aggregate,
    column_logs,
    extend_columns,
    masked_log_softmax,
    most_common,
)

if TYPE_CHECKING:
    from mmscope.core.inputs import Inputs
    from mmscope.models.base import VLM

#: Where the attention is read: the language model's last layer, its probabilities (on a
#: hybrid model whose last layer has no softmax attention, the last one that has: ``site``).
SITE = str(Site("lm.layer", -1, "attn.probs"))
#: The first response tokens are penalised by their attention on the image instead.
EARLY = 10
_PER_IMAGE = ("image_grid_thw", "image_sizes", "image_position_ids")


def split_items(vlm: VLM, inputs: Inputs) -> list[Inputs]:
    """Each batch item alone, its left padding removed (spans shifted to match)."""
    mask = inputs.attention_mask
    if inputs.batch_size == 1 and bool(mask.all()):
        return [inputs]
    n, length = inputs.input_ids.shape
    counts = [len(images) for images in inputs.images]
    rows = vlm.pixel_rows(inputs) if "pixel_values" in inputs.tensors else []
    out, image, row = [], 0, 0
    for b in range(n):
        pad = int((mask[b] == 0).sum())
        if not bool(mask[b, pad:].all()):
            raise InputError("OPERA needs left-padded inputs (as vlm.prepare makes them)")
        nrows = sum(rows[image : image + counts[b]]) if rows else 0
        tensors: dict[str, torch.Tensor] = {}
        for key, value in inputs.tensors.items():
            if key == "pixel_values":
                part = value[row : row + nrows]
            elif key in _PER_IMAGE:
                part = value[image : image + counts[b]]
            elif value.dim() >= 2 and tuple(value.shape[:2]) == (n, length):
                part = value[b : b + 1, pad:]
            elif value.shape[0] == n:
                part = value[b : b + 1]
            else:
                raise NotApplicableError(f"OPERA decodes item by item and cannot split {key!r}")
            if part.shape[0] or key not in ("pixel_values", *_PER_IMAGE):
                tensors[key] = part
        spans = tuple(
            replace(s, start=s.start - pad, end=s.end - pad, cells=tuple(c - pad for c in s.cells))
            for s in inputs.image_spans[b]
        )
        start, end = inputs.prompt_spans[b]
        item = replace(
            inputs,
            tensors=tensors,
            images=(inputs.images[b],),
            image_spans=(spans,),
            prompts=(inputs.prompts[b],),
            prompt_spans=((start - pad, end - pad),),
            prompt_tokens=inputs.prompt_tokens[b : b + 1],
        )
        out.append(item)
        image, row = image + counts[b], row + nrows
    return out


def site(vlm: VLM) -> str:
    """The probabilities OPERA reads: ``SITE``, or on a hybrid model whose last layer has no
    softmax attention (``vlm.softmax_layers``) its last softmax-attention layer's."""
    layers = vlm.softmax_layers("lm.layer")
    if not layers:
        raise NotApplicableError(
            f"OPERA reads softmax attention, and no layer of {vlm.name}'s language model has any"
        )
    last = layers[-1]
    if last == vlm.num_layers("lm.layer") - 1:
        return SITE
    return str(Site("lm.layer", last, "attn.probs"))


def run(vlm: VLM, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """One forward: float32 logits of the last position ``(rows, vocab)``, the last layer's
    attention (max over heads, rows renormalised) ``(rows, queries, keys)``, and the cache."""
    where = site(vlm)
    with capture(vlm, where) as cap:
        out = vlm.model(**kwargs, use_cache=True, logits_to_keep=1)
    probs = cap[where].max(dim=1).values.float()
    probs = probs / probs.sum(dim=-1, keepdim=True)
    return out.logits[:, -1].float(), probs, out.past_key_values


def _per_row(cache: Any, fn: Any, method: str, arg: Any) -> None:
    """``cache.<method>(arg)`` layer by layer; linear-attention layers (Qwen3.5's gated delta
    nets), which transformers gives no batch methods, get ``fn`` on their conv and recurrent
    states (batch first)."""
    for layer in cache.layers:
        if isinstance(layer, LinearAttentionCacheLayerMixin):
            for i in range(layer.number_of_states):
                if layer.is_conv_states_initialized[i]:
                    layer.conv_states[i] = fn(layer.conv_states[i])
                if layer.is_recurrent_states_initialized[i]:
                    layer.recurrent_states[i] = fn(layer.recurrent_states[i])
        if hasattr(type(layer), method):  # key-value layers (a hybrid layer has both)
            getattr(layer, method)(arg)


def repeat_rows(cache: Any, repeats: int) -> None:
    """``cache.batch_repeat_interleave(repeats)``, linear-attention layers included."""
    fn = lambda t: t.repeat_interleave(repeats, dim=0)  # noqa: E731
    _per_row(cache, fn, "batch_repeat_interleave", repeats)


def select_rows(cache: Any, index: torch.Tensor) -> None:
    """``cache.batch_select_indices(index)``, linear-attention layers included."""
    _per_row(cache, lambda t: t[index.to(t.device)], "batch_select_indices", index)


def candidate_forward(
    vlm: VLM, cache: Any, candidates: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every beam's candidates ``(beams, C)`` appended in one forward of ``beams * C`` rows
    (beam-major). The cache is repeated per candidate and extended in place; returns the
    candidates' next-token logits and attention rows ``(beams * C, keys)``."""
    repeat_rows(cache, candidates.shape[1])
    logits, probs, _ = run(vlm, input_ids=candidates.reshape(-1, 1), past_key_values=cache)
    return logits, probs[:, -1]


def image_positions(item: Inputs) -> torch.Tensor:
    """Positions of the (single) item's image tokens."""
    spans = [p for span in item.image_spans[0] for p in span.positions]
    return torch.tensor(spans, dtype=torch.long, device=item.input_ids.device)


def eos_ids(vlm: VLM) -> torch.Tensor:
    """The end-of-sequence ids ``generate`` stops at (the generation config's, else the
    tokenizer's)."""
    eos = vlm.model.generation_config.eos_token_id
    eos = vlm.tokenizer.eos_token_id if eos is None else eos
    return torch.tensor([eos] if isinstance(eos, int) else list(eos), dtype=torch.long)


@contextmanager
def kept_rope_deltas(model: torch.nn.Module) -> Iterator[None]:
    """Put back the ``rope_deltas`` that Qwen2-VL's forward stores on the model."""
    saved = [(m, m.rope_deltas) for m in model.modules() if hasattr(m, "rope_deltas")]
    try:
        yield
    finally:
        for module, value in saved:
            module.rope_deltas = value


@dataclass(frozen=True)
class Settings:
    """OPERA's hyperparameters (see ``decoding.opera.OPERA``)."""

    num_beams: int = 5
    num_attn_candidates: int = 5
    scale_factor: float = 50.0
    threshold: int = 15
    window_size: int = 512
    penalty_weights: float = 1.0


def candidate_scores(
    top: torch.Tensor,
    rows: torch.Tensor,
    columns: torch.Tensor,
    start: int,
    image: torch.Tensor,
    step: int,
    s: Settings,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """OPERA's scores of the candidates at ``step`` (counted from 0).

    Args:
        top: the candidates' logits ``(B, C)``.
        rows: their attention rows ``(B, C, keys)`` (renormalised, max over heads).
        columns: ``column_logs`` of each beam's window so far ``(B, step)``.
        start: the first response position; ``image``: the image token positions.

    Returns penalised logits (float32, finite), the window's column products with the
    candidate's row ``(B, C, step + 1)`` and the rollback locations ``(B, C)``.
    """
    columns = extend_columns(columns[:, None], rows[..., start:], s.scale_factor)
    penalty, location = aggregate(columns)
    if step < EARLY:
        penalty = -rows[..., image].sum(-1).double()
    scores = (top.double() - s.penalty_weights * penalty).clamp(-1e30, 1e30).float()
    return scores, columns, location


@dataclass
class _Step:
    """What a rollback to this step restores."""

    beams: dict[str, Any]
    candidates: torch.Tensor
    scores: torch.Tensor
    chosen: torch.Tensor | None = None


class Search:
    """OPERA's beam search over one unpadded item; ``run()`` returns the new tokens.

    ``rollbacks`` lists each rollback as (position, banned (beam, token) pairs, newly chosen
    pairs). Call inside ``vlm.attention("eager")`` and ``torch.no_grad()``.
    """

    def __init__(self, vlm: VLM, item: Inputs, settings: Settings, max_new_tokens: int) -> None:
        self.vlm, self.item, self.s = vlm, item, settings
        config = vlm.model.generation_config
        b, device = settings.num_beams, item.input_ids.device
        self.start = item.input_ids.shape[1]  # the first response position
        self.min_new = int(config.min_new_tokens or 0)  # EOS barred before (as HF's processor)
        self.eos = eos_ids(vlm).to(device)
        self.image = image_positions(item)
        self.beams = Beams(
            b,
            max_new_tokens,
            eos_ids(vlm),
            0,
            float(config.length_penalty if config.length_penalty is not None else 1.0),
            config.early_stopping or False,
            device,
        )
        self.retro = Retrospection(
            settings.threshold, settings.window_size, settings.num_attn_candidates, EARLY
        )
        logits, _, self.cache = run(vlm, **item.tensors)
        repeat_rows(self.cache, b)
        self.logits = logits.expand(b, -1)
        self.vocab = logits.shape[-1]
        self.c = min(settings.num_attn_candidates, self.vocab)
        self.columns = torch.zeros(b, 0, dtype=torch.float64, device=device)
        self.steps: dict[int, _Step] = {}
        self.rollbacks: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def run(self) -> torch.Tensor:
        while not self.beams.done:
            self.step()
        return self.beams.best()

    def step(self) -> None:
        b, c, t = self.s.num_beams, self.c, self.beams.step
        logits = self.logits
        if t < self.min_new:
            logits = logits.index_fill(1, self.eos, -math.inf)
        top, candidates = logits.topk(c, dim=-1)
        cand_logits, rows = candidate_forward(self.vlm, self.cache, candidates)
        scores, columns, location = candidate_scores(
            top, rows.view(b, c, -1), self.columns, self.start, self.image, t, self.s
        )
        self.retro.record(t, most_common(location))
        self.steps[t] = _Step(self.beams.snapshot(), candidates, scores)
        self.steps.pop(t - self.s.window_size, None)
        for _ in range(2):  # an exhausted position gives way to the one before it
            position = self.retro.trigger(t)
            if position is None:
                break
            if self.roll_back(position):
                if not self.beams.done:
                    self.logits, self.cache, self.columns = self.rebuild()
                return
            self.retro.exhaust(position)
        parents, tokens = self.beams.advance(_log_probs(scores, candidates, self.vocab))
        self.steps[t].chosen = torch.stack([parents, tokens], dim=1)
        # running beams continue with candidates: there are num_beams x C >= num_beams finite
        # continuations, and finished ones are only pushed down by 1e9
        match = candidates[parents] == tokens[:, None]
        pick = parents * c + match.int().argmax(-1)
        select_rows(self.cache, pick)
        self.logits, self.columns = cand_logits[pick], columns.reshape(b * c, -1)[pick]

    def roll_back(self, position: int) -> bool:
        """Go back to ``position`` and choose again among its candidates without the banned
        pairs; False (nothing done) when fewer than ``num_beams`` would be left."""
        step = self.steps[position]
        assert step.chosen is not None
        banned = self.retro.banned(position, step.chosen)
        hit = (step.candidates[banned[:, 0]] == banned[:, 1:]).to(torch.long)
        mask = torch.zeros_like(step.candidates).index_add_(0, banned[:, 0], hit).bool()
        scores = step.scores.masked_fill(mask, -math.inf)
        if int(torch.isfinite(scores).sum()) < self.s.num_beams:
            return False
        self.retro.commit(position, step.chosen)
        for later in [s for s in self.steps if s > position]:
            del self.steps[later]
        self.beams.restore(step.beams)
        parents, tokens = self.beams.advance(_log_probs(scores, step.candidates, self.vocab))
        step.chosen = torch.stack([parents, tokens], dim=1)
        self.rollbacks.append((position, banned, step.chosen))
        return True

    def rebuild(self) -> tuple[torch.Tensor, Any, torch.Tensor]:
        """Logits, cache and window column products of the running beams, from the prompt's
        forward and one forward of their response tokens (after a rollback)."""
        running = self.beams.running
        _, _, cache = run(self.vlm, **self.item.tensors)
        repeat_rows(cache, running.shape[0])
        logits, probs, cache = run(self.vlm, input_ids=running, past_key_values=cache)
        return logits, cache, column_logs(probs[..., self.start :], self.s.scale_factor)


def _log_probs(scores: torch.Tensor, candidates: torch.Tensor, vocab: int) -> torch.Tensor:
    """Log-softmax over each beam's candidates of their scores; -inf elsewhere."""
    full = torch.full((scores.shape[0], vocab), -math.inf, device=scores.device)
    return masked_log_softmax(full.scatter(1, candidates, scores))
