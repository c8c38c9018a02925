"""One-call shortcuts over the analyses: ``mmscope.lens(vlm, inputs)``, ``mmscope.trace(...)``.

Keyword arguments that the analysis's ``__call__`` takes (``masks``, ``corrupted``,
``labels``, ``mean``) are data; every other keyword is a setting.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from mmscope.core.registry import REGISTRY
from mmscope.methods.analysis import KIND, make_analysis

if TYPE_CHECKING:
    from mmscope.core.inputs import Inputs
    from mmscope.core.targets import Target
    from mmscope.models.base import VLM


def analyse(key: str, vlm: VLM, inputs: Inputs, target: Target | None = None, **kwargs: Any) -> Any:
    """Run the registered analysis ``key``; ``kwargs`` split into data and settings."""
    import mmscope.methods  # noqa: F401  (registers them)

    call = inspect.signature(REGISTRY.get(key, KIND).obj.__call__).parameters
    data = {k: v for k, v in kwargs.items() if k in call}
    settings = {k: v for k, v in kwargs.items() if k not in call}
    return make_analysis(key, **settings)(vlm, inputs, target, **data)


def lens(vlm: VLM, inputs: Inputs, target: Target | None = None, **kwargs: Any) -> Any:
    """Logit lens over every layer and position (``LensResult``)."""
    return analyse("logit_lens", vlm, inputs, target, **kwargs)


def ablate_tokens(vlm: VLM, inputs: Inputs, target: Target | None = None, **kwargs: Any) -> Any:
    """Visual-token ablation (``AblationResult``); pass ``masks=`` for the object set."""
    return analyse("token_ablation", vlm, inputs, target, **kwargs)


def knockout(vlm: VLM, inputs: Inputs, target: Target | None = None, **kwargs: Any) -> Any:
    """Attention knockout over windows of layers (``KnockoutResult``)."""
    return analyse("attention_knockout", vlm, inputs, target, **kwargs)


def trace(
    vlm: VLM,
    clean: Inputs,
    corrupted: Inputs | None = None,
    target: Target | None = None,
    **kwargs: Any,
) -> Any:
    """Causal tracing (``PatchingResult``): noise on the image tokens, or ``corrupted``."""
    return analyse("causal_trace", vlm, clean, target, corrupted=corrupted, **kwargs)


def heads(vlm: VLM, inputs: Inputs, target: Target | None = None, **kwargs: Any) -> Any:
    """Head importance by ablation or head-mask gradient (``HeadResult``)."""
    return analyse("head_importance", vlm, inputs, target, **kwargs)


def prune(vlm: VLM, inputs: Inputs, target: Target | None = None, **kwargs: Any) -> Any:
    """FastV visual-token pruning: accuracy over layer K and ratio R (``PruningResult``)."""
    return analyse("fastv", vlm, inputs, target, **kwargs)


def first_token(vlm: VLM, inputs: Inputs, labels: Any, **kwargs: Any) -> Any:
    """First-token analysis with a probe for answerable vs not (``FirstTokenResult``)."""
    return analyse("first_token", vlm, inputs, None, labels=labels, **kwargs)
