"""Harsanyi AND-interactions between image regions and prompt words.

Ren et al. 2023, "Defining and quantifying the emergence of sparse concepts in DNNs" (CVPR).
The players are image regions (a ``(rows, cols)`` coarsening of each image's patch grid) and
prompt words, at most 12 in all. ``v(T)`` is the target with only the players in ``T`` kept:
removed regions are set to the processor's mean colour in pixel space (``vlm.mask_pixels``
with fill 0), removed words have their embedding zeroed at ``vlm.TEXT_EMBED_SITE`` (for CLIP
that is the text embedding *with* its position embedding). The interaction of a set ``S`` is
``I(S) = sum_{T subset of S} (-1)^{|S|-|T|} v(T)``: all ``2^n`` masked inputs are run as
batched forwards and ``I`` follows from one fast Moebius transform (``n 2^n`` operations).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch

from mmscope.core.errors import InputError
from mmscope.core.hooks import patch
from mmscope.core.inputs import Inputs
from mmscope.core.registry import register
from mmscope.core.targets import (
    BoundTarget,
)
from mmscope.methods.attribution.base import Attribution, Maps, prompt_rows
from mmscope.methods.attribution.gradients import gradients

if TYPE_CHECKING:
    from mmscope.models.base import VLM

MAX_PLAYERS = 12
#: Log-probabilities are clamped to at most this before the log-odds (|log-odds| <= ~16.1).
LOG_PROB_MAX = -1e-7
SPARSITY_TOP = 20


def moebius(v: torch.Tensor) -> torch.Tensor:
    """Harsanyi interactions ``I(S) = sum_{T subset of S} (-1)^{|S|-|T|} v(T)``.

    Args:
        v: ``(..., 2^n)`` values over the subset lattice; subset ``T`` sits at index
            ``sum_{i in T} 2^i`` (bit ``i`` is player ``i``).

    Returns:
        ``(..., 2^n)`` interactions in the same layout (a new tensor), by the fast Moebius
        transform: for each player, subtract the value without it, ``n 2^n`` operations.
    """
    v = torch.as_tensor(v)
    size = v.shape[-1]
    n = size.bit_length() - 1
    if size < 1 or 1 << n != size:
        raise InputError(f"moebius needs a last axis of length 2^n, not {size}")
    out = v.clone().contiguous()
    lead = out.shape[:-1]
    for i in range(n):
        lattice = out.view(*lead, 1 << (n - 1 - i), 2, 1 << i)
        lattice[..., 1, :] -= lattice[..., 0, :]
    return out


def _bits(n: int) -> torch.Tensor:
    """``(2^n, n)``: row ``t`` holds the bits of ``t`` (which players subset ``t`` has)."""
    return (torch.arange(1 << n)[:, None] >> torch.arange(n)) & 1


def shapley(interactions: torch.Tensor) -> torch.Tensor:
    """Shapley values from interactions: ``phi_i = sum_{S containing i} I(S) / |S|``.

    ``(..., 2^n)`` -> ``(..., n)``.
    """
    n = interactions.shape[-1].bit_length() - 1
    bits = _bits(n).to(interactions)
    size = bits.sum(1)
    weight = torch.where(size > 0, 1 / size.clamp(min=1), torch.zeros_like(size))
    return (interactions * weight) @ bits


def log_odds(log_prob: torch.Tensor) -> torch.Tensor:
    """``s - log(1 - exp(s))`` for log-probabilities ``s``, stable, ``s`` clamped below 0."""
    s = log_prob.double().clamp(max=LOG_PROB_MAX)
    log1mexp = torch.where(s > -np.log(2), torch.log(-torch.expm1(s)), torch.log1p(-torch.exp(s)))
    return s - log1mexp


@dataclass(frozen=True)
class Players:
    """One batch item's players: names, then per region player ``(flat image, (rows, cols)
    0/1 indicator)``, then per word player its sequence position and prompt index."""

    names: tuple[str, ...]
    regions: tuple[tuple[int, torch.Tensor], ...]
    words: tuple[tuple[int, int], ...]

    @property
    def n(self) -> int:
        return len(self.names)


def _region_masks(grid: tuple[int, int], regions: tuple[int, int]) -> list[torch.Tensor]:
    (rows, cols), (r, c) = grid, regions
    if rows < r or cols < c:
        raise InputError(
            f"an image's {rows}x{cols} patch grid has too few patches for {r}x{c} regions"
        )
    rb = [i * rows // r for i in range(r + 1)]
    cb = [j * cols // c for j in range(c + 1)]
    out = []
    for i in range(r):
        for j in range(c):
            m = torch.zeros(rows, cols)
            m[rb[i] : rb[i + 1], cb[j] : cb[j + 1]] = 1
            out.append(m)
    return out


def players(
    inputs: Inputs,
    regions: tuple[int, int] | None,
    words: Sequence[int] | None,
    salience: Callable[[], list[torch.Tensor]] | None = None,
) -> list[Players]:
    """Each item's players: its images' regions in raster order, then its chosen words.

    With ``words`` None, all prompt tokens if they fit, else the most salient ones that fit
    (``salience()``: one score per prompt token per text row), kept in prompt order.
    """
    out, flat = [], 0
    scores: list[torch.Tensor] | None = None
    for b, spans in enumerate(inputs.image_spans):
        names: list[str] = []
        region_players = []
        for j, span in enumerate(spans):
            for index, m in enumerate(_region_masks(span.grid, regions) if regions else []):
                r, c = divmod(index, regions[1]) if regions else (0, 0)
                names.append(f"image{j}:r{r}c{c}")
                region_players.append((flat + j, m))
        flat += len(spans)
        if len(names) > MAX_PLAYERS:
            raise InputError(
                f"{len(names)} image regions for item {b}; at most {MAX_PLAYERS} players: "
                "choose coarser regions"
            )
        start, end = inputs.prompt_spans[b]
        tokens = inputs.prompt_tokens[b] if inputs.prompt_tokens else ()
        room = MAX_PLAYERS - len(names)
        if words is None and end - start > room and salience is not None:
            scores = scores if scores is not None else salience()  # one gradient pass in all
            words_b = scores[b if len(scores) > 1 else 0].topk(room).indices.tolist()
            chosen = _words(end - start, words_b, room)
        else:
            chosen = _words(end - start, words, room)
        word_players = []
        for i in chosen:
            token = tokens[i] if i < len(tokens) else f"word{i}"
            dup = sum(t == token for t in tokens) > 1
            names.append(f"{token}#{i}" if dup else token)
            word_players.append((start + i, i))
        if len(names) > MAX_PLAYERS:
            raise InputError(
                f"{len(names)} players for item {b}; at most {MAX_PLAYERS}: "
                "choose fewer words or coarser regions"
            )
        out.append(Players(tuple(names), tuple(region_players), tuple(word_players)))
    return out


def _words(length: int, words: Sequence[int] | None, room: int) -> list[int]:
    if words is None:
        if length > room:
            raise InputError(
                f"the prompt has {length} tokens but only {room} more players fit "
                f"(at most {MAX_PLAYERS}); pass words=[...] with fewer prompt-token indices"
            )
        return list(range(length))
    chosen = []
    for i in words:
        if not -length <= i < length:
            raise InputError(f"prompt-token index {i} is out of range for {length} prompt tokens")
        chosen.append(i % length)
    if len(set(chosen)) != len(chosen):
        raise InputError(f"prompt-token indices {list(words)} name a token twice")
    return sorted(chosen)


def _salience(vlm: VLM, bound: BoundTarget) -> list[torch.Tensor]:
    """|input x gradient| of every prompt token (summed over outputs), per text row."""
    g = gradients(vlm, bound, space="pixels")
    per_position = (g.text * g.text_grad).sum(-1).abs().sum(0)
    return prompt_rows(bound.inputs, per_position)


def values(
    vlm: VLM, bound: BoundTarget, items: Sequence[Players], batch_size: int = 64
) -> torch.Tensor:
    """``(batch, outputs, 2^n_max)`` target scores ``v(T)`` for every subset ``T`` of each
    item's players (subset ``t`` keeps player ``i`` where bit ``i`` of ``t`` is set). Items
    with fewer players than the most read their own first ``2^n`` entries."""
    inputs = bound.inputs
    batch, total = inputs.batch_size, 1 << max(p.n for p in items)
    per_forward = max(1, batch_size // batch)
    out = torch.zeros(batch, bound.k, total, dtype=torch.float64)
    for start in range(0, total, per_forward):
        t = torch.arange(start, min(start + per_forward, total))
        tiled = inputs.tile(len(t))
        bits = [t[:, None] >> torch.arange(p.n) & 1 for p in items]
        tiled, hooks = _masked(vlm, inputs, tiled, items, bits)
        with torch.no_grad(), patch(vlm, hooks):
            scores = bound(vlm.forward(tiled)).double().cpu()
        out[:, :, t] = scores.reshape(len(t), batch, bound.k).permute(1, 2, 0)
    return out


def _masked(
    vlm: VLM, inputs: Inputs, tiled: Inputs, items: Sequence[Players], bits: list[torch.Tensor]
) -> tuple[Inputs, dict[str, Any]]:
    """The tiled inputs with each copy's removed regions filled, and the word-zeroing hook."""
    m, batch = len(bits[0]), inputs.batch_size
    spans = vlm.flat_spans(inputs)
    keep = [torch.ones(m, *s.grid) for s in spans]
    if any(p.regions for p in items):
        for p, on in zip(items, bits):
            for i, (f, region) in enumerate(p.regions):
                keep[f] = keep[f] - (1 - on[:, i, None, None].float()) * region
        per_image = [keep[f][j] for j in range(m) for f in range(len(spans))]
        same = len({tuple(k.shape) for k in per_image}) == 1
        grids = torch.stack(per_image) if same else cast(torch.Tensor, per_image)
        pixels = vlm.mask_pixels(tiled.pixel_values, tiled, grids, fill=0)
        tiled = replace(tiled, tensors={**tiled.tensors, "pixel_values": pixels})
    if not any(p.words for p in items):
        return tiled, {}
    text = torch.ones(tiled.input_ids.shape)
    for b, (p, on) in enumerate(zip(items, bits)):
        for i, (pos, _) in enumerate(p.words):
            text[b::batch, pos] = on[:, len(p.regions) + i].float()
    return tiled, {vlm.TEXT_EMBED_SITE: lambda out: out * text.to(out)[..., None]}


