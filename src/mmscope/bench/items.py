"""A user's items (``mmscope.world.items.BenchItem``) from JSONL: one object per line with
``image`` (a path relative to the file or to ``images_dir``), ``question`` / ``text`` /
``prompt``, optionally ``answer`` / ``label``, and optionally the evidence as ``mask_rle``
(``mmscope.world.rle``), ``boxes`` (``[[x0, y0, x1, y1], ...]`` in pixels, end-exclusive)
or ``bbox``. POPE files load as they are; so do the annotations ``mmscope world sample``
writes (every question of every image becomes an item). Every field is checked (types, boxes,
masks against their image, evidence indices against the objects) and every image goes through
``core.images.load_image`` with its 50-megapixel guard; errors name the file and line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmscope.core.errors import InputError
from mmscope.core.images import load_image
from mmscope.core.jsonl import records
from mmscope.core.validate import MAX_ITEMS
from mmscope.world.items import BenchItem
from mmscope.world.rle import decode_rle


def _first(record: dict[str, Any], *keys: str) -> Any:
    return next((record[k] for k in keys if k in record), None)


def _box(box: Any, key: str) -> tuple[int, int, int, int]:
    """``[x0, y0, x1, y1]``: four finite numbers."""
    ok = isinstance(box, (list, tuple)) and len(box) == 4
    if ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in box):
        if all(math.isfinite(v) for v in box):
            x0, y0, x1, y1 = (int(round(v)) for v in box)
            return x0, y0, x1, y1
    raise InputError(f"{key} must be [x0, y0, x1, y1] in pixels (four numbers), not {box!r}")


def _rle(rle: Any, height: int, width: int) -> np.ndarray:
    """An RLE mask of the image's size (the size is checked before anything is decoded)."""
    if not isinstance(rle, dict) or not isinstance(rle.get("counts"), list):
        raise InputError(f"mask_rle must be {{'size': [h, w], 'counts': [...]}}, not {rle!r:.80}")
    if rle.get("size") != [height, width]:
        got = rle.get("size")
        raise InputError(f"mask_rle of size {got!r} does not match the image {[height, width]}")
    try:
        return np.asarray(decode_rle(rle), dtype=bool)
    except (ValueError, TypeError, OverflowError) as err:
        raise InputError(f"mask_rle is not a valid run-length mask: {err}") from None


def _mask(record: dict[str, Any], size: tuple[int, int]) -> np.ndarray | None:
    width, height = size
    if "mask_rle" in record:
        return _rle(record["mask_rle"], height, width)
    if "boxes" in record:
        if not isinstance(record["boxes"], list):
            raise InputError(f"boxes must be a list of [x0, y0, x1, y1], not {record['boxes']!r}")
        boxes = [_box(b, "each of boxes") for b in record["boxes"]]
    elif "bbox" in record:
        boxes = [_box(record["bbox"], "bbox")]
    else:
        return None
    if not boxes:
        return None
    mask = np.zeros((height, width), dtype=bool)
    for x0, y0, x1, y1 in boxes:
        mask[max(0, y0) : min(height, y1), max(0, x0) : min(width, x1)] = True
    return mask


def _text(record: dict[str, Any], key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"{key} must be a non-empty string, not {value!r}")
    return value


def _answer(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InputError(f"an answer must be a string or a number, not {value!r}")
    return str(value)


def _world_records(record: dict[str, Any], image: Image.Image) -> list[BenchItem]:
    """The items of one ``mmscope world sample`` annotation: every question of the image."""
    objects, questions = record["objects"], record["questions"]
    if not isinstance(objects, list) or not all(isinstance(o, dict) for o in objects):
        raise InputError("objects must be a list of objects ({...} each)")
    if not isinstance(questions, list) or not all(isinstance(q, dict) for q in questions):
        raise InputError("questions must be a list of questions ({...} each)")
    masks = [_mask(o, image.size) for o in objects]
    items = []
    for q in questions:
        evidence = q.get("evidence", [])
        if not isinstance(evidence, list):
            raise InputError(f"evidence must be a list of object indices, not {evidence!r}")
        for i in evidence:
            if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < len(objects):
                raise InputError(
                    f"evidence index {i!r} names no object (the image has {len(objects)})"
                )
        chosen = [m for i in evidence if (m := masks[i]) is not None]
        mask = np.any(chosen, axis=0) if chosen else None
        text, answer, kind = _text(q, "text"), _answer(q.get("answer")), str(q.get("type", ""))
        items.append(BenchItem(image, text, answer, mask, kind))
    return items


def _records(record: dict[str, Any], image: Image.Image) -> list[BenchItem]:
    if "questions" in record and "objects" in record:  # `mmscope world sample` annotations
        return _world_records(record, image)
    prompt = _first(record, "question", "text", "prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("a record needs a question (keys question, text or prompt)")
    answer = _answer(_first(record, "answer", "label"))
    kind = str(record.get("type", ""))
    return [BenchItem(image, prompt, answer, _mask(record, image.size), kind)]


def load_items(
    path: str | Path, images_dir: str | Path | None = None, *, allow_large: bool = False
) -> list[BenchItem]:
    """Items from a JSONL file (see the module docstring); errors name the file and line.

    Args:
        path: the JSONL file, or a folder holding ``annotations.jsonl``.
        images_dir: where the records' images are (default: the file's folder).
        allow_large: accept images over 50 megapixels (``core.images``).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "annotations.jsonl"
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    root = Path(images_dir) if images_dir is not None else path.parent
    items: list[BenchItem] = []
    images: dict[str, Image.Image] = {}  # each image file is read once
    for number, record in records(path):
        try:
            if "image" not in record:
                raise InputError("a record needs an image")
            name = record["image"]
            if not isinstance(name, str) or not name.strip():
                raise InputError(f"image must be a file name, not {name!r}")
            if name not in images:
                images[name] = load_image(root / name, allow_large=allow_large)
            items.extend(_records(record, images[name]))
        except (InputError, KeyError, TypeError) as err:
            raise InputError(f"{path}, line {number}: {err}") from None
        if len(items) > MAX_ITEMS:
            raise InputError(f"{path} holds more than {MAX_ITEMS:,} items; split it")
    if not items:
        raise InputError(f"{path} holds no items")
    return items
