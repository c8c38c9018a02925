"""The SigLIP vision tower (Zhai et al. 2023) as the decoder VLMs that embed it see it
(PaliGemma, Gemma 3): its roles and its patch grid.

``SiglipVisionModel`` has no class token: every position of its sequence is a patch, in raster
order over a square grid of ``image_size / patch_size`` patches a side. Its
``last_hidden_state`` is the last block's output through ``post_layernorm`` (``vision.norm``),
which is what the projector reads. Each attention module returns ``(output, probabilities)``
under eager attention.
"""

from __future__ import annotations

import torch

from mmscope.models.roles import layer_lists, vision_tower_roles


def siglip_vision_roles(tower: str) -> tuple[dict[str, str], dict[str, str]]:
    """The vision roles and layer list of a ``SiglipVisionModel`` at module path ``tower``."""
    roles = vision_tower_roles(tower, norm="post_layernorm")
    return roles, layer_lists(roles)


def patch_grids(value: torch.Tensor, side: int) -> list[torch.Tensor]:
    """A vision-tower layer's output ``(images, side * side, dim)`` as one
    ``(side, side, dim)`` patch grid per image (raster order, no class token)."""
    if value.dim() != 3 or value.shape[1] != side * side:
        raise RuntimeError(f"expected (images, {side * side}, dim), got {tuple(value.shape)}")
    return list(value.reshape(value.shape[0], side, side, value.shape[-1]))
