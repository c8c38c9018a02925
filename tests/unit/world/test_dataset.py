"""Tests for sample generation and the on-disk export/load round trip."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from mmscope.world import (
    STYLES,
    WorldConfig,
    caption,
    decode_rle,
    export_dataset,
    load_dataset,
    make_samples,
    render,
)


def test_make_samples_deterministic_and_consistent() -> None:
    a = make_samples(12, seed=5)
    b = make_samples(12, seed=5)
    for x, y in zip(a, b, strict=True):
        assert x.scene == y.scene and x.questions == y.questions
        assert x.image.tobytes() == y.image.tobytes() and np.array_equal(x.masks, y.masks)
    for i, s in enumerate(a):
        assert s.index == i and s.image.size == (48, 48)
        assert s.caption == caption(s.scene)
        assert np.array_equal(s.masks, render(s.scene, 48).masks)
        assert [q.type for q in s.questions] == ["existence", "color", "shape", "count", "position"]


def test_export_load_round_trip(tmp_path: Path) -> None:
    samples = make_samples(8, seed=6, size=40, config=WorldConfig(styles=STYLES))
    path = export_dataset(samples, tmp_path / "world")
    assert path == tmp_path / "world" / "annotations.jsonl"
    assert (tmp_path / "world" / "images" / "00000.png").is_file()
    for loaded in (load_dataset(path), load_dataset(tmp_path / "world")):
        assert len(loaded) == len(samples)
        for x, y in zip(samples, loaded, strict=True):
            assert x.index == y.index and x.scene == y.scene
            assert x.questions == y.questions and x.caption == y.caption
            assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
            assert y.masks.dtype == bool and np.array_equal(x.masks, y.masks)


def test_annotation_records(tmp_path: Path) -> None:
    samples = make_samples(5, seed=7)
    path = export_dataset(samples, tmp_path)
    lines = path.read_text().splitlines()
    assert len(lines) == 5
    for sample, line in zip(samples, lines, strict=True):
        rec = json.loads(line)
        assert rec["image"] == f"images/{sample.index:05d}.png"
        assert (rec["width"], rec["height"]) == (48, 48)
        assert len(rec["objects"]) == len(sample.scene.objects)
        for obj, mask, ann in zip(sample.scene.objects, sample.masks, rec["objects"], strict=True):
            assert ann["name"] == obj.name and ann["slot"] == obj.slot
            assert np.array_equal(decode_rle(ann["mask_rle"]), mask)
            x0, y0, x1, y1 = ann["bbox"]
            ys, xs = np.nonzero(mask)
            assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
