"""One generic registry for methods, metrics, decoders and model adapters.

``@register("grad_cam", kind="method", family="attribution/cam", paper=..., level=...)``
adds a class under a key; duplicate keys raise. Lookups never use if/elif string dispatch.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from mmscope.core.errors import InputError, RegistryError
from mmscope.core.settings import check_settings
from mmscope.core.taxonomy import LEVELS

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """A registered object and what is said about it."""

    key: str
    kind: str
    obj: Any
    family: str = ""
    paper: str = ""
    level: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class Registry:
    """A mapping ``(kind, key) -> Entry`` with a decorator to fill it."""

    def __init__(self) -> None:
        self._entries: dict[tuple[str, str], Entry] = {}

    def register(
        self,
        key: str,
        *,
        kind: str = "method",
        family: str = "",
        paper: str = "",
        level: str = "",
        **extra: Any,
    ) -> Callable[[T], T]:
        """Decorator registering a class (or function) under ``key`` for ``kind``."""

        if level and level not in LEVELS:
            raise RegistryError(f"level {level!r} of {key!r} is not one of {', '.join(LEVELS)}")

        def decorate(obj: T) -> T:
            if (kind, key) in self._entries:
                raise RegistryError(f"{kind} {key!r} is already registered")
            self._entries[(kind, key)] = Entry(key, kind, obj, family, paper, level, dict(extra))
            return obj

        return decorate

    def get(self, key: str, kind: str = "method") -> Entry:
        """The entry for ``key``; an unknown key raises with the known ones listed."""
        try:
            return self._entries[(kind, key)]
        except KeyError:
            known = ", ".join(sorted(self.keys(kind))) or "none"
            raise RegistryError(f"unknown {kind} {key!r}; known: {known}") from None

    def check(self, key: str, kind: str = "method", **settings: Any) -> Entry:
        """Check ``settings`` of ``key`` without making it, before any model work: settings it
        does not take, and each setting's declared type and range (``core.settings``), raise
        ``InputError`` naming the setting and the bad value."""
        entry = self.get(key, kind)
        try:
            inspect.signature(entry.obj).bind(**settings)
        except TypeError as err:
            params = ", ".join(inspect.signature(entry.obj).parameters)
            raise InputError(f"{kind} {key} takes the settings ({params}): {err}") from None
        check_settings(entry.obj, settings, f"{kind} {key}")
        return entry

    def make(self, key: str, kind: str = "method", **settings: Any) -> Any:
        """An instance of the registered class ``key`` with ``settings``, checked first
        (``check``)."""
        return self.check(key, kind, **settings).obj(**settings)

    def keys(self, kind: str = "method") -> list[str]:
        return [k for (knd, k) in self._entries if knd == kind]

    def entries(self, kind: str | None = None) -> Iterator[Entry]:
        return (e for (knd, _), e in self._entries.items() if kind is None or knd == kind)

    def unregister(self, key: str, kind: str = "method") -> None:
        """Remove an entry (for tests and plug-ins that replace one)."""
        self._entries.pop((kind, key), None)


REGISTRY = Registry()
register = REGISTRY.register
