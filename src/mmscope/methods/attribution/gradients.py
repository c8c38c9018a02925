"""One gradient pass that every gradient method shares.

The image side is taken in *pixel* space (``pixel_values``) or *token* space (the image tokens
the language model reads, the output of the adapter's ``IMAGE_TOKENS_SITE``); the text side is
always the prompt's token embeddings (``TEXT_EMBED_SITE``). All explained outputs of a target
(every generated token for ``Generated``) get their gradients from one forward pass and one
batched backward pass (``is_grads_batched``), not one run per output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from mmscope.core.errors import InputError
from mmscope.core.hooks import patch
from mmscope.core.inputs import Inputs
from mmscope.core.targets import BoundTarget
from mmscope.methods.attribution.base import prompt_rows, token_grid

if TYPE_CHECKING:
    from mmscope.models.base import VLM

SPACES = ("pixels", "tokens")
Edit = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Grads:
    """Features at which gradients were taken, and the gradients of every output.

    ``image``: pixels (shaped like ``pixel_values``) or image tokens ``(all tokens, dim)``;
    ``text``: token embeddings ``(batch, sequence, dim)``; ``*_grad`` add a leading output axis.
    """

    scores: torch.Tensor
    image: torch.Tensor
    image_grad: torch.Tensor
    text: torch.Tensor
    text_grad: torch.Tensor


def check_space(space: str) -> str:
    if space not in SPACES:
        raise InputError(f"space must be one of {', '.join(SPACES)}, not {space!r}")
    return space


def _leaf(value: torch.Tensor, edit: Edit | None) -> torch.Tensor:
    """A float32 leaf at the (edited) features, where the gradient is taken; the model gets
    it back in its own dtype (a bfloat16 model stays bfloat16)."""
    value = value.detach().float()
    return (edit(value) if edit else value).detach().requires_grad_(True)


def gradients(
    vlm: VLM,
    bound: BoundTarget,
    inputs: Inputs | None = None,
    space: str = "pixels",
    image_edit: Edit | None = None,
    text_edit: Edit | None = None,
) -> Grads:
    """Gradients of ``bound``'s outputs at the (optionally edited) image and text features.

    ``image_edit`` and ``text_edit`` map the clean features to the point where the gradient is
    taken (an integrated-gradients step, a noisy copy); the gradient is at the edited point.
    """
    run: Inputs = inputs if inputs is not None else bound.inputs
    inputs = run
    leaves: dict[str, torch.Tensor] = {}

    def text_hook(out: torch.Tensor) -> torch.Tensor:
        leaves["text"] = _leaf(out, text_edit)
        return leaves["text"].to(out.dtype)

    def token_hook(out: torch.Tensor) -> torch.Tensor:
        leaves["image"] = _leaf(vlm.image_tokens(out, run), image_edit)
        return vlm.with_image_tokens(out.detach(), leaves["image"].to(out.dtype), run)

    hooks = {vlm.TEXT_EMBED_SITE: text_hook}
    if check_space(space) == "tokens":
        hooks[vlm.IMAGE_TOKENS_SITE] = token_hook
    else:
        leaves["image"] = _leaf(inputs.pixel_values, image_edit)
        pixels = leaves["image"].to(inputs.pixel_values.dtype)
        inputs = replace(inputs, tensors={**inputs.tensors, "pixel_values": pixels})
    with torch.enable_grad(), patch(vlm, hooks):
        out = bound(vlm.forward(inputs))
        image_grad, text_grad = batched_grads(out, [leaves["image"], leaves["text"]])
    return Grads(  # on the CPU in float32, whatever the model's device and dtype
        out.detach().float().cpu(),
        leaves["image"].detach().cpu(),
        image_grad.float().cpu(),
        leaves["text"].detach().cpu(),
        text_grad.float().cpu(),
    )


def batched_grads(out: torch.Tensor, wrt: list[torch.Tensor]) -> list[torch.Tensor]:
    """d out[:, k].sum() / d wrt for every output k, stacked on a leading axis. The graph is
    kept, so a caller may take the outputs in several passes."""
    k = out.shape[1]
    if k == 1:
        grads = torch.autograd.grad(out.sum(), wrt, allow_unused=True, retain_graph=True)
        return [(torch.zeros_like(x) if g is None else g).unsqueeze(0) for g, x in zip(grads, wrt)]
    onehot = torch.eye(k, dtype=out.dtype, device=out.device).unsqueeze(1).expand(k, *out.shape)
    try:
        batched = torch.autograd.grad(
            out, wrt, grad_outputs=onehot, is_grads_batched=True, retain_graph=True
        )
        return list(batched)
    except RuntimeError:  # an op without a batching rule: one backward per output
        per_output = [
            torch.autograd.grad(out[:, j].sum(), wrt, retain_graph=True) for j in range(k)
        ]
        return [torch.stack(gs) for gs in zip(*per_output)]


def to_maps(
    vlm: VLM, inputs: Inputs, space: str, image_attr: torch.Tensor, text_attr: torch.Tensor
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per-feature attributions (leading output axis) -> per-image grids and per-item words.

    Pixels are summed over channels and over each patch; token and word vectors over their
    dimension.
    """
    if space == "pixels":
        per_output = [vlm.pixel_grid(a, inputs) for a in image_attr]
        image = [torch.stack(maps) for maps in zip(*per_output)]
    else:
        image = token_grid(vlm, inputs, image_attr.sum(-1))
    return image, prompt_rows(inputs, text_attr.sum(-1))
