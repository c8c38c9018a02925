"""mmscope: explain and interpret multimodal large language models.

>>> import mmscope
>>> vlm = mmscope.load("toy-llava")
>>> inputs = vlm.prepare(image, "what color is the circle ?")
>>> vlm.generate(inputs)

Heavy modules (torch, transformers) load on first use, so ``mmscope.world`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from mmscope.core.errors import MMScopeError

if TYPE_CHECKING:
    from mmscope.core.explanation import Explanation
    from mmscope.core.inputs import ImageSpan, Inputs
    from mmscope.core.registry import REGISTRY, register
    from mmscope.core.targets import (
        AnswerLogProb,
        Contrast,
        Generated,
        Predicted,
        Similarity,
        Token,
        TokenId,
    )
    from mmscope.decoding import decoders, generate
    from mmscope.decoding.explain import explain_hallucination
    from mmscope.methods.analysis import analyses
    from mmscope.methods.explain import attribution_methods, explain
    from mmscope.methods.inside import (
        ablate_tokens,
        analyse,
        first_token,
        heads,
        knockout,
        lens,
        prune,
        trace,
    )
    from mmscope.methods.neuron.edit import edited
    from mmscope.methods.study import studies, study
    from mmscope.models import VLM, load

__version__ = "0.1.0"
_LAZY = {
    "ImageSpan": "mmscope.core.inputs",
    "Inputs": "mmscope.core.inputs",
    "REGISTRY": "mmscope.core.registry",
    "register": "mmscope.core.registry",
    "VLM": "mmscope.models",
    "load": "mmscope.models",
    "Explanation": "mmscope.core.explanation",
    "explain": "mmscope.methods.explain",
    "attribution_methods": "mmscope.methods.explain",
    "analyses": "mmscope.methods.analysis",
    "decoders": "mmscope.decoding",
    "generate": "mmscope.decoding",
    "explain_hallucination": "mmscope.decoding.explain",
    "study": "mmscope.methods.study",
    "studies": "mmscope.methods.study",
    "edited": "mmscope.methods.neuron.edit",
    **{
        name: "mmscope.methods.inside"
        for name in (
            "ablate_tokens",
            "analyse",
            "first_token",
            "heads",
            "knockout",
            "lens",
            "prune",
            "trace",
        )
    },
    **{
        name: "mmscope.core.targets"
        for name in (
            "AnswerLogProb",
            "Contrast",
            "Generated",
            "Predicted",
            "Similarity",
            "Token",
            "TokenId",
        )
    },
}
__all__ = [
    "MMScopeError",
    "ImageSpan",
    "Inputs",
    "REGISTRY",
    "register",
    "VLM",
    "load",
    "Explanation",
    "explain",
    "attribution_methods",
    "analyses",
    "analyse",
    "decoders",
    "generate",
    "explain_hallucination",
    "study",
    "studies",
    "edited",
    "lens",
    "ablate_tokens",
    "knockout",
    "trace",
    "heads",
    "prune",
    "first_token",
    "AnswerLogProb",
    "Contrast",
    "Generated",
    "Predicted",
    "Similarity",
    "Token",
    "TokenId",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mmscope' has no attribute {name!r}")
