"""The only module that touches torch hooks.

``capture``, ``patch``, ``ablate`` and ``mask_attention`` are context managers over *sites*
(``lm.layer[3]``, ``lm.layer[0].mlp.act``, ``vision.layer[1].attn.probs``, ``projector``)
resolved by the adapter; whatever they add is removed in ``finally``, also when the forward
raises (the TransformerLens habit). A site's value is its module's main output tensor; a
``.probs`` site is an attention module's probabilities and switches on eager attention for
the duration; a ``.heads`` site is the *input* of an attention's output projection, the
heads' outputs side by side (``(..., heads * head_dim)``), where heads are read and masked.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from typing import TYPE_CHECKING, Any

import torch

from mmscope.core.errors import SiteError

if TYPE_CHECKING:
    from mmscope.models.base import VLM

PatchFn = Callable[[torch.Tensor], torch.Tensor]


def _main(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


def _probs(output: Any, site: str) -> torch.Tensor:
    if not isinstance(output, tuple) or len(output) < 2 or output[1] is None:
        raise SiteError(
            f"{site} gave no attention probabilities: its attention implementation does not "
            "return them; load the model with attn_implementation='eager'"
        )
    return output[1]


def _replace(output: Any, value: torch.Tensor, probs: bool) -> Any:
    if not isinstance(output, tuple):
        return value
    index = 1 if probs else 0
    return output[:index] + (value,) + output[index + 1 :]


class Capture(Mapping[str, torch.Tensor]):
    """What ``capture`` recorded: ``cap[site]`` is the last call's tensor, ``cap.calls(site)``
    every call's (one per generation step), ``cap.grad(site)`` its gradient after backward."""

    def __init__(self) -> None:
        self._values: dict[str, list[torch.Tensor]] = defaultdict(list)
        self._grads: dict[str, list[torch.Tensor | None]] = defaultdict(list)

    def __getitem__(self, site: str) -> torch.Tensor:
        if not self._values.get(site):
            raise SiteError(f"nothing was captured at {site!r}; did the forward reach it?")
        return self._values[site][-1]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def calls(self, site: str) -> list[torch.Tensor]:
        return list(self._values.get(site, []))

    def grad(self, site: str) -> torch.Tensor:
        grads = self._grads.get(site) or []
        if not grads or grads[-1] is None:
            raise SiteError(f"no gradient reached {site!r}; run backward inside the block")
        return grads[-1]  # type: ignore[return-value]


def _attention_module(vlm: VLM, site: str) -> torch.nn.Module:
    """The attention module whose probabilities a ``.probs`` site reads."""
    return vlm.resolve(site.removesuffix(".probs"))


def additive_mask(
    module: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor | None, causal: bool
) -> torch.Tensor:
    """The attention mask an eager attention adds to its scores: ``(batch, 1, T, T)`` floats,
    from the boolean or missing mask that another implementation (SDPA) was given (a missing
    one means only causality, when ``causal``)."""
    batch, length = hidden.shape[0], hidden.shape[1]
    low = torch.finfo(hidden.dtype).min
    if mask is None:
        mask = torch.zeros(batch, 1, length, length, dtype=hidden.dtype, device=hidden.device)
        if causal:
            future = torch.ones(length, length, dtype=torch.bool, device=hidden.device).triu(1)
            mask = mask.masked_fill(future, low)
        return mask
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=hidden.dtype, device=mask.device).masked_fill(
            ~mask, low
        )
    return mask


def _eager_call(
    module: torch.nn.Module, args: Any, kwargs: dict[str, Any]
) -> tuple[Any, dict[str, Any]]:
    """Switch ``module`` alone to eager attention for this call, with the mask eager expects."""
    config: Any = module.config
    before = config._attn_implementation
    module._mmscope_attn_before = before  # type: ignore[union-attr]
    if before == "eager":
        return args, kwargs
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if hidden is None:
        raise SiteError("reading attention probabilities needs the attention's input")
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
    mask = additive_mask(module, hidden, kwargs.get("attention_mask"), causal)
    config._attn_implementation_internal = "eager"
    return args, {**kwargs, "attention_mask": mask}


def _restore_call(module: torch.nn.Module, args: Any, output: Any) -> None:
    before = module.__dict__.pop("_mmscope_attn_before", None)
    if before is not None:
        config: Any = module.config
        config._attn_implementation_internal = before


