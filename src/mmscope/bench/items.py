"""The items a benchmark scores: an image, a prompt, the expected answer, the evidence mask.

From the world (seeded, with exact masks) or from a user's JSONL: one object per line with
``image`` (a path relative to the file or to ``images_dir``), ``question`` / ``text`` /
``prompt``, optionally ``answer`` / ``label``, and optionally the evidence as ``mask_rle``
(``mmscope.world.rle``), ``boxes`` (``[[x0, y0, x1, y1], ...]`` in pixels, end-exclusive)
or ``bbox``. POPE files load as they are; so do the annotations ``mmscope world sample``
writes (every question of every image becomes an item).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmscope.core.errors import InputError
from mmscope.core.validate import positive_int
from mmscope.world import Scene, make_samples, unanswerable
from mmscope.world.dataset import WorldSample
from mmscope.world.questions import Question
from mmscope.world.rle import decode_rle

#: Seed of the benchmark's world items: never used to train or evaluate the toys.
BENCH_SEED = 424_242


@dataclass(frozen=True, eq=False)
class BenchItem:
    """One scored question.

    Attributes:
        image: the image.
        prompt: the question (for CLIP: the text scored against the image).
        answer: the expected answer, ``""`` where unknown (then every answer counts as right).
        mask: bool ``(height, width)`` evidence in the image's pixels, or ``None``.
        kind: the question type, where known.
        scene: the world scene the image shows (world items only): the truth that the
            neuron- and embedding-level studies score against.
        objects: bool masks ``(n_objects, height, width)`` in the order of ``scene.objects``.
        evidence: indices of the objects the question is about.
    """

    image: Image.Image
    prompt: str
    answer: str = ""
    mask: np.ndarray | None = field(default=None, repr=False)
    kind: str = ""
    scene: Scene | None = field(default=None, repr=False)
    objects: np.ndarray | None = field(default=None, repr=False)
    evidence: tuple[int, ...] = ()


def world_items(n: int, seed: int = BENCH_SEED, contrastive: bool = False) -> list[BenchItem]:
    """``n`` world items, question types in turn; for CLIP, ``"a {color} {shape}"`` of one
    object with that object's mask."""
    out = []
    for i, sample in enumerate(make_samples(positive_int("n", n), seed)):
        if contrastive:
            j = i % len(sample.scene.objects)
            name = sample.scene.objects[j].name
            truth = (sample.scene, sample.masks, (j,))
            out.append(BenchItem(sample.image, f"a {name}", "", sample.masks[j], "object", *truth))
        else:
            out.append(question_item(sample, sample.questions[i % len(sample.questions)]))
    return out


def question_item(sample: WorldSample, q: Question) -> BenchItem:
    """A world sample asked ``q``, with the mask of its evidence and the scene's truth."""
    mask = np.any(sample.masks[list(q.evidence)], axis=0) if q.evidence else None
    truth = (sample.scene, sample.masks, tuple(q.evidence))
    return BenchItem(sample.image, q.text, q.answer, mask, q.type, *truth)


def item_scenes(items: Sequence[BenchItem], scenes: Sequence[Scene] | None = None) -> list[Scene]:
    """The world scene of each item: ``scenes`` when given, else the items' own
    (``bench.world_items`` keep theirs); a user's items have none and raise ``InputError``."""
    if scenes is not None:
        if len(scenes) != len(items):
            raise InputError(f"{len(scenes)} scenes for {len(items)} items")
        return list(scenes)
    own = [it.scene for it in items]
    if any(s is None for s in own):
        raise InputError(
            "this study needs world items with known scenes (mmscope.bench.world_items, or "
            "pass scenes=): a user's images carry no concept labels"
        )
    return own  # type: ignore[return-value]


def answerability_items(n: int, seed: int = BENCH_SEED) -> list[BenchItem]:
    """``n`` world images, each asked one answerable question (types in turn) and one about
    something it does not hold (kind ``"unanswerable"``, answer ``""``)."""
    rng = np.random.default_rng(seed)
    out = []
    for i, sample in enumerate(make_samples(positive_int("n", n), seed)):
        q = sample.questions[i % len(sample.questions)]
        out.append(BenchItem(sample.image, q.text, q.answer, None, q.type))
        u = unanswerable(sample.scene, rng)
        out.append(BenchItem(sample.image, u.text, u.answer, None, u.type))
    return out


def _first(record: dict[str, Any], *keys: str) -> Any:
    return next((record[k] for k in keys if k in record), None)


def _mask(record: dict[str, Any], size: tuple[int, int]) -> np.ndarray | None:
    width, height = size
    if "mask_rle" in record:
        mask = np.asarray(decode_rle(record["mask_rle"]), dtype=bool)
        if mask.shape != (height, width):
            raise InputError(f"mask {mask.shape} does not match the image {(height, width)}")
        return mask
    boxes = record.get("boxes") or ([record["bbox"]] if "bbox" in record else None)
    if not boxes:
        return None
    mask = np.zeros((height, width), dtype=bool)
    for box in boxes:
        x0, y0, x1, y1 = (int(round(float(v))) for v in box)
        mask[max(0, y0) : min(height, y1), max(0, x0) : min(width, x1)] = True
    return mask


def _open(path: Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as err:
        raise InputError(f"cannot read image {path}: {err}") from None


def _records(record: dict[str, Any], image: Image.Image) -> list[BenchItem]:
    if "questions" in record and "objects" in record:  # `mmscope world sample` annotations
        masks = [_mask(o, image.size) for o in record["objects"]]
        items = []
        for q in record["questions"]:
            chosen = [masks[i] for i in q.get("evidence", []) if masks[i] is not None]
            mask = np.any(chosen, axis=0) if chosen else None
            items.append(BenchItem(image, q["text"], q["answer"], mask, q.get("type", "")))
        return items
    prompt = _first(record, "question", "text", "prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError("a record needs a question (keys question, text or prompt)")
    answer = str(_first(record, "answer", "label") or "")
    kind = str(record.get("type", ""))
    return [BenchItem(image, prompt, answer, _mask(record, image.size), kind)]


def load_items(path: str | Path, images_dir: str | Path | None = None) -> list[BenchItem]:
    """Items from a JSONL file (see the module docstring); errors name the file and line."""
    path = Path(path)
    if path.is_dir():
        path = path / "annotations.jsonl"
    if not path.is_file():
        raise InputError(f"no such file: {path}")
    root = Path(images_dir) if images_dir is not None else path.parent
    items: list[BenchItem] = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "image" not in record:
                    raise InputError("a record needs an image")
                items.extend(_records(record, _open(root / str(record["image"]))))
            except (json.JSONDecodeError, InputError, KeyError, TypeError) as err:
                raise InputError(f"{path}, line {number}: {err}") from None
    if not items:
        raise InputError(f"{path} holds no items")
    return items
