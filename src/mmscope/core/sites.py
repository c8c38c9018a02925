"""Sites: where a hook reads or writes, in roles, built by ``site`` instead of by hand.

A site names a role of the adapter, with a layer index when the role is one of a stack's
layers, and what is read there: ``site("lm.layer", 3)`` is the third language-model block's
output, ``site("lm.layer", 3, "mlp.act")`` its MLP activation, ``site("lm.layer", 3,
"attn.probs")`` its attention probabilities, ``site("lm.layer", 3, "attn.heads")`` the heads'
outputs side by side (the input of the output projection), ``site("projector")`` a role
without a stack. Adapters resolve sites (``VLM.resolve``); ``parse_site`` splits one back.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from mmscope.core.errors import SiteError

_INDEX = re.compile(r"\[(-?\d+)\]")
_NAME = re.compile(r"^[a-z_][a-z0-9_]*(\.[a-z_][a-z0-9_]*)*$")


@dataclass(frozen=True)
class Site:
    """A role, its layer index (``None`` for a role outside a stack) and the part read."""

    stack: str
    layer: int | None = None
    part: str = ""

    def __post_init__(self) -> None:
        for name in (self.stack, self.part) if self.part else (self.stack,):
            if not _NAME.match(name):
                raise SiteError(f"{name!r} is not a role name (dotted lower-case words)")
        if self.layer is not None and (
            isinstance(self.layer, bool) or not isinstance(self.layer, int)
        ):
            raise SiteError(f"a layer index is an integer, not {self.layer!r}")

    def __str__(self) -> str:
        where = self.stack if self.layer is None else f"{self.stack}[{self.layer}]"
        return f"{where}.{self.part}" if self.part else where

    @property
    def role(self) -> str:
        """The role without its index: ``"lm.layer.mlp.act"``."""
        return f"{self.stack}.{self.part}" if self.part else self.stack

    @classmethod
    def parse(cls, text: str) -> Site:
        """``Site.parse("lm.layer[3].mlp.act") == Site("lm.layer", 3, "mlp.act")``."""
        found = list(_INDEX.finditer(text))
        if len(found) > 1:
            raise SiteError(f"site {text!r} has more than one index")
        if not found:
            return cls(text)
        match = found[0]
        rest = text[match.end() :]
        if rest and (not rest.startswith(".") or rest == "."):
            raise SiteError(f"site {text!r}: what follows the index starts with '.' and a name")
        return cls(text[: match.start()], int(match.group(1)), rest[1:])


def site(stack: str, layer: int | None = None, part: str = "") -> str:
    """The site string of ``stack[layer].part``: ``site("lm.layer", 3, "mlp.act")``."""
    return str(Site(stack, layer, part))


def sites(stack: str, layers: Iterable[int], part: str = "") -> list[str]:
    """``site(stack, i, part)`` for every ``i`` of ``layers``."""
    return [site(stack, i, part) for i in layers]


def parse_site(text: str) -> tuple[str, int | None]:
    """Split ``"lm.layer[3].mlp.act"`` into the role ``"lm.layer.mlp.act"`` and index 3."""
    parsed = Site.parse(text)
    return parsed.role, parsed.layer