@contextmanager
def eager_attention(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Eager attention (which returns probabilities) at these attention modules only, the rest
    of the model as it is: attention probabilities cost memory only where they are read."""
    with ExitStack() as stack:
        for module in dict.fromkeys(modules):
            if getattr(module, "config", None) is None:  # not a transformers attention
                continue
            pre = module.register_forward_pre_hook(_eager_call, with_kwargs=True, prepend=True)
            stack.callback(pre.remove)
            post = module.register_forward_hook(_restore_call, always_call=True)
            stack.callback(post.remove)
        yield


def _reads_input(site: str) -> bool:
    return site.endswith(".heads")


@contextmanager
def _hooks(
    vlm: VLM,
    sites: Sequence[str],
    make: Callable[[str], Callable[..., Any]],
    prepend: bool = False,
) -> Iterator[None]:
    """Add ``make(site)`` as a forward hook at every site; ``prepend`` puts it before the
    module's other hooks (transformers records ``hidden_states`` with hooks of its own, which
    must see a patched output)."""
    modules = [(site, vlm.resolve(site)) for site in sites]  # resolve all before adding any
    with ExitStack() as stack:
        probs = [_attention_module(vlm, site) for site in sites if site.endswith(".probs")]
        stack.enter_context(eager_attention(probs))
        for site, module in modules:
            if _reads_input(site):
                handle = module.register_forward_pre_hook(make(site), prepend=prepend)
            else:
                handle = module.register_forward_hook(make(site), prepend=prepend)
            stack.callback(handle.remove)
        yield


@contextmanager
def capture(
    vlm: VLM, sites: str | Sequence[str], *, grads: bool = False, detach: bool | None = None
) -> Iterator[Capture]:
    """Record the output of each site during the forward passes inside the block.

    Args:
        sites: one site or several.
        grads: also record the gradient of each site's output on backward (the tensors are
            then kept in the graph, not detached).
        detach: detach recorded values (default: not ``grads``).
    """
    names = [sites] if isinstance(sites, str) else list(sites)
    keep_graph = grads if detach is None else not detach
    cap = Capture()

    def make(site: str) -> Callable[..., None]:
        probs = site.endswith(".probs")

        def hook(module: torch.nn.Module, args: Any, output: Any = None) -> None:
            if _reads_input(site):
                value = args[0]
            else:
                value = _probs(output, site) if probs else _main(output)
            cap._values[site].append(value if keep_graph else value.detach())
            if grads and value.requires_grad:
                slot = len(cap._grads[site])
                cap._grads[site].append(None)

                def store(grad: torch.Tensor, site: str = site, slot: int = slot) -> None:
                    cap._grads[site][slot] = grad

                value.register_hook(store)  # lives on the tensor, freed with the graph

        return hook

    with _hooks(vlm, names, make):
        yield cap


@contextmanager
def patch(vlm: VLM, patches: Mapping[str, PatchFn]) -> Iterator[None]:
    """Replace each site's output by ``fn(output)`` during the forwards inside the block."""

    def make(site: str) -> Callable[..., Any]:
        probs = site.endswith(".probs")
        fn = patches[site]

        def hook(module: torch.nn.Module, args: Any, output: Any = None) -> Any:
            if _reads_input(site):
                return (fn(args[0]), *args[1:])
            value = _probs(output, site) if probs else _main(output)
            return _replace(output, fn(value), probs)

        return hook

    with _hooks(vlm, list(patches), make, prepend=True):
        yield


@contextmanager
def ablate(
    vlm: VLM,
    sites: str | Sequence[str],
    *,
    positions: Sequence[int] | slice | None = None,
    units: Sequence[int] | None = None,
    value: float | torch.Tensor = 0.0,
) -> Iterator[None]:
    """Set the output of each site to ``value`` at sequence ``positions`` and feature ``units``
    (all when ``None``): zero-ablation by default, mean-ablation when given a mean tensor."""
    names = [sites] if isinstance(sites, str) else list(sites)
    pos = slice(None) if positions is None else positions
    index_units = slice(None) if units is None else list(units)

    def fn(out: torch.Tensor) -> torch.Tensor:
        # batched outputs are (batch, seq, ...); unbatched ones (Qwen2-VL's vision) (seq, ...)
        seq_dim = 1 if out.dim() >= 3 else 0
        out = out.clone()
        if isinstance(pos, slice):
            index = torch.arange(out.shape[seq_dim], device=out.device)[pos]
        else:
            index = torch.as_tensor(list(pos), device=out.device, dtype=torch.long)
        sel = out.index_select(seq_dim, index)
        sel[..., index_units] = value.to(out) if torch.is_tensor(value) else value
        return out.index_copy(seq_dim, index, sel)

    with patch(vlm, {site: fn for site in names}):
        yield


@contextmanager
def mask_attention(vlm: VLM, blocked: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """Forbid attention between chosen (query, key) pairs at attention sites (``lm.layer[3].attn``).

    ``blocked[site]`` is bool ``(batch, queries, keys)`` or ``(queries, keys)``, True where the
    query may not read the key: the pair is masked before the softmax, which renormalises
    over the keys left (attention knockout; FastV's pruning, as seen from the kept tokens).
    Runs with eager attention, whose additive mask every architecture accepts.
    """
    modules = [(vlm.resolve(site), block) for site, block in blocked.items()]

    def make(block: torch.Tensor) -> Callable[..., Any]:
        def hook(module: torch.nn.Module, args: Any, kwargs: dict[str, Any]) -> Any:
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            if hidden is None:
                raise SiteError("mask_attention needs an attention module called with its input")
            causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", False)))
            mask = additive_mask(module, hidden, kwargs.get("attention_mask"), causal)
            cut = block.to(mask.device)
            cut = cut.view(-1, 1, *cut.shape[-2:])[..., : mask.shape[-2], : mask.shape[-1]]
            low = torch.tensor(torch.finfo(mask.dtype).min, dtype=mask.dtype, device=mask.device)
            mask = torch.where(cut, low, mask)
            return args, {**kwargs, "attention_mask": mask}

        return hook

    with ExitStack() as stack:
        stack.enter_context(eager_attention([module for module, _ in modules]))
        for module, block in modules:
            handle = module.register_forward_pre_hook(make(block), with_kwargs=True)
            stack.callback(handle.remove)
        yield
