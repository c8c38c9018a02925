"""The CLIP image embedding as a sum of direct contributions (Gandelsman et al. 2024,
"Interpreting CLIP's Image Representation via Text-Based Decomposition").

The pooled class token is the residual stream ``r = r_0 + sum_l attn_l + sum_l mlp_l`` at
position 0. The final LayerNorm is linearised with the image's own mean and standard deviation
(``LN(r) = gamma (r - mu) / sigma + beta`` is linear in ``r`` once ``sigma`` is fixed), and the
visual projection is linear, so ``image_embedding = P LN(r)`` splits exactly into
``P (gamma (c - mean(c)) / sigma)`` per component ``c`` plus the constant ``P beta``. Each
attention output splits further per head (its slice of the output projection, the projection's
bias shared evenly among the heads) and per head per token (attention probability times the
token's value, the bias shared evenly among the tokens).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmscope.core.hooks import capture
from mmscope.core.sites import site
from mmscope.methods.embedding.clip_embed import needs_class_token

if TYPE_CHECKING:
    from mmscope.models.base import VLM


@dataclass(frozen=True)
class Decomposition:
    """Direct contributions to the (unnormalised) CLIP image embeddings.

    Attributes:
        embed: ``(images, d)`` from the embeddings (class token after the pre-norm).
        heads: ``(images, layers, heads, d)`` from each attention head.
        mlps: ``(images, layers, d)`` from each MLP.
        bias: ``(d,)`` the final LayerNorm's bias, projected (the same for every image).
    """

    embed: np.ndarray
    heads: np.ndarray
    mlps: np.ndarray
    bias: np.ndarray

    def total(self) -> np.ndarray:
        """``(images, d)``: the sum of every contribution (the image embeddings)."""
        return self.embed + self.heads.sum((1, 2)) + self.mlps.sum(1) + self.bias

    def ablated(
        self,
        heads: np.ndarray | None = None,
        mlps: np.ndarray | None = None,
        embed: bool = False,
    ) -> np.ndarray:
        """``(images, d)`` embeddings with the chosen contributions (bool masks ``(layers,
        heads)`` and ``(layers,)``) replaced by their mean over images (mean-ablation)."""
        out = self.total()
        if heads is not None and heads.any():
            part = self.heads[:, heads]
            out = out - part.sum(1) + part.mean(0).sum(0)
        if mlps is not None and mlps.any():
            part = self.mlps[:, mlps]
            out = out - part.sum(1) + part.mean(0).sum(0)
        if embed:
            out = out - self.embed + self.embed.mean(0)
        return out


def _tensor(module: torch.nn.Module, name: str) -> torch.Tensor:
    """A parameter of ``module`` as a float tensor."""
    value = getattr(module, name)
    assert isinstance(value, torch.Tensor), f"{type(module).__name__}.{name} is no tensor"
    return value.float()


def _linearised(vlm: VLM, final: torch.Tensor) -> Any:
    """``c -> P (gamma (c - mean c) / sigma)`` with ``sigma`` of each image's ``final``
    residual (``final``: ``(images, D)``), and the projected LayerNorm bias."""
    norm, proj = vlm.resolve("vision.norm"), vlm.resolve("vision.proj")
    eps = float(getattr(norm, "eps", 1e-5))
    sigma = torch.sqrt(final.var(-1, unbiased=False) + eps)  # (images,)
    gamma, weight = _tensor(norm, "weight"), _tensor(proj, "weight")

    def apply(c: torch.Tensor) -> torch.Tensor:
        shape = (-1,) + (1,) * (c.dim() - 1)
        c = (c.float() - c.float().mean(-1, keepdim=True)) / sigma.view(shape)
        return (c * gamma) @ weight.t()

    return apply, _tensor(norm, "bias") @ weight.t()


def _head_split(out_proj: torch.nn.Module, x: torch.Tensor, heads: int) -> torch.Tensor:
    """``(..., heads, D)``: each head's slice of the output projection applied to its part of
    ``x`` (``(..., heads * head_dim)``), plus its share of the bias."""
    size = x.shape[-1] // heads
    w = _tensor(out_proj, "weight").view(-1, heads, size)  # (D, heads, head_dim)
    per = torch.einsum("...hk,dhk->...hd", x.float().unflatten(-1, (heads, size)), w)
    return per + _tensor(out_proj, "bias") / heads


@torch.no_grad()
def decompose(vlm: VLM, pixel_values: torch.Tensor) -> Decomposition:
    """Direct contributions of every head, MLP and the embeddings to each image's embedding
    (``VLM.image_features``), from one forward."""
    needs_class_token(vlm, "the TextSpan decomposition")
    n = vlm.num_layers("vision.layer")
    heads = vlm.num_heads("vision.layer")
    sites = [site("vision.layer", i, p) for i in range(n) for p in ("attn.heads", "attn", "mlp")]
    last = site("vision.layer", n - 1)
    with capture(vlm, [*sites, last]) as cap:
        vlm.image_features(pixel_values)
    final = cap[last][:, 0].float()
    lin, bias = _linearised(vlm, final)
    per_head = torch.stack(
        [
            _head_split(vlm.resolve(x), cap[x][:, 0], heads)
            for x in (site("vision.layer", i, "attn.heads") for i in range(n))
        ],
        dim=1,
    )  # (images, layers, heads, D)
    attn = torch.stack([cap[site("vision.layer", i, "attn")][:, 0].float() for i in range(n)], 1)
    mlps = torch.stack([cap[site("vision.layer", i, "mlp")][:, 0].float() for i in range(n)], 1)
    embed = final - attn.sum(1) - mlps.sum(1)
    return Decomposition(
        embed=lin(embed).cpu().numpy(),
        heads=lin(per_head).cpu().numpy(),
        mlps=lin(mlps).cpu().numpy(),
        bias=bias.cpu().numpy(),
    )


@torch.no_grad()
def token_contributions(vlm: VLM, pixel_values: torch.Tensor, layer: int) -> np.ndarray:
    """``(images, heads, tokens, d)``: each head of ``layer`` split over the tokens its class
    token reads (probability times the token's value through the head's output projection);
    summed over tokens it is ``decompose(...).heads[:, layer]``."""
    needs_class_token(vlm, "the TextSpan decomposition")
    n = vlm.num_layers("vision.layer")
    heads = vlm.num_heads("vision.layer")
    layer = layer % n

    def at(part: str = "") -> str:
        return site("vision.layer", layer, part)

    last = site("vision.layer", n - 1)
    with capture(vlm, [at(), at("attn"), at("mlp"), at("attn.probs"), last]) as cap:
        vlm.image_features(pixel_values)
    residual_in = cap[at()] - cap[at("attn")] - cap[at("mlp")]
    norm, v_proj = vlm.resolve(at("attn.norm")), vlm.resolve(at("attn.values"))
    values = v_proj(norm(residual_in)).float()  # (images, tokens, D)
    probs = cap[at("attn.probs")][:, :, 0].float()  # (images, heads, tokens)
    size = values.shape[-1] // heads
    values = values.unflatten(-1, (heads, size)).transpose(1, 2)  # (images, heads, tokens, hd)
    weighted = probs[..., None] * values
    out_proj = vlm.resolve(at("attn.heads"))
    w = _tensor(out_proj, "weight").view(-1, heads, size)
    per = torch.einsum("bhtk,dhk->bhtd", weighted, w)
    per = per + _tensor(out_proj, "bias") / (heads * per.shape[2])
    lin, _ = _linearised(vlm, cap[last][:, 0].float())
    return np.asarray(lin(per).cpu().numpy())
