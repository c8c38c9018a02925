"""What an adapter can do, declared once, and the one place that checks a method's needs.

An adapter declares its capabilities (``VLM.capabilities``); a registered entry declares what it
needs (``@register(..., needs=("generates",))``). ``require`` refuses a model that lacks a need
with ``NotApplicableError`` naming the method, the model and the reason, before any work, and
``applicability`` says for a loaded model which entries apply and why the others do not (what
``mmscope methods --model`` prints).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from mmscope.core.errors import NotApplicableError, RegistryError
from mmscope.core.sites import site

if TYPE_CHECKING:
    from mmscope.core.registry import Entry
    from mmscope.models.base import VLM


@dataclass(frozen=True)
class Capabilities:
    """What one model can do.

    Attributes:
        generates: it continues a prompt with text (decoder VLMs).
        contrastive: it scores image-text pairs (dual encoders: CLIP, SigLIP).
        images_in: where image tokens meet the text: ``"sequence"`` (image tokens sit in the
            language model's sequence), ``"cross_attention"`` (the language model reads them
            through cross-attention layers) or ``"none"`` (two towers, no joint sequence).
        attention: the layer stacks (``"lm.layer"``, ``"vision.layer"``, ``"text.layer"``)
            whose attention probabilities can be read (``<stack>[i].attn.probs``).
        class_token: the vision tower's sequence starts with a class token.
        video: it takes video input.
        audio: it takes audio input.
    """

    generates: bool = False
    contrastive: bool = False
    images_in: str = "sequence"
    attention: tuple[str, ...] = ()
    class_token: bool = False
    video: bool = False
    audio: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: Each need a registered entry may declare: (test on the capabilities, what it means).
NEEDS: dict[str, tuple[Any, str]] = {
    "generates": (lambda c: c.generates, "generates text"),
    "contrastive": (lambda c: c.contrastive, "is a contrastive dual encoder (CLIP-style)"),
    "lm_image_tokens": (
        lambda c: c.images_in == "sequence" and c.generates,
        "has its image tokens in the language model's sequence",
    ),
    "image_positions": (
        lambda c: c.images_in != "cross_attention",
        "has its image tokens at positions of the sequence its output is read from (a "
        "decoder's language model, a dual encoder's vision tower), not behind cross-attention",
    ),
    "lm_attention": (
        lambda c: "lm.layer" in c.attention,
        "exposes its language model's attention probabilities",
    ),
    "vision_attention": (
        lambda c: "vision.layer" in c.attention,
        "exposes its vision tower's attention probabilities",
    ),
    "class_token": (lambda c: c.class_token, "has a class token in its vision tower"),
    "video": (lambda c: c.video, "takes video"),
    "audio": (lambda c: c.audio, "takes audio"),
}


#: What every entry of a kind needs, on top of its own ``needs``.
KIND_NEEDS: dict[str, tuple[str, ...]] = {"decoder": ("generates",)}


def entry_needs(entry: Entry) -> tuple[str, ...]:
    """Everything a registered entry needs: its kind's needs and its own."""
    return KIND_NEEDS.get(entry.kind, ()) + tuple(entry.extra.get("needs", ()))


def missing(vlm: VLM, needs: Iterable[str]) -> list[str]:
    """The needs of ``needs`` that ``vlm`` lacks, as phrases ("generates text", ...)."""
    caps = vlm.capabilities
    out = []
    for need in needs:
        if need not in NEEDS:
            raise RegistryError(f"unknown need {need!r}; known: {', '.join(NEEDS)}")
        test, phrase = NEEDS[need]
        if not test(caps):
            out.append(phrase)
    return out


def why_not(vlm: VLM, needs: Iterable[str], who: str) -> str | None:
    """Why ``who`` does not apply to ``vlm`` (one sentence), or ``None`` when it does."""
    lacking = missing(vlm, needs)
    if not lacking:
        return None
    what = vlm.family + (", a contrastive encoder" if vlm.capabilities.contrastive else "")
    return f"{who} needs a model that {' and '.join(lacking)}; {vlm.name} ({what}) does not"


def require(vlm: VLM, needs: Iterable[str], who: str) -> None:
    """Raise ``NotApplicableError`` when ``vlm`` lacks one of ``needs``."""
    reason = why_not(vlm, needs, who)
    if reason:
        raise NotApplicableError(reason)


def require_entry(vlm: VLM, obj: object, kind: str) -> None:
    """``require`` with what the registered class of ``obj`` needs (its kind's needs for a
    class that is not registered)."""
    from mmscope.core.registry import REGISTRY

    for entry in REGISTRY.entries(kind):
        if entry.obj is type(obj):
            require(vlm, entry_needs(entry), f"{kind} {entry.key}")
            return
    require(vlm, KIND_NEEDS.get(kind, ()), f"{kind} {type(obj).__name__}")


def checks_needs(call: Callable[..., Any], kind: str) -> Callable[..., Any]:
    """Wrap an entry's ``__call__(self, vlm, ...)`` so that it first checks ``vlm``'s
    capabilities against what the entry needs (used by the bases' ``__init_subclass__``)."""

    @functools.wraps(call)
    def checked(self: Any, vlm: VLM, *args: Any, **kwargs: Any) -> Any:
        require_entry(vlm, self, kind)
        return call(self, vlm, *args, **kwargs)

    return checked


def applicability(vlm: VLM, entries: Iterable[Entry]) -> list[tuple[Entry, str | None]]:
    """Each entry with ``None`` (it applies) or the reason it does not, from declared needs."""
    return [(e, why_not(vlm, entry_needs(e), f"{e.kind} {e.key}")) for e in entries]


def softmax_only(
    vlm: VLM, stack: str, layers: Sequence[int], who: str
) -> tuple[list[int], dict[str, str]]:
    """``layers`` of ``stack`` split into those with softmax attention (kept, in order) and the
    skipped others as ``{site: why}`` (``{"lm.layer[1]": "linear attention (...)"}``): what a
    method that reads or masks attention probabilities over many layers runs on and records.
    Warns once when it skips a layer; ``NotApplicableError`` when no layer is left."""
    other = vlm.non_softmax_layers(stack)
    if not other:
        return list(layers), {}
    n = vlm.num_layers(stack)
    kept = [i for i in layers if i % n not in other]
    skipped = {site(stack, i): other[i % n] for i in layers if i % n in other}
    if skipped:
        why = "; ".join(sorted(set(skipped.values())))
        if not kept:
            raise NotApplicableError(
                f"{who} reads softmax attention, and {', '.join(skipped)} of {vlm.name} have "
                f"none ({why})"
            )
        warnings.warn(
            f"{who} skips {', '.join(skipped)} of {vlm.name} ({why}) and runs on the "
            f"softmax-attention layers {kept}",
            stacklevel=3,
        )
    return kept, skipped


def require_softmax(vlm: VLM, stack: str, layer: int, who: str) -> None:
    """``NotApplicableError`` when a method is asked for the attention probabilities (or an
    attention mask) of ``stack[layer]`` and that layer has no softmax attention."""
    other = vlm.non_softmax_layers(stack)
    n = vlm.num_layers(stack) if other else 0
    if other and -n <= layer < n and layer % n in other:
        raise NotApplicableError(
            f"{who} reads the softmax attention of {site(stack, layer)}, and that layer of "
            f"{vlm.name} has none ({other[layer % n]}); its softmax-attention layers are "
            f"{vlm.softmax_layers(stack)}"
        )
