"""The leaderboard's floor and ceiling: a random map and the true evidence mask.

Both are callables with an attribution method's signature, ``(vlm, inputs, target) ->
Explanation``, so every metric (those that re-run a method included) scores them the same way.
Neither reads the model: the randomisation check rightly finds that they do not explain it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from mmscope.core.explanation import Explanation
from mmscope.core.inputs import Inputs
from mmscope.core.targets import Target
from mmscope.world.concepts import patch_coverage

if TYPE_CHECKING:
    from mmscope.models.base import VLM


class MapBaseline:
    """A map that is not computed from the model; subclasses say which (``grid``)."""

    key = ""

    def grid(self, item: int, image: int, shape: tuple[int, int]) -> np.ndarray:
        raise NotImplementedError

    def __call__(self, vlm: VLM, inputs: Inputs, target: Target) -> Explanation:
        bound = target.bind(vlm, inputs)
        image_scores = tuple(
            tuple(
                self.grid(b, i, tuple(span.grid))[None].astype(np.float32)  # type: ignore[arg-type]
                for i, span in enumerate(spans)
            )
            for b, spans in enumerate(inputs.image_spans)
        )
        return Explanation(
            method=self.key,
            settings={},
            target=repr(target),
            labels=bound.labels,
            image_scores=image_scores,
            text_scores=tuple(np.zeros((1, len(t)), np.float32) for t in inputs.prompt_tokens),
            prompt_tokens=inputs.prompt_tokens,
            spans=inputs.image_spans,
            images=inputs.images,
        )


class RandomMap(MapBaseline):
    """Uniform random scores per cell, seeded by the item's place in the benchmark."""

    key = "random"

    def __init__(self, seeds: Sequence[int]) -> None:
        self.seeds = list(seeds)

    def grid(self, item: int, image: int, shape: tuple[int, int]) -> np.ndarray:
        return np.random.default_rng([self.seeds[item], image]).random(shape)


class OracleMap(MapBaseline):
    """The share of each cell the evidence mask covers (zeros where there is no mask).
    The mask is laid over the whole image: right for processors that resize without cropping
    (the toys); an approximation where the processor crops."""

    key = "oracle"

    def __init__(self, masks: Sequence[np.ndarray | None]) -> None:
        self.masks = list(masks)

    def grid(self, item: int, image: int, shape: tuple[int, int]) -> np.ndarray:
        mask = self.masks[item]
        if mask is None or image > 0:
            return np.zeros(shape)
        return patch_coverage(mask[None], shape)[0]
