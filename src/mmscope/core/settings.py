"""Declared types and ranges of the settings of every registered class, checked in one place.

``Registry.make`` (and ``Registry.check``, which the command line calls before loading a
model) checks each setting against the type its ``__init__`` annotates and against a range:
the class's own ``SETTING_RANGES`` where it declares one, else the table below by setting
name, else, for integers, a ceiling of ``INT_CEILING``. So no method writes these checks by
hand, and a size that would allocate gigabytes is refused with one clear line before any work.
"""

from __future__ import annotations

import collections.abc as cabc
import inspect
import math
import types
import typing
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any

import numpy as np

from mmscope.core.errors import InputError
from mmscope.core.validate import MAX_ITEMS, MAX_NEW_TOKENS, MAX_SEED


@dataclass(frozen=True)
class Range:
    """Bounds of a number (or of every number of a sequence); ``None`` is unbounded."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # the lower bound itself is excluded
    hi_open: bool = False

    def contains(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def __str__(self) -> str:
        if self.lo is not None and self.hi is not None:
            return f"in {'(' if self.lo_open else '['}{_num(self.lo)}, {_num(self.hi)}" + (
                ")" if self.hi_open else "]"
            )
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {_num(self.lo)}"
        return f"{'<' if self.hi_open else '<='} {_num(self.hi)}" if self.hi is not None else ""


def _num(value: float) -> str:
    return f"{int(value):,}" if float(value).is_integer() and abs(value) >= 1e4 else f"{value:g}"


#: Ceiling of any integer setting without a declared range (sizes that scale memory).
INT_CEILING = 1_000_000
_COUNT = Range(1, INT_CEILING)
_BATCH = Range(1, 65_536)
_SHARE = Range(0, 1)
_POSITIVE = Range(0, None, lo_open=True)
_NON_NEGATIVE = Range(0, None)

#: Ranges by setting name, for every class that does not declare its own.
NAME_RANGES: dict[str, Range] = {
    "seed": Range(0, MAX_SEED),
    **dict.fromkeys(("batch_size", "items_batch", "batch_steps", "outputs_per_pass"), _BATCH),
    "steps": Range(1, 10_000),
    "samples": Range(1, 100_000),
    "masks": Range(1, 100_000),
    "n_images": Range(1, MAX_ITEMS),
    "max_new_tokens": Range(1, MAX_NEW_TOKENS),
    "pairs": Range(1, 10_000_000),
    "cells": Range(1, 1024),
    "stages": Range(1, 1000),
    "per_image": Range(1, 1000),
    "num_beams": Range(1, 64),
    "num_attn_candidates": Range(1, 64),
    "expansion": Range(1, 1024),
    "folds": Range(2, 1000),
    **dict.fromkeys(
        ("epochs", "captions", "channels", "save_every", "stride", "m", "rank", "k", "top"),
        _COUNT,
    ),
    **dict.fromkeys(("buffer", "start_layer", "top_k"), Range(0, INT_CEILING)),
    **dict.fromkeys(
        ("p", "top_p", "quantile", "share", "top_share", "min_cover", "min_iou", "ratios"),
        _SHARE,
    ),
    **dict.fromkeys(("p_start", "p_end", "beta", "tolerance"), _SHARE),
    "residual": Range(0, 1, hi_open=True),
    "percentile": Range(0, 100),
    **dict.fromkeys(("temperature", "lr", "c", "kernel_width"), _POSITIVE),
    **dict.fromkeys(("noise", "radius", "l1", "lam", "alpha", "penalty_weights"), _NON_NEGATIVE),
}


def declared_ranges(obj: Any) -> dict[str, Range]:
    """The ranges that apply to ``obj``'s settings: the name table, then its own."""
    return {**NAME_RANGES, **dict(getattr(obj, "SETTING_RANGES", {}))}


def setting_hints(obj: Any) -> dict[str, Any]:
    """``__init__`` annotations resolved to types; ones that cannot be resolved are left out."""
    init = obj.__init__ if inspect.isclass(obj) else obj
    try:
        return typing.get_type_hints(init)
    except Exception:  # a name only imported for type checking: resolve one by one
        found = {}
        space = getattr(init, "__globals__", {})
        for name, text in getattr(init, "__annotations__", {}).items():
            try:
                found[name] = eval(text, space) if isinstance(text, str) else text  # noqa: S307
            except Exception:
                continue
        return found


def _is_bool(value: Any) -> bool:
    return isinstance(value, (bool, np.bool_))


def conforms(value: Any, hint: Any) -> bool:
    """Whether ``value`` has the annotated type (any sequence passes for a tuple; a string is
    not a sequence here)."""
    if hint is Any or hint is inspect.Parameter.empty:
        return True
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(conforms(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint is bool:
        return _is_bool(value)
    if hint is int:
        return isinstance(value, Integral) and not _is_bool(value)
    if hint is float:
        return isinstance(value, Real) and not _is_bool(value)
    if origin in (tuple, list, cabc.Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (cabc.Sequence, np.ndarray)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(conforms, value, args))
        return not args or all(conforms(v, args[0]) for v in value)
    if origin in (dict, cabc.Mapping):
        return isinstance(value, cabc.Mapping)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return True  # a construct this check does not know: left to the class


def describe(hint: Any) -> str:
    """A reader's name for an annotated type (``int | None`` -> ``an integer or None``)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (tuple, list, cabc.Sequence):
        inner = args[0] if args else Any
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"{len(args)} values ({', '.join(describe(a) for a in args)})"
        return f"a list of {describe(inner).removeprefix('an ').removeprefix('a ')}s"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if hint is type(None):
        return "None"
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    return names.get(hint, f"a {getattr(hint, '__name__', str(hint))}")


def _numbers(value: Any) -> list[Any]:
    """The numbers a setting holds (itself, or the items of a list), bools excluded."""
    many = isinstance(value, (cabc.Sequence, np.ndarray)) and not isinstance(value, str)
    values = list(value) if many else [value]
    return [v for v in values if isinstance(v, Real) and not _is_bool(v)]


def check_settings(obj: Any, settings: dict[str, Any], where: str) -> None:
    """Refuse any setting of the registered ``obj`` whose type or range is wrong, naming the
    setting and the bad value (``InputError``). Settings ``obj`` does not name are left to
    the signature check."""
    if not settings:
        return
    hints = setting_hints(obj)
    ranges = declared_ranges(obj)
    params = inspect.signature(obj).parameters
    for name, value in settings.items():
        param = params.get(name)
        if param is None or param.kind is inspect.Parameter.VAR_KEYWORD:
            continue
        hint = hints.get(name, inspect.Parameter.empty)
        if hint is inspect.Parameter.empty and param.default not in (None, inspect.Parameter.empty):
            hint = type(param.default)
        if not conforms(value, hint):
            raise InputError(f"{where}: {name} must be {describe(hint)}, not {value!r}")
        bounds = ranges.get(name)
        for v in _numbers(value):
            if not math.isfinite(v):
                raise InputError(f"{where}: {name} must be a finite number, not {value!r}")
            if bounds is not None and not bounds.contains(v):
                raise InputError(f"{where}: {name} must be {bounds}, not {value!r}")
            if bounds is None and isinstance(v, Integral) and abs(int(v)) > INT_CEILING:
                raise InputError(
                    f"{where}: {name} = {value!r} is over the ceiling of {INT_CEILING:,} "
                    "(a ceiling on what one run allocates)"
                )


__all__ = [
    "INT_CEILING",
    "NAME_RANGES",
    "Range",
    "check_settings",
    "conforms",
    "describe",
    "setting_hints",
]
