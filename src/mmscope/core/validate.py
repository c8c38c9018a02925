"""Checks of method settings, raising ``InputError`` with the setting's name."""

from __future__ import annotations

import math
import os
from numbers import Integral, Real
from pathlib import Path
from typing import Any

from mmscope.core.errors import InputError

#: Largest seed accepted anywhere (numpy's and torch's generators both take it).
MAX_SEED = 2**32 - 1
#: Most items (world questions, scenes, data records) one run builds in memory.
MAX_ITEMS = 100_000
#: Most tokens one generation asks for.
MAX_NEW_TOKENS = 4096


def integer(
    name: str, value: Any, minimum: int | None = None, maximum: int | None = None
) -> int:
    """``value`` as an int (bools refused), within ``[minimum, maximum]`` where given."""
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InputError(f"{name} must be an integer, not {value!r}")
    if minimum is not None and value < minimum:
        raise InputError(f"{name} must be an integer of at least {minimum}, not {value!r}")
    if maximum is not None and int(value) > maximum:
        raise InputError(
            f"{name} must be an integer of at most {maximum:,}, not {value!r} "
            "(a ceiling on what one run holds in memory)"
        )
    return int(value)


def count(name: str, value: Any, maximum: int = MAX_ITEMS) -> int:
    """A positive integer that scales work or memory, so with a ceiling."""
    return integer(name, value, minimum=1, maximum=maximum)


def positive_int(name: str, value: Any) -> int:
    """An integer of at least 1."""
    return integer(name, value, minimum=1)


def valid_seed(value: Any) -> int:
    """A seed in ``[0, 2**32 - 1]``."""
    return integer("seed", value, minimum=0, maximum=MAX_SEED)


def number(name: str, value: Any) -> float:
    """A finite real number."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, not {value!r}")
    return float(value)


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why output cannot go to the folder ``path`` (``None`` when it can): it is an existing
    file, or the nearest existing parent is a file or not writable. Nothing is touched."""
    if "\x00" in os.fspath(path):
        return f"{os.fspath(path)!r} cannot be used (it holds a NUL byte)"
    try:
        folder = Path(path).expanduser()
        if folder.exists() and not folder.is_dir():
            return f"{folder} is an existing file"
        parent = folder
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            return f"{folder} cannot be created, {parent} is a file"
        if not os.access(parent, os.W_OK | os.X_OK):
            return f"{folder} cannot be created, {parent} is not writable"
    except (OSError, ValueError) as err:  # a name the system refuses (a NUL byte, too long)
        return f"{os.fspath(path)!r} cannot be used ({err})"
    return None


def output_folder(path: str | os.PathLike, name: str = "the output folder") -> Path:
    """``path`` as a folder output can go to (``folder_problem``), refused with
    ``InputError`` before anything is written, so what is there stays as it was."""
    problem = folder_problem(path)
    if problem is not None:
        raise InputError(f"{name} must be a folder that can be written: {problem}")
    return Path(path).expanduser()
