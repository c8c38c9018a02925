"""A fingerprint of everything a method must leave unchanged on a model."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

#: transformers (>= 5) adds these output-recording hooks on a model's first forward that records
#: hidden states (LLaVA's vision tower does on every image) and keeps them: its own inert
#: machinery, not hooks a method added, so the fingerprint leaves them out.
_TRANSFORMERS_HOOKS = ("output_capturing_hook",)


def _hook_count(model: torch.nn.Module) -> int:
    total = 0
    for module in model.modules():
        for name in (
            "_forward_hooks",
            "_forward_pre_hooks",
            "_backward_hooks",
            "_backward_pre_hooks",
            "_state_dict_hooks",
            "_load_state_dict_pre_hooks",
        ):
            hooks = getattr(module, name, {}).values()
            total += sum(getattr(h, "__name__", "") not in _TRANSFORMERS_HOOKS for h in hooks)
    return total


@dataclass(frozen=True)
class ModelState:
    """Parameters (checksums), hooks, train/eval modes, requires_grad, grad mode, attention."""

    params: tuple[tuple[str, float, tuple[int, ...], torch.dtype], ...]
    hooks: int
    modes: tuple[bool, ...]
    requires_grad: tuple[bool, ...]
    grad_enabled: bool
    attention: str
    grads_present: tuple[bool, ...]


def model_state(model: torch.nn.Module) -> ModelState:
    """Snapshot of ``model`` (and the global grad mode) for before/after comparisons."""
    with torch.no_grad():
        params = tuple(
            (name, float(p.double().sum()) + float(p.double().abs().sum()), tuple(p.shape), p.dtype)
            for name, p in model.named_parameters()
        )
    config = getattr(model, "config", None)
    return ModelState(
        params=params,
        hooks=_hook_count(model),
        modes=tuple(m.training for m in model.modules()),
        requires_grad=tuple(p.requires_grad for p in model.parameters()),
        grad_enabled=torch.is_grad_enabled(),
        attention=str(getattr(config, "_attn_implementation", "")),
        grads_present=tuple(p.grad is not None for p in model.parameters()),
    )


@contextmanager
def preserved(model: torch.nn.Module) -> Iterator[None]:
    """Run a method on ``model`` in eval mode with frozen parameters, then put back every
    module's mode, every ``requires_grad`` flag and the grad mode, also when it raises.

    Methods take gradients with ``torch.autograd.grad`` only, so no ``.grad`` is written.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    grad_enabled = torch.is_grad_enabled()
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, flag in flags:
            p.requires_grad_(flag)
        torch.set_grad_enabled(grad_enabled)
