"""Materialise world samples and export/load them as an on-disk dataset.

Layout: ``out_dir/images/00000.png ...`` plus ``out_dir/annotations.jsonl`` with one JSON
object per image (scene, per-object boxes and RLE masks, questions, caption).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from mmscope.core.errors import InputError
from mmscope.core.images import load_image
from mmscope.core.validate import MAX_ITEMS, count, integer, output_folder, valid_seed
from mmscope.world.questions import Question, caption, questions
from mmscope.world.render import render
from mmscope.world.rle import decode_rle, encode_rle
from mmscope.world.scene import Scene, WorldConfig, sample_scenes

ANNOTATIONS = "annotations.jsonl"
#: Most pixels ``make_samples`` holds in memory at once (n x size^2; 3 bytes each).
MAX_WORLD_PIXELS = 500_000_000
IMAGES_DIR = "images"
_QUESTION_STREAM = 0x5157  # separates the question RNG stream from the scene stream


@dataclass(frozen=True, eq=False)
class WorldSample:
    """One image of the world with all its ground truth.

    Attributes:
        index: Position in the dataset.
        scene: The scene.
        image: The rendered RGB image.
        masks: Bool masks ``(n_objects, h, w)`` in the order of ``scene.objects``.
        questions: One question per type (see ``questions``).
        caption: The reference caption.
    """

    index: int
    scene: Scene
    image: Image.Image
    masks: np.ndarray
    questions: tuple[Question, ...]
    caption: str


def make_samples(
    n: int,
    seed: int,
    size: int = 48,
    config: WorldConfig = WorldConfig(),  # noqa: B008
) -> list[WorldSample]:
    """Sample, render and annotate ``n`` scenes deterministically from ``seed``; counts,
    seeds and sizes out of range raise ``InputError`` before anything is drawn."""
    n, seed = count("n", n, MAX_ITEMS), valid_seed(seed)
    size = integer("size", size, minimum=2, maximum=4096)
    if n * size * size > MAX_WORLD_PIXELS:
        raise InputError(
            f"{n:,} scenes of {size}x{size} pixels are {n * size * size:,} pixels in memory, "
            f"over the ceiling of {MAX_WORLD_PIXELS:,}; sample fewer or smaller scenes"
        )
    scenes = sample_scenes(n, seed, config)
    rng = np.random.default_rng([seed, _QUESTION_STREAM])
    out: list[WorldSample] = []
    for i, scene in enumerate(scenes):
        r = render(scene, size)
        qs = tuple(questions(scene, rng))
        out.append(WorldSample(i, scene, r.image, r.masks, qs, caption(scene)))
    return out


def mask_bbox(mask: np.ndarray) -> list[int]:
    """Pixel box ``[x0, y0, x1, y1]`` of a mask, end-exclusive; all zeros for an empty mask."""
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return [0, 0, 0, 0]
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def _record(sample: WorldSample, image_rel: str) -> dict[str, Any]:
    objects = [
        {
            "name": o.name,
            "color": o.color,
            "shape": o.shape,
            "size": o.size,
            "slot": o.slot,
            "bbox": mask_bbox(m),
            "mask_rle": encode_rle(m),
        }
        for o, m in zip(sample.scene.objects, sample.masks, strict=True)
    ]
    return {
        "index": int(sample.index),
        "image": image_rel,
        "width": sample.image.width,
        "height": sample.image.height,
        "scene": sample.scene.to_dict(),
        "objects": objects,
        "questions": [q.to_dict() for q in sample.questions],
        "caption": sample.caption,
    }


def export_dataset(samples: Sequence[WorldSample], out_dir: str | Path) -> Path:
    """Write images and annotations under ``out_dir``; return the JSONL path. A folder that
    cannot be written raises ``InputError`` before anything is."""
    out = output_folder(out_dir)
    (out / IMAGES_DIR).mkdir(parents=True, exist_ok=True)
    path = out / ANNOTATIONS
    with path.open("w", encoding="utf-8") as f:
        for s in samples:
            rel = f"{IMAGES_DIR}/{s.index:05d}.png"
            s.image.convert("RGB").save(out / rel)
            f.write(json.dumps(_record(s, rel)) + "\n")
    return path


def _load_record(rec: dict[str, Any], root: Path) -> WorldSample:
    image = load_image(root / rec["image"])
    h, w = int(rec["height"]), int(rec["width"])
    masks = np.zeros((len(rec["objects"]), h, w), dtype=bool)
    for i, obj in enumerate(rec["objects"]):
        masks[i] = decode_rle(obj["mask_rle"])
    return WorldSample(
        index=int(rec["index"]),
        scene=Scene.from_dict(rec["scene"]),
        image=image,
        masks=masks,
        questions=tuple(Question.from_dict(q) for q in rec["questions"]),
        caption=rec["caption"],
    )


def load_dataset(path: str | Path) -> list[WorldSample]:
    """Load a dataset written by ``export_dataset``.

    Args:
        path: The dataset folder or its ``annotations.jsonl``.
    """
    p = Path(path)
    if p.is_dir():
        p = p / ANNOTATIONS
    root = p.parent
    with p.open(encoding="utf-8") as f:
        return [_load_record(json.loads(line), root) for line in f if line.strip()]
