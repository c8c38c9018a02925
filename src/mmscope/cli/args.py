"""Typed command-line flags, checked by the parser before any work: counts with a ceiling,
seeds, boxes, output folders and ``--set name=value`` settings typed by their annotations.
Every refusal is one line on stderr and exit status 2 (``Parser.error``)."""

from __future__ import annotations

import argparse
import inspect
import math
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from mmscope.core.errors import InputError
from mmscope.core.validate import MAX_ITEMS, MAX_SEED, folder_problem

_PREFIX = re.compile(r"^argument ([^:]+): (must be .*)$", re.DOTALL)


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line, as every other refusal is."""

    def error(self, message: str) -> NoReturn:
        message = _PREFIX.sub(r"\1 \2", " ".join(message.split()))
        self.exit(2, f"mmscope: error: {message} (see {self.prog} --help)\n")


def _integer(text: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, not {text!r}") from None


def count(maximum: int = MAX_ITEMS, minimum: int = 1) -> Callable[[str], int]:
    """A flag type: an integer in ``[minimum, maximum]`` (a count that scales work)."""

    def parse(text: str) -> int:
        value = _integer(text)
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(
                f"must be an integer in [{minimum}, {maximum:,}], not {text!r}"
            )
        return value

    parse.__name__ = "count"
    return parse


def seed(text: str) -> int:
    """A flag type: a seed in ``[0, 2**32 - 1]``."""
    value = _integer(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be a seed in [0, {MAX_SEED}], not {text!r}")
    return value


def box(text: str) -> tuple[float, float, float, float]:
    """A flag type: ``x0,y0,x1,y1`` in pixels, four finite numbers with x0 < x1 and y0 < y1."""
    parts = [p.strip() for p in text.split(",")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) != 4 or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"must be four numbers x0,y0,x1,y1, not {text!r}")
    x0, y0, x1, y1 = values
    if x0 >= x1 or y0 >= y1 or min(values) < 0:
        raise argparse.ArgumentTypeError(
            f"must be x0,y0,x1,y1 with 0 <= x0 < x1 and 0 <= y0 < y1, not {text!r}"
        )
    return x0, y0, x1, y1


def out_folder(text: str) -> str:
    """A flag type: a folder output can go to (existing, or creatable); nothing is touched."""
    problem = folder_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"must be a folder that can be written: {problem}")
    return text


def numbers(kind: type) -> Callable[[str], list[Any]]:
    """A flag type: comma-separated numbers of ``kind`` (``int`` or ``float``)."""

    def parse(text: str) -> list[Any]:
        try:
            values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        except ValueError:
            values = []
        if not values or not all(math.isfinite(v) for v in values):
            name = "integers" if kind is int else "numbers"
            raise argparse.ArgumentTypeError(f"must be comma-separated {name}, not {text!r}")
        return values

    parse.__name__ = f"{kind.__name__}s"
    return parse


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def typed(hint: Any, default: Any, text: str, name: str) -> Any:
    """``text`` of ``--set name=text`` as the setting's annotated type (``default``'s type
    where there is no annotation); words that are not of the type raise ``InputError``."""
    if hint is inspect.Parameter.empty:
        hint = type(default) if default not in (None, inspect.Parameter.empty) else str
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if text.strip().lower() == "none" and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        errors = []
        for option in sorted(options, key=lambda a: a is str):  # str last: it takes anything
            try:
                return typed(option, default, text, name)
            except InputError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise InputError(f"--set {name}={text!r}: {name} takes {_kinds(options)}")
    if origin in (tuple, list, Sequence) or hint in (tuple, list):
        parts = [v.strip() for v in text.split(",") if v.strip()]
        if origin is tuple and args and args[-1] is not Ellipsis:  # a fixed number of values
            if len(parts) != len(args):
                raise InputError(f"--set {name}={text!r}: {name} takes {len(args)} values")
            kinds = list(args)
        else:
            first = type(default[0]) if not args and default else str
            kinds = [args[0] if args else first] * len(parts)
        try:
            return tuple(typed(k, None, v, name) for k, v in zip(kinds, parts))
        except InputError:
            each = _kinds(sorted(set(kinds), key=str))
            raise InputError(f"--set {name}={text!r}: {name} takes {each} for each value") from None
    word = text.strip().lower()
    if hint is bool:
        if word not in _TRUE + _FALSE:
            raise InputError(f"--set {name}={text!r}: {name} takes true or false")
        return word in _TRUE
    if hint in (int, float):
        try:
            return hint(text.strip())
        except ValueError:
            raise InputError(f"--set {name}={text!r}: {name} takes {_kinds([hint])}") from None
    return text


def _kinds(hints: Sequence[Any]) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a word"}
    return " or ".join(names.get(h, getattr(h, "__name__", str(h))) for h in hints)


def one_line(message: str) -> str:
    """A message on one line (the CLI's refusals never span several)."""
    return " ".join(str(message).split())


def fail(message: str, status: int = 2) -> int:
    """Print ``mmscope: error: message`` on one line of stderr; return ``status``."""
    print(f"mmscope: error: {one_line(message)}", file=sys.stderr)
    return status
