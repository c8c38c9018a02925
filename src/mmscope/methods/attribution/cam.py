"""Class activation maps on a vision-tower layer: Grad-CAM, HiResCAM, Grad-CAM++, Score-CAM and
gScore-CAM.

``CAM`` fixes the pipeline (the pytorch-grad-cam shape): capture the layer's output (with the
gradient of every explained output, from one forward and one batched backward pass), turn it
into one ``(rows, cols, channels)`` grid per image with ``vlm.vision_grid``, weight the
channels, map = ReLU(sum_c w_c A_c). A variant overrides one function: ``weights`` (per image
``(outputs, channels)``) or, for a rule that is not a weighted sum, ``cam``.

Maps are on the vision grid: the image span's grid for LLaVA and CLIP (the class token is
dropped), twice the merged grid in each direction for Qwen2-VL. A CAM on the vision tower has
no text side: the prompt-word scores are zeros.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F

from mmscope.core.errors import InputError, SiteError
from mmscope.core.hooks import capture
from mmscope.core.registry import register
from mmscope.core.targets import BoundTarget
from mmscope.core.validate import positive_int
from mmscope.methods.attribution.base import Attribution, Maps, scores
from mmscope.methods.attribution.gradients import batched_grads
from mmscope.models.base import parse_site

if TYPE_CHECKING:
    from mmscope.models.base import VLM

LEVEL = "model/architecture"
FAMILY = "attribution/cam"
Grids = list[torch.Tensor]


def _check_layer(layer: str | None) -> str | None:
    if layer is None:
        return None
    if not isinstance(layer, str):
        raise InputError(f"layer must be a site such as 'vision.layer[-1]', not {layer!r}")
    try:
        role, _ = parse_site(layer)
    except SiteError as err:
        raise InputError(str(err)) from None
    if not role.startswith("vision."):
        raise InputError(f"a CAM reads a vision-tower layer ('vision.layer[-1]'), not {layer!r}")
    return layer


class CAM(Attribution):
    """Base class: a vision-tower layer's channels, weighted, summed and rectified.

    Args:
        layer: the site whose output is read (default the adapter's ``CAM_SITE``: for LLaVA
            the vision layer its projector reads; for CLIP and Qwen2-VL ``"vision.layer[-2]"``,
            as the last block's patch outputs never reach CLIP's pooled class token and are
            layer-normalised by Qwen2-VL's merger; pytorch-grad-cam also reads a ViT there).
    """

    #: Whether ``weights``/``cam`` read gradients (gradient-free variants skip the backward).
    uses_gradients: ClassVar[bool] = True

    def __init__(self, layer: str | None = None) -> None:
        self.layer = _check_layer(layer)

    def attribute(self, vlm: VLM, bound: BoundTarget) -> Maps:
        site = self.site(vlm)
        acts, grads = activations(vlm, bound, site, self.uses_gradients)
        image = self.cam(vlm, bound, acts, grads)
        spans = bound.inputs.image_spans
        flat = [len(bound.labels[b]) for b, item in enumerate(spans) for _ in item]
        for maps, n in zip(image, flat):
            maps[n:] = 0  # outputs an item does not have (a shorter generated answer)
        text = [torch.zeros(bound.k, end - start) for start, end in bound.inputs.prompt_spans]
        return Maps(image, text, {"layer": site})

    def site(self, vlm: VLM) -> str:
        """The layer's site on ``vlm``; ``InputError`` when it does not resolve."""
        site = _check_layer(self.layer or vlm.CAM_SITE)
        assert site is not None
        try:
            vlm.resolve(site)
        except SiteError as err:
            raise InputError(f"CAM layer {site!r} does not resolve on {vlm.name}: {err}") from None
        return site

    def cam(self, vlm: VLM, bound: BoundTarget, acts: Grids, grads: Grids | None) -> Grids:
        """Per image ``(outputs, rows, cols)``: ReLU(sum_c w_c A_c)."""
        weights = self.weights(vlm, bound, acts, grads)
        return [torch.relu(torch.einsum("kc,rwc->krw", w, a)) for w, a in zip(weights, acts)]

    def weights(self, vlm: VLM, bound: BoundTarget, acts: Grids, grads: Grids | None) -> Grids:
        """Per image ``(outputs, channels)`` channel weights."""
        raise NotImplementedError


def activations(
    vlm: VLM, bound: BoundTarget, site: str, with_grads: bool = True
) -> tuple[Grids, Grids | None]:
    """Per image the layer's grid ``(rows, cols, channels)`` and, with ``with_grads``, the
    gradient of every output ``(outputs, rows, cols, channels)`` (float32, on the CPU)."""
    inputs = bound.inputs
    if not with_grads:
        with torch.no_grad(), capture(vlm, site) as cap:
            vlm.forward(inputs)
        return _grids(vlm, bound, site, cap[site]), None
    # A leaf at the pixels puts the layer's output in a graph (the parameters are frozen).
    pixels = inputs.pixel_values.detach().requires_grad_(True)
    leafy = replace(inputs, tensors={**inputs.tensors, "pixel_values": pixels})
    with torch.enable_grad(), capture(vlm, site, grads=True) as cap:
        out = bound(vlm.forward(leafy))
        value = cap[site]
        (grad,) = batched_grads(out, [value])
    acts = _grids(vlm, bound, site, value.detach())
    per_output = [_grids(vlm, bound, site, g) for g in grad]
    return acts, [torch.stack(gs) for gs in zip(*per_output)]


def _grids(vlm: VLM, bound: BoundTarget, site: str, value: torch.Tensor) -> Grids:
    spans = vlm.flat_spans(bound.inputs)
    try:
        grids = vlm.vision_grid(value, bound.inputs)
    except RuntimeError:
        grids = []
    channels = value.shape[-1]
    if len(grids) != len(spans) or any(g.dim() != 3 or g.shape[-1] != channels for g in grids):
        raise InputError(f"{site!r} gives {tuple(value.shape)}, not one patch grid per image")
    return [g.detach().float().cpu() for g in grids]


def _need(grads: Grids | None) -> Grids:
    if grads is None:
        raise InputError("this CAM needs gradients (uses_gradients is False)")
    return grads


@register("grad_cam", family=FAMILY, paper="Selvaraju et al. 2017", level=LEVEL)
class GradCAM(CAM):
    """Grad-CAM: w_c = the spatial mean of d target / d A_c."""

    def weights(self, vlm: VLM, bound: BoundTarget, acts: Grids, grads: Grids | None) -> Grids:
        return [g.mean((1, 2)) for g in _need(grads)]


@register("hires_cam", family=FAMILY, paper="Draelos & Carin 2020", level=LEVEL)
class HiResCAM(CAM):
    """HiResCAM: map = ReLU(sum_c dA_c * A_c), the gradient times the activation per cell.

    Where each cell is layer-normalised right after the layer (Qwen2-VL's merger reads the
    last vision block so), the read-out is scale invariant and sum_c dA_c * A_c is 0: read an
    earlier block there (``layer="vision.layer[-2]"``).
    """

    def cam(self, vlm: VLM, bound: BoundTarget, acts: Grids, grads: Grids | None) -> Grids:
        return [torch.relu((g * a).sum(-1)) for a, g in zip(acts, _need(grads))]


@register("grad_cam_pp", family=FAMILY, paper="Chattopadhay et al. 2018", level=LEVEL)
class GradCAMPlusPlus(CAM):
    """Grad-CAM++: w_c = sum_ij a_ij ReLU(g_ij), a_ij = g^2 / (2 g^2 + sum_ab A_ab g^3).

    The closed form of the paper's eq. 19 with the exponential of the score folded into the
    gradient, as pytorch-grad-cam computes it (eps 1e-6; a_ij = 0 where g = 0).
    """

    def weights(self, vlm: VLM, bound: BoundTarget, acts: Grids, grads: Grids | None) -> Grids:
        out = []
        for a, g in zip(acts, _need(grads)):
            g2 = g * g
            total = a.sum((0, 1))  # (channels,)
            aij = g2 / (2 * g2 + total * g2 * g + 1e-6)
            aij = torch.where(g != 0, aij, torch.zeros_like(aij))
            out.append((torch.relu(g) * aij).sum((1, 2)))
        return out


@register("score_cam", family=FAMILY, paper="Wang et al. 2020", level=LEVEL)
class ScoreCAM(CAM):
    """Score-CAM: w = softmax over channels of the target's increase f(X o H_c) - f(X_b).

    H_c is channel c's map min-max normalised to [0, 1] and applied at the patch grid with
    ``vlm.mask_pixels`` (masked cells go to the processor's mean colour, pixel value 0, as
    pytorch-grad-cam's ``input * mask``). The paper upsamples the map bilinearly to pixels;
    here each cell of the grid ``mask_pixels`` works on keeps one value (for Qwen2-VL the mean
    of its 2x2 patches). The baseline f(X_b) is one constant per output, which softmax removes,
    so it is not run. The masked copies run ``batch_size`` at a time (``Inputs.tile``).
    """

    uses_gradients = False

    def __init__(self, layer: str | None = None, batch_size: int = 16) -> None:
        super().__init__(layer)
        self.batch_size = positive_int("batch_size", batch_size)

    def chosen(self, acts: Grids, grads: Grids | None, k: int) -> Grids:
        """Per image ``(outputs, n)``: the channels each output is scored over (all here)."""
        return [torch.arange(a.shape[-1]).expand(k, -1) for a in acts]

    def weights(self, vlm: VLM, bound: BoundTarget, acts: Grids, grads: Grids | None) -> Grids:
        chosen = self.chosen(acts, grads, bound.k)
        union = [torch.unique(c) for c in chosen]  # sorted: each channel masked once
        spans = vlm.flat_spans(bound.inputs)
        masks = [_keep(a[..., u], s.grid) for a, u, s in zip(acts, union, spans)]
        got = masked_scores(vlm, bound, masks, self.batch_size)
        out = []
        for a, c, u, s in zip(acts, chosen, union, got):
            picked = s.T.gather(1, torch.searchsorted(u, c.contiguous()))  # (outputs, n)
            w = torch.zeros(bound.k, a.shape[-1])
            out.append(w.scatter(1, c, torch.softmax(picked, dim=-1)))
        return out


def _keep(acts: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``(rows, cols, n)`` channel maps -> ``(n, *grid)`` keep grids in [0, 1]."""
    maps = acts.permute(2, 0, 1)
    flat = maps.reshape(maps.shape[0], -1)
    low, high = flat.min(-1).values[:, None, None], flat.max(-1).values[:, None, None]
    keep = (maps - low) / (high - low + 1e-8)
    return F.adaptive_avg_pool2d(keep, grid) if tuple(keep.shape[-2:]) != tuple(grid) else keep


def masked_scores(vlm: VLM, bound: BoundTarget, masks: Grids, batch_size: int = 16) -> Grids:
    """Target scores with each image masked by each of its keep grids.

    Args:
        masks: per image (item order, then image order) ``(n, rows, cols)`` keep grids on its
            span's grid; the other images of its item stay whole while one is masked.

    Returns:
        per image ``(n, outputs)``. Each forward runs ``batch_size`` masked copies of the batch.
    """
    inputs = bound.inputs
    spans = vlm.flat_spans(inputs)
    owner = [(b, s) for b, item in enumerate(inputs.image_spans) for s in range(len(item))]
    slots = max((s for _, s in owner), default=-1) + 1
    jobs = [
        (s, t)
        for s in range(slots)
        for t in range(max(len(m) for m, (_, s2) in zip(masks, owner) if s2 == s))
    ]
    out = [torch.zeros(len(m), bound.k) for m in masks]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        keeps = [
            masks[j][t] if s2 == s and t < len(masks[j]) else torch.ones(spans[j].grid)
            for s, t in chunk
            for j, (_, s2) in enumerate(owner)
        ]
        tiled = inputs.tile(len(chunk))
        pixels = vlm.mask_pixels(tiled.pixel_values, tiled, _stack(keeps), 0.0)
        masked = replace(tiled, tensors={**tiled.tensors, "pixel_values": pixels})
        got = scores(vlm, bound, masked).cpu().view(len(chunk), inputs.batch_size, -1)
        for c, (s, t) in enumerate(chunk):
            for j, (b, s2) in enumerate(owner):
                if s2 == s and t < len(masks[j]):
                    out[j][t] = got[c, b]
    return out


def _stack(keeps: list[torch.Tensor]) -> Any:
    """One tensor when every grid has one shape; else the list (Qwen2-VL indexes per image)."""
    if len({tuple(k.shape) for k in keeps}) == 1:
        return torch.stack(keeps)
    return keeps


@register("gscore_cam", family=FAMILY, paper="Chen et al. 2022", level=LEVEL)
class GScoreCAM(ScoreCAM):
    """gScore-CAM: Score-CAM over the ``channels`` channels with the largest mean gradient.

    The paper (for CLIP) keeps 300 channels of a much wider layer. Its released code puts the
    scores back into a vector of all channels and takes softmax over all of them (unchosen
    channels at score 0); this follows the paper: softmax over the chosen channels, the others
    weigh 0. Channels are chosen per output; each is masked once for all outputs.
    """

    uses_gradients = True

    def __init__(self, layer: str | None = None, channels: int = 32, batch_size: int = 16) -> None:
        super().__init__(layer, batch_size)
        self.channels = positive_int("channels", channels)

    def chosen(self, acts: Grids, grads: Grids | None, k: int) -> Grids:
        return [
            g.mean((1, 2)).topk(min(self.channels, g.shape[-1]), dim=-1).indices
            for g in _need(grads)
        ]
