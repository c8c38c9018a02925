"""Head importance (Michel et al. 2019, "Are sixteen heads really better than one?").

A head's importance is the drop of the target when the head is masked: its slice of the input
of the attention's output projection (the ``.heads`` site) is set to zero, or to its mean over
the item's positions, one head at a time. Many ablations share one forward: the inputs are
tiled and each tiled row masks its own head. The gradient variant multiplies a head mask of
ones into every ``.heads`` site and reads ``|d target / d mask|`` per item (Michel's expected
absolute gradient is its mean over items). The top heads' attention over the image grid is
kept for plotting.

Hybrid models (Qwen3.5): only softmax-attention layers have ``.attn.heads``; the other layers
(gated delta nets) are skipped, with a warning: their importance is NaN and ``skipped_layers``
says why.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from mmscope.core.errors import InputError, SiteError
from mmscope.core.hooks import capture, patch
from mmscope.core.inputs import Inputs
from mmscope.core.registry import register
from mmscope.core.sites import Site, site
from mmscope.core.state import preserved
from mmscope.core.targets import BoundTarget, Target
from mmscope.core.validate import positive_int
from mmscope.methods.analysis import KIND, Analysis, Result, bind, jsonable, new_figure, run_scores
from mmscope.models.base import VLM
from mmscope.models.capabilities import softmax_only

Head = tuple[str, int, int]
PatchFn = Callable[[torch.Tensor], torch.Tensor]
METHODS = ("ablation", "gradient")
FILLS = ("zero", "mean")


@dataclass(frozen=True, eq=False)
class HeadPattern:
    """One head's attention over each item's first image grid (``None``: no image), read from
    ``query``: the target's position in the language model; in a vision tower its class token,
    the pooling weights of a dual encoder without one (``"pooling"``: SigLIP's probe), or else
    the mean over the patches' rows (``"mean"``)."""

    stack: str
    layer: int
    head: int
    query: str
    maps: tuple[np.ndarray | None, ...]


@dataclass(frozen=True, eq=False)
class HeadResult(Result):
    """Head importance per stack.

    Attributes:
        importance: stack -> ``(items, layers, heads)``: the drop ``clean - masked`` of the
            target (ablation) or ``|d target / d head mask|`` (gradient); NaN for a layer
            without softmax attention.
        clean: ``(items,)`` the target's score on the unmasked model.
        method: ``"ablation"`` or ``"gradient"``; fill: ``"zero"`` or ``"mean"``.
        labels: per item, what the target scores.
        patterns: the top heads' attention (see ``HeadPattern``).
        notes: what was left out and why.
        skipped_layers: ``{site: why}`` of the layers without softmax attention heads.
    """

    importance: dict[str, np.ndarray]
    clean: np.ndarray
    method: str
    fill: str
    labels: tuple[str, ...]
    patterns: tuple[HeadPattern, ...] = ()
    notes: tuple[str, ...] = ()
    skipped_layers: dict[str, str] = field(default_factory=dict)

    def top_heads(self, k: int = 5) -> list[tuple[str, int, int, float]]:
        """The ``k`` heads of largest mean importance over items: (stack, layer, head, mean)."""
        rows = [
            (stack, int(layer), int(head), float(value))
            for stack, imp in self.importance.items()
            for (layer, head), value in np.ndenumerate(_mean(imp))
            if not np.isnan(value)
        ]
        return sorted(rows, key=lambda r: -r[3])[:k]

    def to_dict(self) -> dict[str, Any]:
        pats = [{**vars(p), "maps": list(p.maps)} for p in self.patterns]
        return jsonable(
            {
                "analysis": "head_importance",
                **{k: getattr(self, k) for k in ("method", "fill", "clean", "importance")},
                "labels": list(self.labels),
                "top_heads": [list(row) for row in self.top_heads()],
                "patterns": pats,
                "notes": list(self.notes),
                **({"skipped_layers": self.skipped_layers} if self.skipped_layers else {}),
            }
        )

    def plot(self, ax: Any = None, item: int = 0) -> Any:
        """Layers x heads heat map of the mean importance per stack, and below them the top
        heads' attention over ``item``'s image grid (``ax``: the first heat map only)."""
        if ax is not None:
            return self._heat(ax, next(iter(self.importance)))
        maps = [p for p in self.patterns if p.maps[item] is not None]
        cols = max(len(self.importance), len(maps), 1)
        fig, first = new_figure(2.8 * cols, 5.4 if maps else 2.8)
        fig.delaxes(first)
        fig.set_layout_engine("constrained")
        grid = fig.add_gridspec(2 if maps else 1, cols)
        for i, stack in enumerate(self.importance):
            self._heat(fig.add_subplot(grid[0, i]), stack)
        for i, p in enumerate(maps):
            sub = fig.add_subplot(grid[1, i])
            sub.imshow(p.maps[item], cmap="magma")
            sub.set_title(f"{site(p.stack, p.layer)} head {p.head}", fontsize=7)
            sub.set_axis_off()
        return fig

    def _heat(self, ax: Any, stack: str) -> Any:
        from matplotlib.ticker import MaxNLocator

        mean = _mean(self.importance[stack])
        drawn = ax.imshow(mean, aspect="auto", origin="lower")
        for axis in (ax.xaxis, ax.yaxis):
            axis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("head", fontsize=8)
        ax.set_ylabel("layer", fontsize=8)
        ax.set_title(f"{stack}: {self.method}", fontsize=8)
        ax.figure.colorbar(drawn, ax=ax)
        return ax.figure


def _mean(imp: np.ndarray) -> np.ndarray:
    """Mean over items, ignoring NaN (NaN where every item is NaN: a skipped layer)."""
    have = ~np.isnan(imp)
    total = np.where(have, imp, 0.0).sum(0)
    count = have.sum(0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _layers(vlm: VLM, stacks: Sequence[str]) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Per stack the layers with softmax attention heads, and the skipped ones with why."""
    out, skipped = {}, {}
    for s in stacks:
        out[s], why = softmax_only(vlm, s, range(vlm.num_layers(s)), "head_importance")
        skipped.update(why)
    return out, skipped


def _groups(vlm: VLM, inputs: Inputs, stack: str, value: torch.Tensor) -> torch.Tensor:
    """Group of each entry of a ``.heads`` value's leading axis: an item (LM, text tower), an
    image (vision tower), or the image of a patch row (unbatched towers: Qwen2-VL's)."""
    if not stack.startswith("vision.") or value.dim() == 3:
        groups = torch.arange(value.shape[0])
    else:
        rows = torch.tensor(vlm.pixel_rows(inputs))
        groups = torch.arange(len(rows)).repeat_interleave(rows)
    if groups.numel() != value.shape[0]:
        raise SiteError(f"{stack} gives {tuple(value.shape)}, which does not split by image")
    return groups.to(value.device)


def _group_rows(
    inputs: Inputs, stack: str, vlm: VLM | None = None, value: torch.Tensor | None = None
) -> torch.Tensor:
    """The batch row of each group: the item itself, or the item an image belongs to (of each
    tower row, where a batched tower has other rows than views: LLaVA-NeXT's base view and
    tiles make two views of 1 + tiles rows, ``pixel_rows`` per image)."""
    if not stack.startswith("vision."):
        return torch.arange(inputs.batch_size)
    per_span = torch.tensor([b for b, item in enumerate(inputs.image_spans) for _ in item])
    if vlm is None or value is None or value.dim() != 3 or len(per_span) == value.shape[0]:
        return per_span
    per_image = torch.tensor([b for b, item in enumerate(inputs.images) for _ in item])
    return per_image.repeat_interleave(torch.tensor(vlm.pixel_rows(inputs)))


def _group_means(vlm: VLM, inputs: Inputs, stack: str, value: torch.Tensor) -> torch.Tensor:
    """Per group, the mean over its real positions: ``(groups, heads * head_dim)``."""
    value = value.detach().float()
    if value.dim() == 2:
        groups = _groups(vlm, inputs, stack, value)
        total = torch.zeros(int(groups.max()) + 1, value.shape[-1] + 1, device=value.device)
        total.index_add_(0, groups, torch.cat([value, torch.ones_like(value[:, :1])], 1))
        return total[:, :-1] / total[:, -1:]
    if stack.startswith("vision."):
        return value.mean(1)
    keep = inputs.attention_mask.to(value.device)[:, : value.shape[1], None].float()
    return (value * keep).sum(1) / keep.sum(1).clamp(min=1)


def _head_fn(
    vlm: VLM, inputs: Inputs, stack: str, rows: torch.Tensor, means: torch.Tensor | None = None
) -> PatchFn:
    """Patch of one ``.heads`` site: ``rows`` ``(batch, heads)`` says per batch row how to scale
    each head (float: a head mask) or which heads to replace (bool) by zero or by the group's
    own mean (``means`` of the untiled groups, ``(groups, heads * head_dim)``)."""
    heads = rows.shape[1]

    def fn(x: torch.Tensor) -> torch.Tensor:
        groups, group_row = _groups(vlm, inputs, stack, x), _group_rows(inputs, stack, vlm, x)
        per = rows.to(x.device)[group_row.to(x.device)[groups]]  # (entries, heads)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (heads, 1)
        split = x.reshape(*x.shape[:-1], heads, -1)
        if per.dtype != torch.bool:
            return (split * per.to(x.dtype).view(shape)).reshape(x.shape)
        if means is None:
            return split.masked_fill(per.view(shape), 0).reshape(x.shape)
        value = means.to(x)[groups % len(means)].view(x.shape[0], *shape[1:-2], heads, -1)
        return torch.where(per.view(shape), value, split).reshape(x.shape)

    return fn


@register(
    "head_importance", kind=KIND, family="inside/heads", paper="Michel et al. 2019",
    level="model/layer",
)  # fmt: skip
class HeadImportance(Analysis):
    """Importance of every attention head by ablation or by the gradient of a head mask.

    Args:
        stacks: layer stacks to score (default every stack whose heads reach the target:
            ``lm.layer`` and ``vision.layer`` for decoders, ``vision.layer`` and
            ``text.layer`` for CLIP).
        method: ``"ablation"`` (drop of the target, one head at a time) or ``"gradient"``.
        fill: what an ablated head outputs: ``"zero"`` or ``"mean"`` (its mean over the
            item's positions on these inputs; ablation only).
        top: how many top heads' attention patterns to keep.
        batch_size: rows per forward of the ablation (the inputs tiled, one head per tile).
    """

    def __init__(
        self,
        stacks: Sequence[str] | None = None,
        method: str = "ablation",
        fill: str = "zero",
        top: int = 5,
        batch_size: int = 32,
    ) -> None:
        if stacks is not None and (
            isinstance(stacks, str) or not stacks or not all(isinstance(s, str) for s in stacks)
        ):
            raise InputError(f"stacks must be a list such as ['lm.layer'], not {stacks!r}")
        if method not in METHODS or fill not in FILLS:
            raise InputError(f"method is one of {METHODS} and fill one of {FILLS}")
        if method == "gradient" and fill != "zero":
            raise InputError("fill applies to the ablation method only")
        self.stacks = None if stacks is None else tuple(stacks)
        self.method, self.fill = method, fill
        self.top = positive_int("top", top)
        self.batch_size = positive_int("batch_size", batch_size)

    def __call__(self, vlm: VLM, inputs: Inputs, target: Target | None = None) -> HeadResult:
        stacks, notes = self._stacks(vlm, inputs)
        layers, skipped = _layers(vlm, stacks)
        sites = [site(s, i, "attn.heads") for s in stacks for i in layers[s]]
        with preserved(vlm.model):
            bound = bind(vlm, inputs, target)
            with capture(vlm, sites if self.fill == "mean" else []) as cap:
                clean = run_scores(vlm, bound)
            means = {x: _group_means(vlm, bound.inputs, Site.parse(x).stack, cap[x]) for x in cap}
            if self.method == "gradient":
                imp = _gradients(vlm, bound, stacks, layers)
            else:
                imp = self._ablate(vlm, bound, stacks, clean, means, layers)
            labels = tuple(lab[0] for lab in bound.labels)
            result = HeadResult(
                imp, clean.numpy(), self.method, self.fill, labels, (), notes, skipped
            )
            patterns = _patterns(vlm, bound, [r[:3] for r in result.top_heads(self.top)])
        return replace(result, patterns=patterns)

    def _stacks(self, vlm: VLM, inputs: Inputs) -> tuple[list[str], tuple[str, ...]]:
        has_image = any(inputs.image_spans)
        known = sorted(
            (s for s in vlm.LAYER_LISTS if f"{s}.attn.heads" in vlm.ROLES),
            key=lambda s: not s.startswith("lm."),
        )
        if self.stacks is None:
            kept = [s for s in known if has_image or not s.startswith("vision.")]
            return kept, () if has_image else ("no image: the vision tower was not scored",)
        for s in self.stacks:
            if s not in known:
                raise InputError(f"{vlm.name} has no heads in stack {s!r}; it has {known}")
            if s.startswith("vision.") and not has_image:
                raise InputError(f"stack {s!r} needs an image in the inputs")
        return list(self.stacks), ()

    def _ablate(
        self,
        vlm: VLM,
        bound: BoundTarget,
        stacks: list[str],
        clean: torch.Tensor,
        means: dict[str, torch.Tensor],
        layers: dict[str, list[int]],
    ) -> dict[str, np.ndarray]:
        batch = bound.inputs.batch_size
        imp = {s: np.full((batch, vlm.num_layers(s), vlm.num_heads(s)), np.nan) for s in stacks}
        jobs = [
            (s, layer, h)
            for s in stacks
            for layer, h in np.ndindex(imp[s].shape[1:])
            if layer in layers[s]
        ]
        per_forward = max(1, self.batch_size // batch)
        for first in range(0, len(jobs), per_forward):
            chunk = jobs[first : first + per_forward]
            tiled = bound.inputs.tile(len(chunk))
            tables: dict[str, torch.Tensor] = {}
            for t, (s, layer, h) in enumerate(chunk):
                table = tables.setdefault(
                    site(s, layer, "attn.heads"),
                    torch.zeros(len(chunk) * batch, imp[s].shape[2], dtype=torch.bool),
                )
                table[t * batch : (t + 1) * batch, h] = True
            fns = {
                x: _head_fn(vlm, tiled, Site.parse(x).stack, table, means.get(x))
                for x, table in tables.items()
            }
            with patch(vlm, fns):
                scores = run_scores(vlm, bound, tiled).view(len(chunk), batch)
            for t, (s, layer, h) in enumerate(chunk):
                imp[s][:, layer, h] = (clean - scores[t]).numpy()
        return imp


def _gradients(
    vlm: VLM, bound: BoundTarget, stacks: list[str], layers: dict[str, list[int]]
) -> dict[str, np.ndarray]:
    """``|d target / d mask|`` per item, layer and head (a mask of ones scales each head;
    NaN at the layers without softmax attention)."""
    batch = bound.inputs.batch_size
    masks = {
        site(s, i, "attn.heads"): torch.ones(batch, vlm.num_heads(s), requires_grad=True)
        for s in stacks
        for i in layers[s]
    }
    fns = {x: _head_fn(vlm, bound.inputs, Site.parse(x).stack, m) for x, m in masks.items()}
    with torch.enable_grad(), patch(vlm, fns):
        out = bound(vlm.forward(bound.inputs))[:, 0].float()
        grads = torch.autograd.grad(out.sum(), list(masks.values()), allow_unused=True)
    got = {
        x: torch.zeros_like(m) if g is None else g.abs() for (x, m), g in zip(masks.items(), grads)
    }
    nan = {s: torch.full((batch, vlm.num_heads(s)), float("nan")) for s in stacks}
    per_layer = {
        s: [got.get(site(s, i, "attn.heads"), nan[s]) for i in range(vlm.num_layers(s))]
        for s in stacks
    }
    return {s: torch.stack(g, 1).detach().cpu().numpy() for s, g in per_layer.items()}


def _patterns(vlm: VLM, bound: BoundTarget, heads: list[Head]) -> tuple[HeadPattern, ...]:
    """The attention rows of ``heads`` over each item's first image grid (heads of stacks
    without probabilities, Qwen2-VL's vision tower, and of the text tower are left out)."""
    inputs = bound.inputs
    kept = [h for h in heads if f"{h[0]}.attn" in vlm.ATTENTION_ROLES and h[0] != "text.layer"]
    if not kept or not any(inputs.image_spans):
        return ()
    wanted = sorted({site(s, i, "attn.probs") for s, i, _ in kept})
    with torch.no_grad(), capture(vlm, wanted) as cap:
        vlm.forward(inputs)
    first_image: dict[int, int] = {}
    for i, b in enumerate(_group_rows(inputs, "vision.layer").tolist()):
        first_image.setdefault(b, i)
    first_row: dict[int, int] = {}  # the tower row of each item's first image (its first view)
    tower = vlm.pixel_rows(inputs) if "pixel_values" in inputs.tensors else []
    before = np.cumsum([0, *tower]).tolist()
    for i, b in enumerate(b for b, item in enumerate(inputs.images) for _ in item):
        first_row.setdefault(b, int(before[i]) if tower else i)
    q = bound.positions[0][-1] if bound.positions else inputs.input_ids.shape[1] - 1
    # a vision tower's query: its class token, else the pooling weights of a dual encoder's
    # image embedding (SigLIP's probe), else the mean over the patches' own rows
    pooled = None
    if not vlm.CLASS_TOKEN and vlm.contrastive and any(s != "lm.layer" for s, _, _ in kept):
        pooled = vlm.vision_pooling(inputs)
    vision_query = "class token" if vlm.CLASS_TOKEN else "pooling" if pooled is not None else "mean"
    out = []
    for s, layer, h in kept:
        probs = cap[site(s, layer, "attn.probs")].float().cpu()
        maps: list[np.ndarray | None] = []
        for b, spans in enumerate(inputs.image_spans):
            rows, cols = spans[0].grid if spans else (0, 0)
            if not spans:
                row = torch.zeros(1)
            elif s == "lm.layer":  # no map where the image is not in the LM's sequence
                lm = spans[0].sequence == "lm"
                row = probs[b, h, q, list(spans[0].positions)] if lm else torch.zeros(0)
            elif vlm.CLASS_TOKEN:  # the class token's row, laid on the grid by the adapter
                row = vlm.vision_grid(probs[:, h, :1].transpose(1, 2), inputs)[first_image[b]]
            elif pooled is not None:
                row = (pooled[first_image[b]] @ probs[first_image[b], h])[-rows * cols :]
            else:
                row = probs[first_row[b], h, :, -rows * cols :].mean(0)
            maps.append(row.reshape(rows, cols).numpy() if row.numel() == rows * cols else None)
        query = f"position {q}" if s == "lm.layer" else vision_query
        out.append(HeadPattern(s, layer, h, query, tuple(maps)))
    return tuple(out)
