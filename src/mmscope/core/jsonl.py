"""Reading a user's JSONL data file: one JSON object a line, checked line by line.

Binary content, text that is not UTF-8, lines that are not JSON and JSON that is not an
object all raise ``InputError`` naming the file and the line, before any item is built.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mmscope.core.errors import InputError


def lines(path: str | Path) -> list[tuple[int, str]]:
    """The file's non-empty lines with their numbers (from 1)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror or err}") from None
    out = []
    for number, line in enumerate(raw.splitlines(), 1):
        if b"\x00" in line:
            raise InputError(f"{path}, line {number}: binary data, not JSON text")
        try:
            text = line.decode("utf-8-sig" if number == 1 else "utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{path}, line {number}: not UTF-8 text ({err.reason})") from None
        if text.strip():
            out.append((number, text))
    return out


def records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """Every line's JSON object with its line number."""
    out = []
    for number, text in lines(path):
        try:
            record = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"{path}, line {number}: not JSON ({err.msg})") from None
        except RecursionError:
            raise InputError(f"{path}, line {number}: JSON nested too deeply") from None
        if not isinstance(record, dict):
            raise InputError(f"{path}, line {number}: expected a JSON object, not {record!r:.40}")
        out.append((number, record))
    return out
