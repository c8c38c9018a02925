"""Logit lens over every layer and position, image tokens included (nostalgebraist 2020;
Neo et al. 2024, "Towards interpreting visual information processing in VLMs").

Each layer's residual stream is read out as if it were the last: ``lm_head(final_norm(h_l))``
for decoders. One forward pass captures every layer; the projections follow, a layer at a time,
keeping only the top-k tokens and the chosen token's probability and rank. A dual encoder
(CLIP) has no vocabulary: its vision layers are read out through the final norm and projection
against the embeddings of the input texts, so the "tokens" are those texts (Gandelsman et al.
2024 read CLIP's residual stream the same way). A tower pooled by an attention head instead
(SigLIP's ``vision.head``) reads each position as an image of that one token: the probe's only
key then gets all its attention, and the head's output is that token's image embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmscope.core.errors import InputError
from mmscope.core.hooks import capture
from mmscope.core.inputs import ImageSpan, Inputs
from mmscope.core.registry import register
from mmscope.core.sites import site
from mmscope.core.targets import Target
from mmscope.core.validate import positive_int
from mmscope.methods.analysis import (
    KIND,
    Analysis,
    Result,
    jsonable,
    new_figure,
    next_token_ids,
    position_labels,
    sequence_spans,
    stack,
)
from mmscope.models.base import VLM

Readout = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LensResult(Result):
    """What each layer's residual stream says at each position.

    Attributes:
        layers: the layer indices read (rows of every array).
        top_ids: ``(layers, items, positions, k)`` ids of the top-k tokens (for CLIP: texts).
        top_probs: their probabilities.
        target_ids: per item, the token followed through the layers.
        target_probs: ``(layers, items, positions)`` its probability.
        target_ranks: its rank (0 = top).
        names: id -> readable token (every id above).
        positions: per item, a label per position (``"img 2,3"`` for image tokens).
        spans: per item, its image spans.
    """

    layers: tuple[int, ...]
    top_ids: np.ndarray
    top_probs: np.ndarray
    target_ids: tuple[int, ...]
    target_probs: np.ndarray
    target_ranks: np.ndarray
    names: dict[int, str]
    positions: tuple[tuple[str, ...], ...]
    spans: tuple[tuple[ImageSpan, ...], ...]

    def first_top_layer(self, item: int = 0, position: int = -1) -> int | None:
        """The first layer from which the target token is the top token at ``position`` and
        stays so to the last layer (None if it is not top at the last layer)."""
        top = self.target_ranks[:, item, position] == 0
        if not top[-1]:
            return None
        below = np.flatnonzero(~top)
        return self.layers[int(below[-1]) + 1] if below.size else self.layers[0]

    def _span(self, item: int, image: int) -> ImageSpan:
        if not 0 <= image < len(self.spans[item]):
            raise InputError(
                f"item {item} has no image {image} in the sequence the lens read (an image "
                "read through cross-attention, as Mllama's, has no positions there)"
            )
        return self.spans[item][image]

    def image_map(self, item: int = 0, layer: int = -1, image: int = 0) -> np.ndarray:
        """``(rows, cols)``: the target token's probability at each image patch of a layer."""
        span = self._span(item, image)
        row = self.layers.index(layer) if layer >= 0 else layer
        return self.target_probs[row, item, list(span.positions)].reshape(span.grid)

    def patch_tokens(self, item: int = 0, layer: int = -1, image: int = 0) -> np.ndarray:
        """``(rows, cols)`` array of each image patch's top token at a layer."""
        span = self._span(item, image)
        row = self.layers.index(layer) if layer >= 0 else layer
        ids = self.top_ids[row, item, list(span.positions), 0]
        return np.array([self.names[int(i)] for i in ids], dtype=object).reshape(span.grid)

    def table(self, item: int = 0, position: int = -1) -> list[dict[str, Any]]:
        """Per layer at one position: the top tokens with probabilities, the target's rank."""
        return [
            {
                "layer": layer,
                "top": [
                    (self.names[int(i)], round(float(p), 4))
                    for i, p in zip(
                        self.top_ids[r, item, position], self.top_probs[r, item, position]
                    )
                ],
                "target_rank": int(self.target_ranks[r, item, position]),
                "target_prob": float(self.target_probs[r, item, position]),
            }
            for r, layer in enumerate(self.layers)
        ]

    def to_dict(self) -> dict[str, Any]:
        return jsonable(
            {
                "analysis": "logit_lens",
                "layers": list(self.layers),
                "target": [self.names[i] for i in self.target_ids],
                "target_probs": self.target_probs,
                "target_ranks": self.target_ranks,
                "first_top_layer": [self.first_top_layer(b) for b in range(len(self.target_ids))],
                "last_position": [self.table(b) for b in range(len(self.target_ids))],
                "positions": [list(p) for p in self.positions],
            }
        )

    def plot(self, ax: Any = None, item: int = 0) -> Any:
        """Target probability over layers x positions (image span shaded) and, beside it, over
        the image patches at the last layer."""
        own = ax is None
        fig, ax = new_figure(9, 3.2, ax)
        probs = self.target_probs[:, item]
        ax.imshow(probs, aspect="auto", cmap="viridis", vmin=0, vmax=1, origin="lower")
        for span in self.spans[item]:
            ax.axvspan(span.start - 0.5, span.end - 0.5, color="w", alpha=0.12)
        ax.set_yticks(range(len(self.layers)), [str(layer) for layer in self.layers], fontsize=7)
        text = [p for p, label in enumerate(self.positions[item]) if not label.startswith("img")]
        ax.set_xticks(text, [self.positions[item][p] for p in text], fontsize=6, rotation=90)
        ax.set_xlabel("position (image tokens shaded)", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_title(f"logit lens: p({self.names[self.target_ids[item]]})", fontsize=9)
        if own and self.spans[item]:
            inset = ax.inset_axes((1.02, 0.0, 0.3, 1.0))
            inset.imshow(self.image_map(item), cmap="viridis", vmin=0, vmax=1)
            inset.set_axis_off()
            inset.set_title("image patches, last layer", fontsize=7)
        return fig


def _readout(vlm: VLM, inputs: Inputs) -> tuple[Readout, list[str], list[int]]:
    """(hidden -> logits, names of the logits' columns, per item the target's column)."""
    if not vlm.contrastive:
        norm, head = vlm.resolve("lm.norm"), vlm.resolve("lm_head")
        size = vlm.vocab_size
        names = [str(t) for t in vlm.tokenizer.convert_ids_to_tokens(list(range(size)))]
        cap = vlm.final_logit_softcap
        if cap is None:
            return (lambda h: head(norm(h))), names, []
        return (lambda h: cap * torch.tanh(head(norm(h)) / cap)), names, []
    norm = vlm.resolve("vision.norm")
    proj: Callable[[torch.Tensor], torch.Tensor]
    if "vision.proj" in vlm.ROLES:
        proj = vlm.resolve("vision.proj")
    else:  # an attention-pooling head, (images, positions, d) -> (images, d): one token each
        head = vlm.resolve("vision.head")

        def proj(x: torch.Tensor) -> torch.Tensor:
            return head(x.reshape(-1, 1, x.shape[-1])).reshape(*x.shape[:-1], -1)

    out = vlm.forward(inputs)
    texts = torch.nn.functional.normalize(out.text_embeds.float(), dim=-1)
    scale = vlm.logit_scale

    def read(h: torch.Tensor) -> torch.Tensor:
        image = torch.nn.functional.normalize(proj(norm(h)).float(), dim=-1)
        return scale * image @ texts.t()

    one_text = len(inputs.prompts) == 1
    return read, list(inputs.prompts), [0 if one_text else b for b in range(inputs.batch_size)]


@register(
    "logit_lens",
    kind=KIND,
    family="inside/lens",
    paper="nostalgebraist 2020; Neo et al. 2024",
    level="model/token",
)
class LogitLens(Analysis):
    """Decode every layer's residual stream at every position.

    Args:
        k: top tokens kept per layer and position.
        layers: layer indices to read (default: all).
    """

    def __init__(self, k: int = 5, layers: Sequence[int] | None = None) -> None:
        self.k = positive_int("k", k)
        self.layers = None if layers is None else [int(layer) for layer in layers]

    @torch.no_grad()
    def __call__(self, vlm: VLM, inputs: Inputs, target: Target | None = None) -> LensResult:
        """``target``: the token to follow (``Token``, ``TokenId``); default the model's answer
        (for CLIP: each image's own text)."""
        where = stack(vlm)
        n = vlm.num_layers(where)
        layers = sorted({layer % n for layer in (self.layers or range(n))})
        read, names, target_cols = _readout(vlm, inputs)
        sites = [site(where, layer) for layer in layers]
        with capture(vlm, sites) as cap:
            vlm.forward(inputs)
        last = read(cap[site(where, n - 1)]) if not vlm.contrastive else None
        if not vlm.contrastive:
            if target is None:  # the model's own answer: the last layer's top token
                assert last is not None
                target_cols = last[:, -1].argmax(-1).tolist()
            else:
                target_cols = next_token_ids(vlm, inputs, target)
        cols = torch.tensor(target_cols).view(-1, 1, 1)
        k = min(self.k, len(names))
        tops, top_probs, probs, ranks = [], [], [], []
        for at in sites:
            logp = torch.log_softmax(read(cap[at]).float(), dim=-1)
            chosen = logp.gather(-1, cols.expand(*logp.shape[:2], 1).to(logp.device))
            values, ids = logp.topk(k, dim=-1)
            tops.append(ids.cpu().numpy())
            top_probs.append(values.exp().cpu().numpy())
            probs.append(chosen[..., 0].exp().cpu().numpy())
            ranks.append((logp > chosen).sum(-1).cpu().numpy())
        top_ids = np.stack(tops)
        used = set(np.unique(top_ids).tolist()) | set(target_cols)
        length = top_ids.shape[2]
        return LensResult(
            layers=tuple(layers),
            top_ids=top_ids,
            top_probs=np.stack(top_probs),
            target_ids=tuple(int(c) for c in target_cols),
            target_probs=np.stack(probs),
            target_ranks=np.stack(ranks),
            names={int(i): names[int(i)] for i in used},
            positions=tuple(
                position_labels(vlm, inputs, b, length) for b in range(inputs.batch_size)
            ),
            spans=sequence_spans(vlm, inputs),
        )
