"""Attention knockout (Neo et al. 2024, "Towards interpreting visual information processing in
VLMs"; Zhang et al. 2024, "Cross-modal information flow in multimodal LLMs").

Attention from chosen key positions to chosen query positions is blocked in a window of
consecutive layers (the pair is masked before the softmax, the tokens stay), and the change of
the answer's probability is measured. The window slides over the depth: one value per flow and
window start. Flows (key set -> query set):

- ``object``: the evidence object's patches (grown by ``buffer`` cells) -> the last token
  (needs a pixel mask per item, laid over the item's first image);
- ``other_image``: the image patches outside that set -> the last token;
- ``image``: every image patch -> the last token;
- ``text``: the prompt's words -> the last token;
- ``image->text``: every image patch -> the prompt's words;
- ``all``: every other position -> the last token (it then reads only itself).

"The last token" is every position the target reads (the last position for a next token; the
answer's positions when teacher-forced). For CLIP the knockout runs in the vision tower, the
query is the class token, and the text flows do not exist (NaN); a dual encoder without a class
token (SigLIP) has no such query and is refused.

Hybrid models (Qwen3.5) can only block attention in their softmax-attention layers
(``vlm.softmax_layers``): the windows slide over those (a window is ``window`` consecutive
softmax layers; the linear-attention layers between and around them run unmasked, so a flow
can still pass through them), with a warning, and ``skipped_layers`` names the others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.hooks import mask_attention
from mmscope.core.inputs import Inputs
from mmscope.core.registry import register
from mmscope.core.sites import site
from mmscope.core.state import preserved
from mmscope.core.targets import BoundTarget, Target
from mmscope.core.validate import integer, positive_int
from mmscope.methods.analysis import (
    KIND,
    Analysis,
    Result,
    bind,
    jsonable,
    new_figure,
    run_scores,
    stack,
)
from mmscope.methods.token.sets import block_matrix, object_cells, positions
from mmscope.models.base import VLM
from mmscope.models.capabilities import softmax_only

FLOWS = ("object", "other_image", "image", "text", "image->text", "all")
Pairs = tuple[list[int], list[int]]  # (queries, keys)


@dataclass(frozen=True, eq=False)
class KnockoutResult(Result):
    """The target's change when attention is blocked, per item, flow and window.

    Attributes:
        flows: the flows blocked (second axis of the arrays).
        starts: the first layer of each window (third axis); each window is ``window`` layers.
        window: layers per window (softmax-attention layers); stack: the layer stack
            (``lm.layer``, CLIP's ``vision.layer``).
        clean: ``(items,)`` the target's probability without knockout (for targets that are no
            log-probabilities, such as CLIP's similarity, the score itself).
        knocked: ``(items, flows, starts)`` the same with the flow blocked (NaN: no such flow).
        change: ``(items, flows, starts)`` relative change ``(knocked - clean) / |clean|``.
        sizes: ``(items, flows)`` how many keys each flow blocks (-1: no such flow).
        probability: whether ``clean`` and ``knocked`` are probabilities.
        labels: per item, what the target scores.
        skipped_layers: ``{site: why}`` of the layers without softmax attention, which no
            window masks (hybrid models; empty otherwise).
    """

    flows: tuple[str, ...]
    starts: tuple[int, ...]
    window: int
    stack: str
    clean: np.ndarray
    knocked: np.ndarray
    change: np.ndarray
    sizes: np.ndarray
    probability: bool
    labels: tuple[str, ...]
    skipped_layers: dict[str, str] = field(default_factory=dict)

    def mean_change(self) -> np.ndarray:
        """``(flows, starts)``: the relative change averaged over the items that have the flow."""
        out = np.full(self.change.shape[1:], np.nan)
        for f in range(len(self.flows)):
            have = ~np.isnan(self.change[:, f, 0])
            if have.any():
                out[f] = self.change[have, f].mean(0)
        return out

    def to_dict(self) -> dict[str, Any]:
        keys = ("flows", "starts", "window", "stack", "clean", "sizes", "probability")
        missing = {
            "knocked": self.knocked,
            "change": self.change,
            "mean_change": self.mean_change(),
        }
        return jsonable(
            {
                "analysis": "attention_knockout",
                **{k: getattr(self, k) for k in keys},
                **missing,  # NaN: no such flow
                "labels": list(self.labels),
                **({"skipped_layers": self.skipped_layers} if self.skipped_layers else {}),
            }
        )

    def plot(self, ax: Any = None) -> Any:
        """Mean relative change vs the window's first layer, one line per flow."""
        fig, ax = new_figure(5, 3.2, ax)
        mean = self.mean_change()
        for f, flow in enumerate(self.flows):
            if not np.isnan(mean[f]).all():
                ax.plot(self.starts, 100 * mean[f], marker="o", label=flow)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xlabel(f"first layer of the window ({self.window} layers)", fontsize=8)
        what = "probability" if self.probability else "score"
        ax.set_ylabel(f"change of the target's {what} (%)", fontsize=8)
        ax.legend(fontsize=7)
        return fig


def _pairs(
    vlm: VLM, bound: BoundTarget, item: int, flow: str, mask: Any, buffer: int
) -> Pairs | None:
    """(queries, keys) of one flow for one item; ``None`` where the flow does not exist."""
    inputs = bound.inputs
    spans = inputs.image_spans[item]
    image = [p for span in spans for p in span.positions]
    if vlm.contrastive:
        last, words, every = [0], None, list(range(_length(vlm, inputs)))
    else:
        last = list(bound.positions[0]) if bound.positions else [inputs.input_ids.shape[1] - 1]
        words = list(range(*inputs.prompt_spans[item]))
        every = torch.nonzero(inputs.attention_mask[item]).view(-1).tolist()
    needs_image = flow in ("object", "other_image", "image", "image->text")
    if (needs_image and not image) or (flow in ("text", "image->text") and words is None):
        return None
    if flow in ("object", "other_image"):
        if mask is None:
            return None
        obj = set(positions(spans[0], object_cells(np.asarray(mask), spans[0], buffer)))
        return last, sorted(obj) if flow == "object" else [p for p in image if p not in obj]
    keys = {"image": image, "text": words, "image->text": image, "all": every}
    return (words if flow == "image->text" else last), keys[flow]  # type: ignore[return-value]


@register(
    "attention_knockout", kind=KIND, family="inside/knockout", level="model/token",
    paper="Neo et al. 2024; Zhang et al. 2024", needs=("image_positions",),
)  # fmt: skip
class AttentionKnockout(Analysis):
    """Block attention from key sets to query sets in a sliding window of layers.

    Args:
        window: layers per window (default a third of the depth, at least 1).
        flows: which flows to block (see the module docstring).
        buffer: cells the object's set grows by in every direction.
        batch_size: rows per forward (the inputs tiled, one flow and window per tile).
    """

    def __init__(
        self,
        window: int | None = None,
        flows: Sequence[str] = ("object", "other_image", "image", "text"),
        buffer: int = 0,
        batch_size: int = 32,
    ) -> None:
        self.window = None if window is None else positive_int("window", window)
        if isinstance(flows, str) or not flows or any(f not in FLOWS for f in flows):
            raise InputError(f"flows must be a list drawn from {FLOWS}, not {flows!r}")
        if len(set(flows)) != len(flows):
            raise InputError(f"flows {flows!r} name a flow twice")
        self.flows = tuple(flows)
        self.buffer = integer("buffer", buffer, minimum=0)
        self.batch_size = positive_int("batch_size", batch_size)

    def __call__(
        self,
        vlm: VLM,
        inputs: Inputs,
        target: Target | None = None,
        masks: Sequence[Any] | None = None,
    ) -> KnockoutResult:
        """Knock out each flow in each window; ``masks``: one pixel evidence mask (or
        ``None``) per item, needed by the ``object`` and ``other_image`` flows."""
        if masks is not None and len(masks) != inputs.batch_size:
            raise InputError(f"{len(masks)} masks for a batch of {inputs.batch_size}")
        if vlm.contrastive and not vlm.CLASS_TOKEN:
            raise NotApplicableError(
                "attention knockout blocks flows into the position an output is read at; "
                f"{vlm.name}'s vision tower has none (no class token: a head after the tower "
                "pools every patch)"
            )
        where = stack(vlm)
        layers, skipped = softmax_only(
            vlm, where, range(vlm.num_layers(where)), "attention_knockout"
        )
        depth = len(layers)
        window = self.window or max(1, round(depth / 3))
        if window > depth:
            raise InputError(f"a window of {window} layers is deeper than {where} ({depth})")
        runs = {layers[j]: layers[j : j + window] for j in range(depth - window + 1)}
        starts = tuple(runs)
        with preserved(vlm.model):
            bound = bind(vlm, inputs, target)
            batch = bound.inputs.batch_size
            pairs = [
                [
                    _pairs(vlm, bound, b, f, None if masks is None else masks[b], self.buffer)
                    for b in range(batch)
                ]
                for f in self.flows
            ]
            combos = [(f, s) for f in range(len(self.flows)) for s in starts if any(pairs[f])]
            scores = self._run(vlm, bound, where, runs, pairs, combos)
        result = _result(self.flows, starts, window, where, bound, pairs, combos, scores)
        return replace(result, skipped_layers=skipped) if skipped else result

    def _run(
        self,
        vlm: VLM,
        bound: BoundTarget,
        where: str,
        runs: dict[int, list[int]],
        pairs: list[list[Pairs | None]],
        combos: list[tuple[int, int]],
    ) -> torch.Tensor:
        """Scores ``(1 + combos, batch)``: the clean run (eager attention like the others),
        then one row per (flow, window start); ``runs[start]``: the window's layers."""
        batch = bound.inputs.batch_size
        length = _length(vlm, bound.inputs)
        blocks = [
            torch.stack([block_matrix(length, *p) if p else _none(length) for p in per_item])
            for per_item in pairs
        ]
        todo: list[tuple[int, int] | None] = [None, *combos]
        per_forward = max(1, self.batch_size // batch)
        out = []
        for first in range(0, len(todo), per_forward):
            chunk = todo[first : first + per_forward]
            tiles: dict[str, torch.Tensor] = {}
            for t, combo in enumerate(chunk):
                if combo is None:
                    continue
                f, start = combo
                for layer in runs[start]:
                    at = site(where, layer, "attn")
                    rows = tiles.setdefault(at, _none(length).repeat(len(chunk) * batch, 1, 1))
                    rows[t * batch : (t + 1) * batch] = blocks[f]
            with mask_attention(vlm, tiles):
                tiled = bound.inputs.tile(len(chunk))
                out.append(run_scores(vlm, bound, tiled).view(len(chunk), batch))
        return torch.cat(out)


def _size(pair: Pairs | None) -> int:
    """How many keys a flow blocks (a query keeps its own position); -1: no such flow."""
    return -1 if pair is None else len(set(pair[1]) - set(pair[0][-1:]))


def _none(length: int) -> torch.Tensor:
    return torch.zeros(length, length, dtype=torch.bool)


def _length(vlm: VLM, inputs: Inputs) -> int:
    """Sequence length of the stack the knockout runs in."""
    if vlm.contrastive:
        return max(span.end for item in inputs.image_spans for span in item)
    return int(inputs.input_ids.shape[1])


def _result(
    flows: tuple[str, ...],
    starts: tuple[int, ...],
    window: int,
    where: str,
    bound: BoundTarget,
    pairs: list[list[Pairs | None]],
    combos: list[tuple[int, int]],
    scores: torch.Tensor,
) -> KnockoutResult:
    batch = bound.inputs.batch_size
    values = scores.double().exp() if bound.log_prob else scores.double()
    clean = values[0].numpy()
    knocked = np.full((batch, len(flows), len(starts)), np.nan)
    for (f, start), row in zip(combos, values[1:]):
        knocked[:, f, starts.index(start)] = row.numpy()
    sizes = np.array([[_size(p) for p in per_item] for per_item in pairs]).T.reshape(batch, -1)
    knocked[np.broadcast_to((sizes < 0)[:, :, None], knocked.shape)] = np.nan
    change = (knocked - clean[:, None, None]) / np.abs(clean)[:, None, None]
    labels = tuple(lab[0] for lab in bound.labels)
    return KnockoutResult(
        flows, starts, window, where, clean, knocked, change, sizes, bound.log_prob, labels
    )
