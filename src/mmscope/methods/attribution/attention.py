"""Attention attributions: raw attention, attention rollout and Chefer et al.'s relevance.

Each reads attention probabilities (``<stack>[i].attn.probs``; eager attention for the forward)
and forms, per explained output, a *query row*: how much the output's position draws on every
position of the sequence. The rows are split into one grid per image and one score per prompt
token. Decoders (LLaVA, Qwen2-VL) read the language model's layers at ``bound.positions[k]``
(averaged over them). CLIP reads the vision tower at the class token (row 0) over its patches,
and the text tower at the end-of-text row (the last non-pad position) over the prompt tokens;
one text shared by several images is repeated so that every image has its own copy. A tower
without a class token (SigLIP) takes as its query row the weights its attention-pooling probe
gives the last layer's patches (``vlm.vision_pooling``), and its text row where it pools
(``vlm.text_pooling``: SigLIP's last position).

``extras`` per item and output: ``image_mass`` and ``prompt_mass`` (the row's sum over the
image tokens and over the prompt tokens) and ``total`` (its sum over the whole sequence; CLIP:
the vision tower's). Outputs past an item's own count (``Generated`` answers of different
lengths in one batch) are zero. Padded keys get no attention, hence no relevance.

Hybrid models (Qwen3.5: gated delta-net layers between the softmax ones) give probabilities at
their softmax-attention layers only (``vlm.softmax_layers``): the methods run over those, with a
warning, and ``extras["skipped_layers"]`` maps each skipped layer's site to why (the key is left
out where nothing is skipped); a ``layer`` that has no softmax attention raises
``NotApplicableError``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from mmscope.core.errors import InputError, SiteError
from mmscope.core.hooks import capture, patch
from mmscope.core.inputs import Inputs
from mmscope.core.registry import register
from mmscope.core.sites import site, sites
from mmscope.core.targets import BoundTarget
from mmscope.core.validate import integer, positive_int
from mmscope.methods.attribution.base import Attribution, Maps, prompt_rows
from mmscope.methods.attribution.gradients import batched_grads
from mmscope.models.capabilities import require_softmax, softmax_only

if TYPE_CHECKING:
    from mmscope.models.base import VLM

LEVEL = "model/architecture"
FAMILY = "attribution/attention"
FUSIONS = ("mean", "max", "min")


@dataclass(frozen=True)
class Side:
    """One attention stack and its query rows: ``query`` ``(k, batch, T)``, each row the mean
    of the one-hots of the output's query positions (zero for an item's missing outputs), or
    the weights an attention-pooled embedding gives the positions (SigLIP's probe). ``pooled``:
    the query is spread over the explained tokens themselves, so relevance keeps the identity
    (the tokens the probe reads are relevant through their residual stream)."""

    stack: str
    query: torch.Tensor
    pooled: bool = False


def _check_head(head: int | str) -> int | str:
    if isinstance(head, str) and head not in FUSIONS:
        raise InputError(f"head must be an integer or one of {', '.join(FUSIONS)}, not {head!r}")
    return head if isinstance(head, str) else integer("head", head)


def _one_hot(positions: list[list[tuple[int, ...]]], length: int) -> torch.Tensor:
    """``positions[k][b]`` -> ``(k, batch, length)`` rows averaging those positions."""
    out = torch.zeros(len(positions), len(positions[0]), length)
    for k, per_item in enumerate(positions):
        for b, pos in enumerate(per_item):
            for p in pos:
                if not 0 <= p < length:
                    raise InputError(f"query position {p} is outside a sequence of {length}")
                out[k, b, p] += 1.0 / len(pos)
    return out


def plan(vlm: VLM, bound: BoundTarget) -> tuple[Inputs, list[Side]]:
    """The inputs to run and the stacks to read: ``[lm]`` for decoders, ``[vision, text]``
    for CLIP (image maps come from the first side, prompt scores from the last)."""
    inputs, k = bound.inputs, bound.k
    valid = [[j < len(labels) for labels in bound.labels] for j in range(k)]
    if vlm.contrastive:
        # where each tower's embedding is read: CLIP's class token and end-of-text token;
        # SigLIP's attention probe over the patches and its last text position
        vision = vlm.vision_pooling(inputs)
        text: list[list[tuple[int, ...]]] = [[(t,) for t in vlm.text_pooling(inputs)]] * k
        sides = [
            Side("vision.layer", vision.expand(k, *vision.shape).clone(), not vlm.CLASS_TOKEN),
            Side("text.layer", _one_hot(text, inputs.input_ids.shape[1])),
        ]
    else:
        if len(bound.positions) != k or not all(bound.positions):
            raise InputError("this target names no query positions for attention methods")
        rows = [[tuple(pos)] * inputs.batch_size for pos in bound.positions]
        sides = [Side("lm.layer", _one_hot(rows, inputs.input_ids.shape[1]))]
    keep = torch.tensor(valid, dtype=torch.float32).unsqueeze(-1)
    sides = [replace(s, query=s.query * keep) for s in sides]
    for side in sides:
        if f"{side.stack}.attn" not in vlm.ATTENTION_ROLES or f"{side.stack}.attn" not in vlm.ROLES:
            raise InputError(f"{vlm.name} exposes no attention probabilities in {side.stack}")
    return inputs, sides


def _wanted(vlm: VLM, stack: str, layer: int | str, start: int = 0) -> list[int]:
    """The layers a setting names: ``"all"`` from ``start`` on, ``"mean"`` all, or one."""
    n = vlm.num_layers(stack)
    if layer == "all":
        if not 0 <= start < n:
            raise InputError(f"start_layer {start} is out of range for {stack} with {n} layers")
        return list(range(start, n))
    if layer == "mean":
        return list(range(n))
    index = integer("layer", layer)
    if not -n <= index < n:
        raise InputError(f"layer {index} is out of range for {stack} with {n} layers")
    return [index % n]


def _layers(vlm: VLM, stack: str, layer: int | str, start: int, who: str) -> list[int]:
    """The softmax-attention layers of ``_wanted`` (warning when some are skipped); one named
    layer without softmax attention raises ``NotApplicableError``."""
    if not isinstance(layer, str):
        require_softmax(vlm, stack, integer("layer", layer), who)
    return softmax_only(vlm, stack, _wanted(vlm, stack, layer, start), who)[0]


def _skipped(vlm: VLM, bound: BoundTarget, layer: int | str, start: int = 0) -> dict[str, str]:
    """``{site: why}`` of the layers ``_layers`` skips on every stack the method reads."""
    out: dict[str, str] = {}
    if not any(vlm.non_softmax_layers(stack) for stack in vlm.LAYER_LISTS):
        return out
    for side in plan(vlm, bound)[1]:
        other = vlm.non_softmax_layers(side.stack)
        wanted = _wanted(vlm, side.stack, layer, start) if other else []
        out.update({site(side.stack, i): other[i] for i in wanted if i in other})
    return out


def _sites(stack: str, layers: list[int]) -> list[str]:
    return sites(stack, layers, "attn.probs")


def _heads_ok(vlm: VLM, stack: str, head: int | str) -> None:
    """Raise before any forward when an integer head is out of range."""
    if isinstance(head, str):
        return
    try:
        n = vlm.num_heads(stack)
    except SiteError:  # the adapter cannot tell: nothing to check before the forward
        return
    if not -n <= head < n:
        raise InputError(f"head {head} is out of range for {stack} with {n} heads")


def fuse(probs: torch.Tensor, head: int | str) -> torch.Tensor:
    """``(batch, heads, T, T)`` -> ``(batch, T, T)``: one head, or the heads' mean/max/min."""
    probs = probs.float()
    if head == "mean":
        return probs.mean(1)
    if head == "max":
        return probs.amax(1)
    if head == "min":
        return probs.amin(1)
    n = probs.shape[1]
    if not isinstance(head, int) or not -n <= head < n:
        raise InputError(f"head {head!r} is out of range for {n} heads")
    return probs[:, head]


def _probs(vlm: VLM, inputs: Inputs, sites: list[str], head: int | str) -> dict[str, torch.Tensor]:
    """Each site's probabilities fused over heads (``fuse``) as the forward reaches it: one
    ``(batch, T, T)`` kept per layer, never every layer's ``(batch, heads, T, T)`` at once."""
    kept: dict[str, torch.Tensor] = {}

    def keep(site: str) -> Callable[[torch.Tensor], torch.Tensor]:
        def fn(probs: torch.Tensor) -> torch.Tensor:
            kept[site] = fuse(probs, head)
            return probs

        return fn

    with torch.no_grad(), patch(vlm, {site: keep(site) for site in sites}):
        vlm.forward(inputs)
    return kept


def split(vlm: VLM, bound: BoundTarget, text_inputs: Inputs, rows: list[torch.Tensor]) -> Maps:
    """Query rows (image side first, text side last) -> per-image grids and prompt scores."""
    image_rows, text_rows = rows[0], rows[-1]
    k = image_rows.shape[0]
    image, image_mass = [], []
    for b, item in enumerate(bound.inputs.image_spans):
        grids = [image_rows[:, b, list(s.positions)].reshape(k, *s.grid) for s in item]
        image.extend(grids)
        image_mass.append(sum((g.sum((-2, -1)) for g in grids), image_rows.new_zeros(k)).tolist())
    text = prompt_rows(text_inputs, text_rows)
    return Maps(
        image,
        text,
        {
            "image_mass": image_mass,
            "prompt_mass": [t.sum(-1).tolist() for t in text],
            "total": image_rows.sum(-1).T.tolist(),
        },
    )


class QueryRows(Attribution):
    """Base of the attention methods: ``rows`` gives the query rows, ``attribute`` splits them."""

    def rows(self, vlm: VLM, bound: BoundTarget) -> tuple[Inputs, list[torch.Tensor]]:
        """The inputs run (CLIP: texts paired) and each side's rows ``(k, batch, T)``."""
        raise NotImplementedError

    def skipped(self, vlm: VLM, bound: BoundTarget) -> dict[str, str]:
        """The layers the settings cover that have no softmax attention: ``{site: why}``."""
        return {}

    def attribute(self, vlm: VLM, bound: BoundTarget) -> Maps:
        inputs, rows = self.rows(vlm, bound)
        maps = split(vlm, bound, inputs, rows)
        skipped = self.skipped(vlm, bound)
        if skipped:
            maps.extras["skipped_layers"] = skipped
        return maps


@register(
    "raw_attention",
    family=FAMILY,
    paper="Clark et al. 2019",
    level=LEVEL,
    needs=("image_positions",),
)
class RawAttention(QueryRows):
    """The attention probabilities from the output's query row(s) to every image patch token
    and prompt token, at one ``layer`` (or the ``"mean"`` over layers), for one ``head`` (or the
    heads' ``"mean"``/``"max"``/``"min"``) (as read in Clark et al. 2019, "What does BERT look
    at?"). No gradient; the same for every target with the same query positions. On a hybrid
    model ``"mean"`` is the mean over the softmax-attention layers.
    """

    def __init__(self, layer: int | str = -1, head: int | str = "mean") -> None:
        if layer != "mean":
            integer("layer", layer)
        self.layer, self.head = layer, _check_head(head)

    def rows(self, vlm: VLM, bound: BoundTarget) -> tuple[Inputs, list[torch.Tensor]]:
        inputs, sides = plan(vlm, bound)
        layers = {s.stack: _layers(vlm, s.stack, self.layer, 0, "raw_attention") for s in sides}
        for side in sides:
            _heads_ok(vlm, side.stack, self.head)
        sites_read = [x for s in sides for x in _sites(s.stack, layers[s.stack])]
        probs = _probs(vlm, inputs, sites_read, self.head)
        rows = []
        for side in sides:
            sites = _sites(side.stack, layers[side.stack])
            mean = sum((probs.pop(x) for x in sites), torch.zeros(())) / len(sites)
            rows.append(torch.einsum("kbt,bts->kbs", side.query.to(mean), mean))
        return inputs, rows

    def skipped(self, vlm: VLM, bound: BoundTarget) -> dict[str, str]:
        return _skipped(vlm, bound, self.layer)


@register(
    "attention_rollout",
    family=FAMILY,
    paper="Abnar & Zuidema 2020",
    level=LEVEL,
    needs=("image_positions",),
)
class AttentionRollout(QueryRows):
    """Attention rollout (Abnar & Zuidema 2020, "Quantifying attention flow in transformers").

    R = M_L ... M_1 with M_l = (1 - residual) A_l + residual I, rows renormalised, A_l the
    heads' ``head`` fusion (the paper: mean; ``max``/``min`` as in jacobgil/vit-explain), layers
    from ``start_layer`` on. The query rows are computed as q M_L ... M_1 from the last layer
    down (the same numbers as R's rows, without the T x T product); each sums to 1.

    Hybrid models: a layer without softmax attention (Qwen3.5's gated delta net) has no A_l
    and is skipped, M_l = I: the rollout follows the residual path alone through it, so the
    token mixing that the linear layer does is not traced (the map is the flow through the
    softmax-attention layers only). ``extras["skipped_layers"]`` names those layers.
    """

    def __init__(
        self, head: int | str = "mean", residual: float = 0.5, start_layer: int = 0
    ) -> None:
        if not isinstance(residual, (int, float)) or not 0.0 <= float(residual) < 1.0:
            raise InputError(f"residual must be in [0, 1), not {residual!r}")
        if integer("start_layer", start_layer) < 0:
            raise InputError(f"start_layer must be >= 0, not {start_layer}")
        self.head, self.residual, self.start_layer = _check_head(head), float(residual), start_layer

    def rows(self, vlm: VLM, bound: BoundTarget) -> tuple[Inputs, list[torch.Tensor]]:
        inputs, sides = plan(vlm, bound)
        layers = {
            s.stack: _layers(vlm, s.stack, "all", self.start_layer, "attention_rollout")
            for s in sides
        }
        for side in sides:
            _heads_ok(vlm, side.stack, self.head)
        sites_read = [x for s in sides for x in _sites(s.stack, layers[s.stack])]
        probs = _probs(vlm, inputs, sites_read, self.head)
        rows = []
        for side in sides:
            r = side.query.to(vlm.device)
            eye = torch.eye(r.shape[-1], device=r.device)
            for at in reversed(_sites(side.stack, layers[side.stack])):
                m = (1 - self.residual) * probs.pop(at) + self.residual * eye
                r = torch.einsum("kbt,bts->kbs", r, m / m.sum(-1, keepdim=True))
            rows.append(r)
        return inputs, rows

    def skipped(self, vlm: VLM, bound: BoundTarget) -> dict[str, str]:
        return _skipped(vlm, bound, "all", self.start_layer)


def _leaf(out: torch.Tensor) -> torch.Tensor:
    """Make the embeddings require grad (so every attention map does, frozen weights or not)."""
    return out if out.requires_grad else out.detach().requires_grad_(True)


@register(
    "chefer_relevance",
    family=FAMILY,
    paper="Chefer et al. 2021",
    level=LEVEL,
    needs=("image_positions",),
)
class CheferRelevance(QueryRows):
    """Generic attention-model relevance (Chefer et al. 2021, "Generic attention-model
    explainability for interpreting bi-modal and encoder-decoder transformers"), self-attention
    rule over one sequence holding the image and text spans.

    R = I; for each layer l >= ``start_layer`` in order, Abar_l = mean_heads((dA_l * A_l)^+)
    with dA_l = d target / d A_l, and R += Abar_l R. Read: the query rows of R - I (removing the
    identity only changes a query position's own entry; query positions are never image or
    prompt tokens for the shipped targets). Every output k has its own dA from one forward and
    batched backward per ``outputs_per_pass`` outputs. Computed as r = q, r += r Abar_l from the
    last layer down (equal to q R, as R = (I + Abar_L) ... (I + Abar_1)), freeing each layer's
    dA once used: only the (k, batch, T) rows are kept, never a T x T matrix per layer; the
    attention maps themselves live once, in the forward's graph.

    Hybrid models: a layer without softmax attention (Qwen3.5's gated delta net) has no A_l
    and is skipped, R unchanged through it (the residual path only): its own token mixing is
    not propagated, while dA_l of the softmax layers, being true gradients, still carry the
    effect of every later layer, linear ones included. ``extras["skipped_layers"]`` names them.
    """

    def __init__(self, start_layer: int = 0, outputs_per_pass: int = 8) -> None:
        if integer("start_layer", start_layer) < 0:
            raise InputError(f"start_layer must be >= 0, not {start_layer}")
        self.start_layer = start_layer
        self.outputs_per_pass = positive_int("outputs_per_pass", outputs_per_pass)

    def rows(self, vlm: VLM, bound: BoundTarget) -> tuple[Inputs, list[torch.Tensor]]:
        """The relevance rows; the attention gradients of ``outputs_per_pass`` outputs at a
        time (one batched backward each), so their memory does not grow with the outputs."""
        inputs, sides = plan(vlm, bound)
        per_side = [
            _sites(s.stack, _layers(vlm, s.stack, "all", self.start_layer, "chefer_relevance"))
            for s in sides
        ]
        sites = [x for xs in per_side for x in xs]
        embeds = [vlm.TEXT_EMBED_SITE] + ([vlm.IMAGE_TOKENS_SITE] if vlm.contrastive else [])
        leaves = patch(vlm, {e: _leaf for e in embeds})
        chunks: list[list[torch.Tensor]] = []
        with torch.enable_grad(), leaves, capture(vlm, sites, detach=False) as cap:
            scores = bound(vlm.forward(inputs))
            maps = [cap[x] for x in sites]
            for start in range(0, scores.shape[1], self.outputs_per_pass):
                part = slice(start, start + self.outputs_per_pass)
                grads: list[torch.Tensor | None] = list(batched_grads(scores[:, part], maps))
                chunks.append(_fold(vlm, sides, per_side, maps, grads, part))
        return inputs, [torch.cat(side_rows) for side_rows in zip(*chunks)]

    def skipped(self, vlm: VLM, bound: BoundTarget) -> dict[str, str]:
        return _skipped(vlm, bound, "all", self.start_layer)


def _fold(
    vlm: VLM,
    sides: list[Side],
    per_side: list[list[str]],
    maps: list[torch.Tensor],
    grads: list[torch.Tensor | None],
    part: slice,
) -> list[torch.Tensor]:
    """r = q, r += r Abar_l from the last layer down, per side, for the outputs in ``part``;
    each layer's gradient is freed once folded in."""
    rows, offset = [], 0
    for side, xs in zip(sides, per_side):
        q = r = side.query[part].to(vlm.device)
        for i in reversed(range(offset, offset + len(xs))):
            g, grads[i] = grads[i], None
            if g is None:
                continue
            abar = (g.float() * maps[i].detach().float()).clamp(min=0).mean(2)  # (k, b, T, T)
            r = r + torch.einsum("kbt,kbts->kbs", r, abar)
        rows.append(r if side.pooled else r - q)
        offset += len(xs)
    return rows
