"""Benchmark items from the world and from a user's JSONL (boxes, RLE masks, POPE, exports)."""

import json

import numpy as np
import pytest
from PIL import Image

from mmscope.bench import load_items
from mmscope.core.errors import InputError
from mmscope.world import export_dataset, make_samples
from mmscope.world.items import world_items
from mmscope.world.rle import encode_rle


def test_world_items_carry_the_evidence_of_their_question():
    items = world_items(10, seed=3)
    samples = make_samples(10, 3)
    assert [it.kind for it in items[:5]] == ["existence", "color", "shape", "count", "position"]
    for it, s in zip(items, samples):
        q = next(q for q in s.questions if q.text == it.prompt)
        if q.evidence:
            assert np.array_equal(it.mask, s.masks[list(q.evidence)].any(0))
        else:
            assert it.mask is None
    clip = world_items(4, seed=3, contrastive=True)
    assert all(it.prompt.startswith("a ") and it.mask.any() and it.answer == "" for it in clip)


def test_user_jsonl_with_boxes_masks_and_pope_lines(tmp_path):
    Image.new("RGB", (20, 10), "white").save(tmp_path / "a.png")
    mask = np.zeros((10, 20), bool)
    mask[1:3, 4:6] = True
    lines = [
        {
            "image": "a.png",
            "question": "is there a cat ?",
            "answer": "yes",
            "boxes": [[2, 1, 5, 4]],
        },
        {"image": "a.png", "text": "Is there a dog in the image?", "label": "no", "question_id": 7},
        {"image": "a.png", "prompt": "what color ?", "mask_rle": encode_rle(mask)},
    ]
    (tmp_path / "q.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    a, b, c = load_items(tmp_path / "q.jsonl")
    assert a.answer == "yes" and a.mask.sum() == 9 and a.mask[1:4, 2:5].all()
    assert b.answer == "no" and b.mask is None and b.prompt.startswith("Is there a dog")
    assert np.array_equal(c.mask, mask) and c.answer == ""


def test_world_export_loads_every_question(tmp_path):
    export_dataset(make_samples(3, 1), tmp_path)
    items = load_items(tmp_path)
    assert len(items) == 15
    assert all(it.mask is None or it.mask.shape == (48, 48) for it in items)


@pytest.mark.parametrize(
    "line, message",
    [
        ("{not json", "line 1"),
        (json.dumps({"question": "q"}), "needs an image"),
        (json.dumps({"image": "missing.png", "question": "q"}), "missing.png does not exist"),
        (json.dumps({"image": "a.png"}), "needs a question"),
    ],
)
def test_bad_lines_name_the_file_and_line(tmp_path, line, message):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    (tmp_path / "q.jsonl").write_text(line + "\n")
    with pytest.raises(InputError, match=message):
        load_items(tmp_path / "q.jsonl")


def test_missing_file_and_bad_n():
    with pytest.raises(InputError):
        load_items("/nonexistent/q.jsonl")
    with pytest.raises(InputError):
        world_items(0)
