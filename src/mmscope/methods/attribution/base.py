"""The attribution pipeline every method shares (the pytorch-grad-cam shape).

``Attribution.__call__`` binds the target, guards the model's state, runs ``attribute`` (the
one function a method overrides) and packs the result into an ``Explanation``. A method
returns ``Maps``: one ``(outputs, rows, cols)`` tensor per image (item order, then image
order) and one ``(outputs, prompt tokens)`` tensor per item.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmscope.core.explanation import Explanation
from mmscope.core.inputs import Inputs
from mmscope.core.registry import REGISTRY
from mmscope.core.state import preserved
from mmscope.core.targets import BoundTarget, Target, default_target
from mmscope.models.capabilities import require_entry

if TYPE_CHECKING:
    from mmscope.models.base import VLM


@dataclass
class Maps:
    """What ``attribute`` returns (see the module docstring)."""

    image: list[torch.Tensor]
    text: list[torch.Tensor]
    extras: dict[str, Any] = field(default_factory=dict)


class Attribution:
    """Base class of attribution methods: settings in ``__init__``, data in ``__call__``."""

    def __call__(self, vlm: VLM, inputs: Inputs, target: Target | None = None) -> Explanation:
        """Explain ``target`` (default: the model's own next token, or CLIP's similarity)."""
        require_entry(vlm, self, "method")
        target = target or default_target(vlm)
        with preserved(vlm.model):
            bound = target.bind(vlm, inputs)
            maps = self.attribute(vlm, bound)
        return pack(self, vlm, bound, target, maps)

    def attribute(self, vlm: VLM, bound: BoundTarget) -> Maps:
        """The method itself."""
        raise NotImplementedError

    @property
    def settings(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}

    @property
    def key(self) -> str:
        for entry in REGISTRY.entries("method"):
            if entry.obj is type(self):
                return entry.key
        return type(self).__name__


def pack(
    method: Attribution, vlm: VLM, bound: BoundTarget, target: Target, maps: Maps
) -> Explanation:
    """Split the flat per-image maps back into items and build the ``Explanation``."""
    inputs = bound.inputs
    flat = iter(maps.image)
    per_item = tuple(tuple(_np(next(flat)) for _ in item) for item in inputs.image_spans)
    return Explanation(
        method=method.key,
        settings=method.settings,
        target=repr(target),
        labels=bound.labels,
        image_scores=per_item,
        text_scores=tuple(_np(t) for t in maps.text),
        prompt_tokens=inputs.prompt_tokens,
        spans=inputs.image_spans,
        images=inputs.images,
        extras=maps.extras,
    )


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy()


def scores(vlm: VLM, bound: BoundTarget, inputs: Inputs | None = None) -> torch.Tensor:
    """``(batch, outputs)`` target scores of one forward pass (no gradient)."""
    with torch.no_grad():
        return bound(vlm.forward(inputs if inputs is not None else bound.inputs)).float()


def token_grid(vlm: VLM, inputs: Inputs, per_token: torch.Tensor) -> list[torch.Tensor]:
    """``(..., all image tokens)`` -> one ``(..., rows, cols)`` per image (span order)."""
    sizes = [s.grid[0] * s.grid[1] for s in vlm.flat_spans(inputs)]
    parts = per_token.split(sizes, dim=-1)
    return [p.reshape(*p.shape[:-1], *s.grid) for p, s in zip(parts, vlm.flat_spans(inputs))]


def prompt_rows(inputs: Inputs, per_position: torch.Tensor) -> list[torch.Tensor]:
    """``(..., batch, sequence)`` -> per item its prompt positions ``(..., prompt tokens)``."""
    return [per_position[..., b, start:end] for b, (start, end) in enumerate(inputs.prompt_spans)]
