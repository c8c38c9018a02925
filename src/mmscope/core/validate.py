"""Checks of method settings, raising ``InputError`` with the setting's name."""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Any

from mmscope.core.errors import InputError


def integer(name: str, value: Any, minimum: int | None = None) -> int:
    """``value`` as an int (bools refused), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InputError(f"{name} must be an integer, not {value!r}")
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be an integer of at least {minimum}, not {value!r}")
    return int(value)


def positive_int(name: str, value: Any) -> int:
    """An integer of at least 1."""
    return integer(name, value, minimum=1)


def valid_seed(value: Any) -> int:
    """A non-negative integer seed."""
    return integer("seed", value, minimum=0)


def number(name: str, value: Any) -> float:
    """A finite real number."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, not {value!r}")
    return float(value)