@register(
    "harsanyi",
    family="attribution/interaction",
    paper="Ren et al. 2023",
    level="model/architecture",
)
class Harsanyi(Attribution):
    """Harsanyi AND-interactions (Ren et al. 2023) and the Shapley values they add up to.

    ``v(T)``: the log-odds ``s - log(1 - exp(s))`` for log-probability targets (``Token``,
    ``TokenId``, ``Predicted``, ``AnswerLogProb``, ``Generated``; ``s`` clamped to at most
    -1e-7), the raw score for the others (``Contrast``'s logit difference, ``Similarity``);
    ``extras["value"]`` says which. Maps: each player's Shapley value
    ``phi_i = sum_{S containing i} I(S) / |S|``, a region's spread evenly over its patches,
    words that are not players 0. ``extras["interactions"][item][output]``: ``players``
    (names), ``top`` (the ``top`` largest ``|I(S)|`` over non-empty ``S`` as
    ``{"players", "value"}``), ``sparsity`` (share of the non-empty ``|I|`` mass in the 20
    largest), ``delta`` (``v(N) - v(empty)`` = sum of non-empty ``I(S)``), ``v_empty``.

    Args:
        regions: ``(rows, cols)`` regions per image, or None for no image players.
        words: prompt-token indices that are players (None: all if the total fits in 12,
            else the most salient by |input x gradient| that fit).
        top: how many interactions to list.
        batch_size: rows per forward pass (masked copies of the whole batch).
    """

    def __init__(
        self,
        regions: tuple[int, int] | None = (2, 2),
        words: Sequence[int] | None = None,
        top: int = 20,
        batch_size: int = 64,
    ) -> None:
        try:
            if regions is not None:
                rows, cols = (int(x) for x in regions)
                if min(rows, cols) < 1:
                    raise ValueError
                regions = (rows, cols)
            top, batch_size = int(top), int(batch_size)
            if top < 1 or batch_size < 1:
                raise ValueError
        except (TypeError, ValueError):
            raise InputError(
                "harsanyi takes regions=(rows, cols) of positive ints (or None), "
                f"top >= 1 and batch_size >= 1, not {regions!r}, {top!r}, {batch_size!r}"
            ) from None
        self.regions = regions
        self.words = None if words is None else [int(i) for i in words]
        self.top, self.batch_size = int(top), int(batch_size)

    def attribute(self, vlm: VLM, bound: BoundTarget) -> Maps:
        inputs = bound.inputs
        items = players(inputs, self.regions, self.words, lambda: _salience(vlm, bound))
        if not any(p.n for p in items):
            raise InputError("no players: give regions or words")
        v = values(vlm, bound, items, self.batch_size)
        v = log_odds(v) if bound.log_prob else v
        image = [torch.zeros(bound.k, *s.grid) for s in vlm.flat_spans(inputs)]
        text, report = [], []
        for b, p in enumerate(items):
            inter = moebius(v[b, :, : 1 << p.n])
            phi = shapley(inter).float()
            for i, (f, region) in enumerate(p.regions):
                image[f] += phi[:, i, None, None] * region / region.sum()
            start, end = inputs.prompt_spans[b]
            words = torch.zeros(bound.k, end - start)
            for i, (_, index) in enumerate(p.words):
                words[:, index] = phi[:, len(p.regions) + i]
            text.append(words)
            outputs = len(bound.labels[b]) if b < len(bound.labels) else bound.k
            full = v[b, :, (1 << p.n) - 1] - v[b, :, 0]
            report.append([self._summary(p, inter[o], float(full[o])) for o in range(outputs)])
        kind = "log-odds" if bound.log_prob else "score"
        return Maps(image, text, {"value": kind, "interactions": report})

    def _summary(self, p: Players, inter: torch.Tensor, delta: float) -> dict[str, Any]:
        bits = _bits(p.n)
        size = inter.abs()[1:]
        order = torch.argsort(size, descending=True, stable=True) + 1
        total = float(size.sum())
        top20 = float(size.sort(descending=True).values[:SPARSITY_TOP].sum())
        return {
            "players": list(p.names),
            "top": [
                {
                    "players": [p.names[i] for i in range(p.n) if bits[s, i]],
                    "value": float(inter[s]),
                }
                for s in order[: self.top].tolist()
            ],
            "sparsity": top20 / total if total > 0 else 1.0,
            "delta": delta,
            "v_empty": float(inter[0]),
        }
