"""``mmscope.explain``: the functional shortcut over the attribution registry."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import mmscope.methods  # noqa: F401  (registers the methods)
from mmscope.core.errors import InputError
from mmscope.core.explanation import Explanation
from mmscope.core.registry import REGISTRY
from mmscope.core.targets import Target

if TYPE_CHECKING:
    from mmscope.core.inputs import Inputs
    from mmscope.methods.attribution.base import Attribution
    from mmscope.models.base import VLM


def attribution_methods() -> list[str]:
    """Keys of every registered attribution method, sorted."""
    return sorted(e.key for e in REGISTRY.entries("method") if e.family.startswith("attribution/"))


def make_method(method: str, **settings: Any) -> Attribution:
    """An attribution method from its registry key and settings (bad ones raise InputError)."""
    entry = REGISTRY.get(method)
    if not entry.family.startswith("attribution/"):
        raise InputError(f"{method!r} is not an attribution method; see attribution_methods()")
    return REGISTRY.make(method, **settings)  # type: ignore[no-any-return]


def explain(
    vlm: VLM,
    inputs: Inputs,
    target: Target | None = None,
    method: str = "integrated_gradients",
    **settings: Any,
) -> Explanation:
    """Explain ``target`` on ``inputs`` with a registered attribution ``method``.

    >>> exp = mmscope.explain(vlm, inputs, Token("red"), method="grad_cam")
    """
    return make_method(method, **settings)(vlm, inputs, target)
