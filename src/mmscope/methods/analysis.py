"""Analyses of what happens inside a model, and the habits their results share.

Attribution methods answer *which inputs* with an ``Explanation``; analyses answer *where
inside* (logit lens, token ablation, attention knockout, causal tracing, heads, pruning) and
return their own small frozen result types. Like methods, an analysis takes its settings in
``__init__`` and its data in ``__call__(vlm, inputs, target, ...)``; its result has
``to_dict``, ``plot`` and ``save``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from mmscope.core.errors import InputError, NotApplicableError
from mmscope.core.registry import REGISTRY
from mmscope.core.result import Result, jsonable, new_figure  # noqa: F401  (their home)
from mmscope.core.targets import (
    BoundTarget,
    Predicted,
    Target,
    Token,
    TokenId,
    default_target,
    token_id,
)
from mmscope.models.capabilities import checks_needs

if TYPE_CHECKING:
    from mmscope.core.inputs import ImageSpan, Inputs
    from mmscope.models.base import VLM

KIND = "analysis"


class Analysis:
    """Base of analyses: subclasses set their settings in ``__init__`` and implement
    ``__call__``. Nothing is cached on ``self``; the model is left as it was found."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__call__" in cls.__dict__:  # what the entry needs is checked before any work
            cls.__call__ = checks_needs(cls.__dict__["__call__"], KIND)  # type: ignore[method-assign]

    def __call__(self, vlm: VLM, inputs: Inputs, target: Target | None = None) -> Any:
        raise NotImplementedError


def analyses() -> list[str]:
    """Keys of every registered analysis, sorted."""
    import mmscope.methods  # noqa: F401  (registers them)

    return sorted(REGISTRY.keys(KIND))


def make_analysis(key: str, **settings: Any) -> Any:
    """A registered analysis from its key and settings (bad settings raise InputError)."""
    import mmscope.methods  # noqa: F401  (registers them)

    return REGISTRY.make(key, KIND, **settings)


def stack(vlm: VLM) -> str:
    """The layer stack where image and prompt meet: the language model's, or for dual encoders
    (whose image tokens never meet the text) the vision tower's."""
    return "vision.layer" if vlm.contrastive else "lm.layer"


def next_token_ids(vlm: VLM, inputs: Inputs, target: Target | None) -> list[int]:
    """Per item, the token a next-token target asks about (default: the model's own answer)."""
    if vlm.contrastive:
        raise NotApplicableError(f"{vlm.name} is a contrastive encoder; it predicts no tokens")
    target = target or Predicted()
    if isinstance(target, Predicted):
        return target.token_ids(vlm, inputs)
    if isinstance(target, Token):
        return [token_id(vlm, target.word)] * inputs.batch_size
    if isinstance(target, TokenId):
        ids = target.id
        return list(ids) if isinstance(ids, tuple) else [ids] * inputs.batch_size
    raise InputError(f"this analysis needs a next-token target (Token, TokenId), not {target!r}")


def bind(vlm: VLM, inputs: Inputs, target: Target | None) -> BoundTarget:
    """``target`` bound to the inputs; by default the model's own next token, or for dual
    encoders each image's similarity to its text. Bind before patching the model."""
    return (target or default_target(vlm)).bind(vlm, inputs)


@torch.no_grad()
def run_scores(vlm: VLM, bound: BoundTarget, inputs: Inputs | None = None) -> torch.Tensor:
    """The bound target's first output ``(rows,)`` on one forward of ``inputs`` (default: the
    bound inputs; a tiled copy of them scores each row against its own item)."""
    return bound(vlm.forward(inputs or bound.inputs))[:, 0].float().cpu()


def sequence_spans(vlm: VLM, inputs: Inputs) -> tuple[tuple[ImageSpan, ...], ...]:
    """Per item, its image spans in the sequence that ``stack(vlm)`` runs over: the language
    model's, or a dual encoder's vision tower (Mllama's images, read through cross-attention,
    have none there)."""
    seq = "vision" if vlm.contrastive else "lm"
    return tuple(tuple(s for s in item if s.sequence == seq) for item in inputs.image_spans)


def position_labels(vlm: VLM, inputs: Inputs, item: int, length: int) -> tuple[str, ...]:
    """A label per position up to ``length``: the token, ``"img0 r,c"`` for image tokens,
    ``"[class]"`` for a dual encoder's class token."""
    labels = ["" for _ in range(length)]
    if not vlm.contrastive:
        tokens = vlm.tokenizer.convert_ids_to_tokens(inputs.input_ids[item].tolist())
        labels = [str(t) for t in tokens]
    elif vlm.CLASS_TOKEN:
        labels[0] = "[class]"
    for image, span in enumerate(sequence_spans(vlm, inputs)[item]):
        cols = span.grid[1]
        for j, pos in enumerate(span.positions):
            labels[pos] = f"img{image} {j // cols},{j % cols}"
    return tuple(labels)
