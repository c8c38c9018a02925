"""Shared pieces of the CLIP embedding studies (SpLiCE, TextSpan, CLIP-Dissect): the concepts
present in items, which texts a tokenizer can spell, L2-normalised text and image embeddings."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.models.capabilities import require

if TYPE_CHECKING:
    from mmscope.models.base import VLM


def present_concepts(
    items: Sequence[Any], present: Sequence[Iterable[str]] | None
) -> list[frozenset[str]] | None:
    """Per item the concepts in its image: ``present`` when given, else from items that keep
    their world scene (``item.scene``: ``bench.world_items``), else ``None``."""
    if present is not None:
        if len(present) != len(items):
            raise InputError(f"present has {len(present)} entries for {len(items)} items")
        return [frozenset(p) for p in present]
    from mmscope.world import Scene, image_concepts

    scenes = [getattr(it, "scene", None) for it in items]
    if not all(isinstance(s, Scene) for s in scenes):
        return None
    return [image_concepts(s) for s in scenes if isinstance(s, Scene)]


def needs_clip(vlm: VLM, method: str) -> None:
    """Raise ``NotApplicableError`` unless ``vlm`` is a CLIP-style dual encoder (for the public
    functions; the registered studies declare it)."""
    require(vlm, ("contrastive",), f"{method} (a CLIP-style image embedding)")


def needs_class_token(vlm: VLM, method: str) -> None:
    """Raise ``NotApplicableError`` unless ``vlm``'s image embedding is its vision tower's class
    token through a norm and a linear projection (CLIP's; not SigLIP's attention pooling)."""
    require(vlm, ("contrastive", "class_token"), method)
    if "vision.proj" not in vlm.ROLES:
        raise NotApplicableError(
            f"{method} splits a class token's residual stream linearly through the visual "
            f"projection; {vlm.name}'s vision tower has no linear projection (vision.proj)"
        )


def spelled(vlm: VLM, texts: Iterable[str]) -> tuple[list[str], list[str]]:
    """(texts the tokenizer spells without unknown tokens, the others)."""
    tok = vlm.tokenizer
    unk = getattr(tok, "unk_token", None)
    kept: list[str] = []
    dropped: list[str] = []
    for text in texts:
        (dropped if unk is not None and unk in tok.tokenize(text) else kept).append(text)
    return kept, dropped


@torch.no_grad()
def text_embeddings(vlm: VLM, texts: Sequence[str], image: Any) -> torch.Tensor:
    """``(texts, d)`` L2-normalised CLIP text embeddings (one forward with ``image``)."""
    return vlm.forward(vlm.prepare([image], list(texts))).text_embeds.float().cpu()


@torch.no_grad()
def image_embeddings(vlm: VLM, images: Sequence[Any], batch_size: int) -> torch.Tensor:
    """``(images, d)`` L2-normalised CLIP image embeddings."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = list(images[start : start + batch_size])
        out.append(vlm.forward(vlm.prepare(batch, "a")).image_embeds.float().cpu())
    return torch.cat(out)
